"""pull --force says what it discards: changes made in a machine since dkr made it,
found per backend (overlay's upper dir, btrfs's transaction ids, ctimes)."""

from __future__ import annotations

import os
from contextlib import ExitStack

import pytest
from helpers import assert_ok, pull, run_dkr

from dkr.testing import images, loopfs
from dkr.testing.images import Dir, File, Image, Layer

try:
    import btrfsutil
except ImportError:
    btrfsutil = None


def version(n: int) -> Image:
    return Image([Layer([Dir("etc"), File("etc/hostname", b"box\n")]),
                  Layer([File("version", b"%d" % n)])])


@pytest.fixture(scope="module")
def pushed(registry):
    for n in (1, 2):
        images.push_image(registry, f"changes/v{n}", "latest", version(n))


@pytest.fixture(scope="module")
def btrfs_mount():
    reason = "the btrfsutil module is missing" if btrfsutil is None \
        else loopfs.unavailable_reason("btrfs")
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"btrfs tests cannot run: {reason}")
        pytest.skip(reason)
    with ExitStack() as stack:
        yield stack.enter_context(loopfs.btrfs("256M"))


@pytest.fixture(params=["dir", "overlay", "btrfs"])
def where(request, tmp_path):
    """(image root, backend) for each backend."""
    if request.param == "btrfs":
        root = request.getfixturevalue("btrfs_mount") / request.node.name.replace("[", "-")[:-1]
    else:
        root = tmp_path / "machines"
    yield root, request.param
    run_dkr("remove", "--image-root", root, "app")


def force(registry, root, backend, n):
    return assert_ok(pull(registry, f"changes/v{n}", root, "--backend", backend, "--force",
                          local="app"))


def test_an_unchanged_machine_is_replaced_without_a_warning(registry, pushed, where):
    root, backend = where
    assert_ok(pull(registry, "changes/v1", root, "--backend", backend, local="app"))
    run = force(registry, root, backend, 2)
    assert "Replaced machine app (sha256:" in run.err and "Created machine" not in run.err
    assert "was changed since" not in run.err and "are discarded" not in run.err, run.err
    assert (root / "app" / "version").read_bytes() == b"2"


@pytest.mark.parametrize("change", ["add", "modify", "delete"])
def test_changes_are_named_before_they_are_discarded(registry, pushed, where, change):
    root, backend = where
    assert_ok(pull(registry, "changes/v1", root, "--backend", backend, local="app"))
    machine = root / "app"
    if change == "add":
        (machine / "etc" / "mine").write_text("the user's\n")
        named = "etc/mine"
    elif change == "modify":
        (machine / "etc" / "hostname").write_text("renamed\n")
        named = "etc/hostname"
    else:
        (machine / "etc" / "hostname").unlink()
        # (overlay: its whiteout; else the directory it was in)
        named = "etc/hostname" if backend == "overlay" else "etc"
    run = force(registry, root, backend, 2)      # (the same digest would do as well)
    [warning] = [line for line in run.err.splitlines() if "was changed since" in line]
    assert "Machine app was changed since it was made (" in warning, warning
    assert named in warning.split("(", 1)[1].split(")")[0].split(", "), warning
    assert "replacing it discards those changes" in warning
    assert "; the changes made in it are discarded." in run.err
    assert (machine / "etc" / "hostname").read_bytes() == b"box\n"
    assert not (machine / "etc" / "mine").exists()

    again = force(registry, root, backend, 2)
    assert "was changed since" not in again.err and "are discarded" not in again.err, again.err
