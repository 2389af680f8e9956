"""Pulling into a name that is taken: the same image again, another image, with and
without --force, and names dkr did not make (a hand-made tree, LOCAL.raw)."""

from __future__ import annotations

import json
import os

import pytest
from helpers import assert_clean_failure, assert_ok, pull, run_dkr

from dkr.testing import images
from dkr.testing.images import File, Image, Layer


def version(n: int) -> Image:
    return Image([Layer([File("version", str(n).encode())]),
                  Layer([File("data", b"data %d\n" % n)])])


@pytest.fixture
def repo(registry, request):
    """A repository of its own, holding version 1."""
    name = f"repull/{request.node.name.replace('_', '-').lower()[:40]}"
    images.push_image(registry, name, "latest", version(1))
    return name


def record(root, local) -> dict:
    return json.loads((root / ".dkr" / "machines" / f"{local}.json").read_text())


def test_same_digest_is_a_no_op(registry, repo, image_root):
    first = assert_ok(pull(registry, repo, image_root, "--backend", "dir", local="app"))
    assert "Created machine app" in first.err
    made = record(image_root, "app")
    inode = os.stat(image_root / "app" / "version").st_ino
    (image_root / "app" / "mine").write_text("a change of the user's\n")

    again = assert_ok(pull(registry, repo, image_root, "--backend", "dir", "--json",
                           local="app"))
    assert f"Machine app is up to date ({made['manifest_digest']})." in again.err
    assert "Created machine" not in again.err and "Replaced" not in again.err
    assert [e["event"] for e in again.events if e["event"] in ("up-to-date", "machine")] \
        == ["up-to-date"]
    assert os.stat(image_root / "app" / "version").st_ino == inode
    assert (image_root / "app" / "mine").exists()
    assert record(image_root, "app") == made


def test_other_digest_needs_force_and_says_what_it_replaces(registry, repo, image_root):
    assert_ok(pull(registry, repo, image_root, "--backend", "dir", local="app"))
    old = record(image_root, "app")["manifest_digest"]
    second = version(2)
    images.push_image(registry, repo, "latest", second)
    new = second.manifest_digest

    refused = pull(registry, repo, image_root, "--backend", "dir", local="app")
    assert_clean_failure(refused, image_root,
                         rf"machine 'app' in .* holds {old}, this pull gives {new}: --force "
                         "replaces the machine and discards changes made in it")
    assert (image_root / "app" / "version").read_bytes() == b"1"

    forced = assert_ok(pull(registry, repo, image_root, "--backend", "dir", "--force",
                            local="app"))
    assert f"Replaced machine app ({old} → {new})" in forced.err
    assert "Created machine" not in forced.err
    assert (image_root / "app" / "version").read_bytes() == b"2"
    assert record(image_root, "app")["manifest_digest"] == new


def test_same_digest_other_backend_needs_force(registry, repo, image_root, tmp_path):
    assert_ok(pull(registry, repo, image_root, "--backend", "dir", local="app"))
    refused = pull(registry, repo, image_root, "--backend", "overlay", local="app")
    assert_clean_failure(refused, image_root, r"holds sha256:\w+ made by backend dir, this "
                                              r"pull gives sha256:\w+ made by backend overlay")


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_a_tree_dkr_did_not_make_is_never_replaced(registry, repo, image_root, force):
    foreign = image_root / "foreign"
    foreign.mkdir(parents=True)
    (foreign / "precious").write_text("hand-made\n")
    refused = pull(registry, repo, image_root, "--backend", "dir", *force, local="foreign")
    assert_clean_failure(refused, image_root, rf"{foreign} exists, but dkr did not make it "
                                              r"\(it has no record in .*\): dkr never replaces")
    assert (foreign / "precious").read_text() == "hand-made\n"
    assert sorted(p.name for p in foreign.iterdir()) == ["precious"]


@pytest.mark.parametrize("other", ["app.raw", "app.v", "app.raw.v"])
def test_another_image_of_the_same_name_is_refused(registry, repo, image_root, other):
    image_root.mkdir(parents=True)
    if other == "app.raw":
        (image_root / other).write_bytes(b"\0" * 4096)
    else:
        (image_root / other).mkdir()
    refused = pull(registry, repo, image_root, "--backend", "dir", "--force", local="app")
    assert_clean_failure(refused, image_root, rf"{image_root / other} already exists, and "
                                              r"machinectl lists it as image 'app'", "app")


def test_remove_refuses_a_tree_dkr_did_not_make(image_root):
    (image_root / "foreign").mkdir(parents=True)
    run = run_dkr("remove", "--image-root", image_root, "foreign")
    assert_clean_failure(run, image_root, rf"{image_root / 'foreign'} exists, but dkr did not "
                                          "make it .*never replaces or removes it")
    assert (image_root / "foreign").is_dir()


def test_a_batch_runs_twice(registry, image_root, tmp_path):
    for n in (1, 2):
        images.push_image(registry, f"repull/batch{n}", "latest", version(n))
    listing = tmp_path / "batch"
    listing.write_text("".join(f"{registry.host}/repull/batch{n} b{n}\n" for n in (1, 2)))
    args = ["pull", "--insecure", "--image-root", image_root, "--backend", "dir",
            "--batch", listing]
    assert_ok(run_dkr(*args))
    inodes = [os.stat(image_root / f"b{n}" / "version").st_ino for n in (1, 2)]
    again = assert_ok(run_dkr(*args))
    assert again.err.count("is up to date") == 2, again.err
    assert [os.stat(image_root / f"b{n}" / "version").st_ino for n in (1, 2)] == inodes

    images.push_image(registry, "repull/batch2", "latest", version(3))
    third = run_dkr(*args)
    assert third.rc == 1
    assert "Machine b1 is up to date" in third.err
    assert "dkr: error: " in third.err and "machine 'b2'" in third.err and "--force" in third.err
    assert (image_root / "b2" / "version").read_bytes() == b"2"
