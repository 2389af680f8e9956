"""An outside backend whose layers are no directory trees: EROFS images, loop-mounted.

The package in tests/outside_erofs/ uses the plugin contract alone (dkr.hookspecs
and dkr.pluginkit): its layers are image files that its commit_layer puts in
place, its machine an overlay of their mounts with an upper dir of its own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from contextlib import ExitStack
from pathlib import Path

import pytest
from helpers import assert_ok, example_installed, pull, run_dkr
from reliability_helpers import need

from dkr.fsinfo import mount_type, mounts_below
from dkr.testing import images, loopfs
from dkr.testing.images import File, Image, Layer
from dkr.testing.oracle import diff_trees, tree_snapshot, umoci_unpack

PACKAGE = Path(__file__).parent / "outside_erofs"
DIST = "dkr-erofs-backend"
EROFS_MAGIC = 0xE0F5E1E2



@pytest.fixture(scope="module")
def erofs_plugin():
    with example_installed(PACKAGE, DIST):
        yield "erofs"


@pytest.fixture(scope="module")
def ext4_mount():
    need(loopfs.unavailable_reason("ext4"))
    need(None if shutil.which("mkfs.erofs") else "mkfs.erofs is not installed (erofs-utils)")
    with ExitStack() as stack:
        try:
            yield stack.enter_context(loopfs.ext4("256M"))
        except loopfs.LoopFsError as e:
            need(str(e))


@pytest.fixture
def root(ext4_mount, request):
    path = ext4_mount / request.node.name.replace("[", "-").rstrip("]")
    path.mkdir()
    yield path
    for point in mounts_below(path):          # whatever a failed test left mounted
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def record(root: Path, local: str) -> dict:
    return json.loads((root / ".dkr" / "machines" / f"{local}.json").read_text())


def is_erofs_image(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(1024)
        return int.from_bytes(f.read(4), "little") == EROFS_MAGIC


def our_mounts(root: Path) -> list[Path]:
    return mounts_below(root)


def test_pull_mount_force_remove_gc(registry, erofs_plugin, root, tmp_path):
    images.push_image(registry, "erofs/sample", "latest", images.sample_image())
    run = assert_ok(pull(registry, "erofs/sample", root, "--backend", "erofs", "-v", "--json",
                         local="box"))
    assert [e["name"] for e in run.events if e["event"] == "backend"] == ["erofs"]
    info = record(root, "box")
    assert info["backend"] == "erofs"
    for key in info["layers"]:                       # a layer is one image file, not a tree
        layer = root / f".dkr-{key}"
        assert layer.is_file() and is_erofs_image(layer)
    machine = root / "box"
    assert mount_type(machine) == "overlay"
    oracle = tree_snapshot(umoci_unpack(registry, "erofs/sample", "latest", tmp_path / "o"))
    assert diff_trees(oracle, tree_snapshot(machine), "umoci", "dkr") == []

    # umount and mount again: the machine's writes are kept, its layers are untouched
    (machine / "mine").write_text("kept")
    before = tree_snapshot(machine)
    assert_ok(run_dkr("umount", "--image-root", root, "box"))
    assert mount_type(machine) is None and os.listdir(machine) == []
    assert our_mounts(root) == []                    # the layers' loop mounts went too
    assert_ok(run_dkr("mount", "--image-root", root, "box"))
    assert tree_snapshot(machine) == before

    # --force over it with another image: swapped whole, the old one's mounts gone
    images.push_image(registry, "erofs/small", "latest",
                      Image([Layer([File("version", b"2")])]))
    assert_ok(pull(registry, "erofs/small", root, "--backend", "erofs", "--force", local="box"))
    assert (machine / "version").read_bytes() == b"2" and not (machine / "mine").exists()
    assert record(root, "box")["reference"].endswith("erofs/small:latest")
    assert [p for p in os.listdir(root) if ".tmp-" in p] == []

    # a second machine on the same layers, then remove both and gc: nothing is left
    assert_ok(pull(registry, "erofs/small", root, "--backend", "erofs", local="other"))
    assert_ok(run_dkr("remove", "--image-root", root, "box", "other"))
    assert our_mounts(root) == []
    assert_ok(run_dkr("gc", "--image-root", root))
    assert sorted(os.listdir(root)) == [".dkr"]
    assert not (root / ".dkr" / "erofs" / "machines").exists() or \
        os.listdir(root / ".dkr" / "erofs" / "machines") == []


def test_a_leftover_machine_is_taken_down_by_its_own_backend(registry, erofs_plugin, root):
    """A machine tree that no record names (its pull was killed after the swap) is the
    erofs backend's by its own word (dkr_tree_owner): gc unmounts and removes it."""
    images.push_image(registry, "erofs/left", "latest", Image([Layer([File("f", b"f")])]))
    assert_ok(pull(registry, "erofs/left", root, "--backend", "erofs", local="left"))
    leftover = root / ".dkr-local-left.tmp-0badc0de"
    assert_ok(run_dkr("umount", "--image-root", root, "left"))
    os.rename(root / "left", leftover)
    (root / ".dkr" / "machines" / "left.json").unlink()
    assert_ok(run_dkr("gc", "--image-root", root))
    assert not os.path.lexists(leftover) and our_mounts(root) == []
    assert sorted(os.listdir(root)) == [".dkr"]
    assert not (root / ".dkr" / "erofs" / "machines" / "left").exists()   # its upper dir too


def test_a_pull_with_another_backend_removes_a_leftover_by_the_one_that_made_it(
        registry, erofs_plugin, root):
    """A killed pull's machine tree is taken down by its own backend, even when the next
    pull of that machine chose another one."""
    images.push_image(registry, "erofs/switch", "latest", Image([Layer([File("f", b"f")])]))
    assert_ok(pull(registry, "erofs/switch", root, "--backend", "erofs", local="sw"))
    assert_ok(run_dkr("umount", "--image-root", root, "sw"))
    os.rename(root / "sw", root / ".dkr-local-sw.tmp-0badc0de")
    (root / ".dkr" / "machines" / "sw.json").unlink()
    images.push_image(registry, "erofs/switch", "other", Image([Layer([File("g", b"g")])]))
    assert_ok(pull(registry, "erofs/switch:other", root, "--backend", "dir", local="sw"))
    assert (root / "sw" / "g").read_bytes() == b"g"
    assert not os.path.lexists(root / ".dkr-local-sw.tmp-0badc0de")
    assert not (root / ".dkr" / "erofs" / "machines" / "sw").exists()
