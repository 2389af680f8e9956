"""The btrfs backend on a real, loop-mounted btrfs: subvolumes, snapshots, read-only layers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import (assert_clean_failure, assert_ok, layer_dirs, pull, run_dkr,
                     write_into_one_of_two)
from reliability_helpers import backend_mount, need

from dkr.testing import images, loopfs
from dkr.testing.images import Dir, File, Image, Layer
from dkr.testing.oracle import diff_trees, tree_snapshot, umoci_unpack

try:
    import btrfsutil
except ImportError:
    btrfsutil = None



@pytest.fixture(scope="module")
def btrfs_mount():
    with backend_mount("btrfs") as mount:
        yield mount


@pytest.fixture
def root(btrfs_mount, request):
    """A fresh image root on the btrfs, one per test."""
    path = btrfs_mount / request.node.name.replace("[", "-").rstrip("]")
    path.mkdir()
    return path


BASE = [Layer([Dir("etc"), File("etc/base", b"base layer\n")]),
        Layer([Dir("usr"), File("usr/lib.so", b"\x7fELF" * 4000)])]


def family(name: str) -> Image:
    """Images that share the two BASE layers and add one of their own."""
    return Image([*BASE, Layer([Dir("app"), File(f"app/{name}", name.encode() * 3000)])])


def info(path):
    return btrfsutil.subvolume_info(path)


def all_subvolumes(root):
    """Every subvolume below ``root`` (nested ones too), relative to it."""
    found = [Path(rel) for rel, _ in btrfsutil.SubvolumeIterator(root.parent)]
    return sorted(str(p.relative_to(root.name)) for p in found if p.parts[0] == root.name)


# --- correctness -------------------------------------------------------------------

def test_sample_matches_umoci(registry, root, tmp_path):
    images.push_image(registry, "btrfs/sample", "latest", images.sample_image())
    run = assert_ok(pull(registry, "btrfs/sample", root, "-v", "--json"))
    chosen = [e for e in run.events if e["event"] == "backend"]
    assert chosen and chosen[0]["name"] == "btrfs", run.err
    assert "Using backend btrfs" in run.err
    oracle = tree_snapshot(umoci_unpack(registry, "btrfs/sample", "latest", tmp_path / "oracle"))
    assert diff_trees(oracle, tree_snapshot(root / "sample"), "umoci", "dkr") == []


def test_layers_above_an_unfinished_parent_are_staged_then_replayed(registry, root, tmp_path):
    """Layers 2 and 3 are inflated and checked while the base is still being built, then
    replayed into their parent's snapshot: the same tree umoci makes, nothing left over.

    Bodies above 64 KiB travel through the stage's pack (shared blocks), smaller ones
    inline; the replay applies whiteouts, opaque directories and links across layers.
    """
    big = bytes(range(256)) * 1024                    # 256 KiB: through the pack
    image = Image([
        Layer([Dir("etc"), File("etc/a", b"a\n"), File("etc/gone", b"x"), Dir("opt"),
               File("opt/old", b"old"), File("usr/big", big, mode=0o755),
               File("base/bulk", os.urandom(6 << 20))]),   # keeps the base busy for a while
        Layer([File("usr/big", big[::-1], mode=0o700, uid=7, gid=8),
               File("usr/odd", big[:70001]), images.Whiteout("etc/gone"),
               images.Hardlink("etc/b", "etc/a"), images.Symlink("etc/c", "a"),
               File("etc/small", b"s" * 100)]),
        Layer([images.Opaque("opt"), File("opt/new", b"new"), File("usr/big", big * 2),
               images.Hardlink("usr/again", "usr/odd")]),
    ])
    images.push_image(registry, "btrfs/staged", "latest", image)
    run = assert_ok(pull(registry, "btrfs/staged", root, "--json", "--stage-ahead", "always",
                         local="m"))
    blobs = [e["digest"] for e in run.events if e["event"] == "layer-start"]
    staged = [e["digest"] for e in run.events if e["event"] == "layer-staged"]
    assert sorted(staged) == sorted(blobs[1:]), run.err
    oracle = tree_snapshot(umoci_unpack(registry, "btrfs/staged", "latest", tmp_path / "oracle"))
    assert diff_trees(oracle, tree_snapshot(root / "m"), "umoci", "dkr") == []
    assert [p.name for p in root.iterdir() if ".tmp-" in p.name] == []
    assert list((root / ".dkr" / "partial").iterdir()) == []


def test_layers_are_readonly_snapshots_of_their_parents(registry, root):
    images.push_image(registry, "btrfs/chain", "latest", images.sample_image())
    assert_ok(pull(registry, "btrfs/chain", root, local="m"))
    record = json.loads((root / ".dkr" / "machines" / "m.json").read_text())
    chain = [root / f".dkr-{key}" for key in record["layers"]]
    assert len(chain) == 3 and sorted(chain) == layer_dirs(root)
    for layer in chain:
        assert btrfsutil.is_subvolume(layer)
        assert btrfsutil.get_subvolume_read_only(layer), layer.name
    assert info(chain[0]).parent_uuid == bytes(16)              # a new subvolume
    for lower, upper in zip(chain, chain[1:]):
        assert info(upper).parent_uuid == info(lower).uuid      # a snapshot of its parent
    machine = root / "m"
    assert btrfsutil.is_subvolume(machine)
    assert not btrfsutil.get_subvolume_read_only(machine)
    assert info(machine).parent_uuid == info(chain[-1]).uuid


def test_writing_in_a_machine_touches_nothing_else(registry, root):
    one = write_into_one_of_two(registry, "btrfs/write", root,
                                more_writes=lambda one: os.chmod(one / "tmp", 0o700))
    assert (one / "etc" / "hostname").read_text() == "mine\n"
    with pytest.raises(OSError):
        (layer_dirs(root)[0] / "etc" / "hostname").write_text("no")


def test_shared_base_is_fetched_and_stored_once(registry, root):
    first, second = family("first"), family("second")
    images.push_image(registry, "btrfs/first", "latest", first)
    images.push_image(registry, "btrfs/second", "latest", second)
    assert_ok(pull(registry, "btrfs/first", root, "--json"))
    run = assert_ok(pull(registry, "btrfs/second", root, "--json"))

    kinds = [e["event"] for e in run.events]
    assert kinds.count("skipped") == 2 and kinds.count("layer-done") == 1
    assert run.err.count("already exists, skipping.") == 2
    done = [e for e in run.events if e["event"] == "done"][0]
    assert done["bytes"] == second.layers[2].size            # only its own layer came over the wire
    assert [e["size"] for e in run.events if e["event"] == "layer-done"] == [second.layers[2].size]

    layers = layer_dirs(root)
    assert len(layers) == 4                                   # 2 shared + 1 + 1
    by_uuid = {info(p).uuid: p for p in layers}
    tops = [p for p in layers if sum(info(q).parent_uuid == info(p).uuid for q in layers) == 0]
    assert len(tops) == 2
    shared_parent = {by_uuid[info(top).parent_uuid] for top in tops}
    assert len(shared_parent) == 1                 # both tops are snapshots of one base subvolume
    assert all(info(p).id != info(q).id for p in layers for q in layers if p != q)


def test_force_replaces_machine_and_deletes_the_old_subvolume(registry, root):
    images.push_image(registry, "btrfs/force", "v1", Image([Layer([File("version", b"1")])]))
    images.push_image(registry, "btrfs/force", "v2", Image([Layer([File("version", b"2")])]))
    assert_ok(pull(registry, "btrfs/force:v1", root, local="box"))
    (root / "box" / "scribble").write_text("gone after --force")
    old_id = info(root / "box").id
    assert_ok(pull(registry, "btrfs/force:v2", root, "--force", local="box"))
    assert (root / "box" / "version").read_bytes() == b"2"
    assert not (root / "box" / "scribble").exists()
    assert info(root / "box").id != old_id
    assert all_subvolumes(root) == sorted([*(p.name for p in layer_dirs(root)), "box"])


def test_remove_handles_nested_and_readonly_subvolumes(registry, root):
    images.push_image(registry, "btrfs/nested", "latest", family("nested"))
    assert_ok(pull(registry, "btrfs/nested", root, local="host"))
    machine = root / "host"
    btrfsutil.create_subvolume(machine / "var-lib")
    btrfsutil.create_subvolume(machine / "var-lib" / "inner")
    (machine / "var-lib" / "inner" / "data").write_text("x")
    btrfsutil.create_snapshot(machine / "var-lib" / "inner", machine / "frozen", read_only=True)
    btrfsutil.set_subvolume_read_only(machine / "var-lib", True)
    assert {"host/var-lib", "host/var-lib/inner", "host/frozen"} <= set(all_subvolumes(root))

    assert_ok(run_dkr("remove", "--image-root", root, "host"))
    assert not os.path.lexists(machine)
    assert all_subvolumes(root) == [p.name for p in layer_dirs(root)]
    assert_ok(run_dkr("gc", "--image-root", root))
    assert all_subvolumes(root) == [] and layer_dirs(root) == []


def test_btrfs_refused_elsewhere(registry):
    images.push_image(registry, "btrfs/elsewhere", "latest", family("elsewhere"))
    need(loopfs.unavailable_reason("ext4"))
    with loopfs.ext4() as other:
        failed = pull(registry, "btrfs/elsewhere", other, "--backend", "btrfs")
        assert_clean_failure(failed, other, r"backend btrfs cannot be used on .*: .* not on btrfs")
