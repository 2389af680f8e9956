"""systemd's image locks: a machine that a real systemd-nspawn runs is neither
replaced nor removed, a layer it runs is not collected, and nspawn cannot start
on a machine while dkr replaces it (dkr takes the same OFD locks as systemd)."""

from __future__ import annotations

import json

import pytest
from helpers import assert_clean_failure, assert_ok, pull, run_dkr
from nspawn_tree import NSPAWN, nspawn, os_layer, running

from dkr.store.imagelock import ImageLock, local_lock_path
from dkr.testing import images
from dkr.testing.images import File, Image, Layer

pytestmark = pytest.mark.skipif(NSPAWN is None,
                                reason="needs systemd-nspawn (install.sh installs it)")


@pytest.fixture(scope="module")
def pushed(registry):
    base = os_layer()
    for n in (1, 2):
        images.push_image(registry, f"locks/v{n}", "latest",
                          Image([base, Layer([File("version", b"%d" % n)])]))


def dkr(root, *args):
    return run_dkr(*args, "--image-root", root)


def snapshot(tree):
    return sorted((str(p.relative_to(tree)), p.lstat().st_ino, p.lstat().st_mtime_ns)
                  for p in tree.iterdir())


@pytest.mark.parametrize("backend", ["dir", "overlay"])
def test_a_running_machine_is_neither_replaced_nor_removed(registry, pushed, image_root,
                                                           backend):
    assert_ok(pull(registry, "locks/v1", image_root, "--backend", backend, local="app"))
    machine = image_root / "app"
    record = (image_root / ".dkr/machines/app.json").read_text()
    try:
        with running(machine) as proc:
            before = snapshot(machine)        # (nspawn makes dev/, proc/, ... first)
            forced = pull(registry, "locks/v2", image_root, "--backend", backend, "--force",
                          local="app")
            assert_clean_failure(forced, image_root, r"machine app is in use by process "
                                 r"\d+ \(systemd-nspawn\) \(it holds systemd's image lock "
                                 rf"{local_lock_path(machine)}\): stop it first")
            removed = dkr(image_root, "remove", "app")
            assert_clean_failure(removed, image_root, r"machine app is in use by process \d+ "
                                                      r"\(systemd-nspawn\)")
            assert proc.poll() is None
            assert snapshot(machine) == before
            assert (image_root / ".dkr/machines/app.json").read_text() == record
            assert (machine / "version").read_bytes() == b"1"
        assert_ok(pull(registry, "locks/v2", image_root, "--backend", backend, "--force",
                       local="app"))
        assert (machine / "version").read_bytes() == b"2"
    finally:
        assert_ok(dkr(image_root, "remove", "app"))
    assert not machine.exists() and not local_lock_path(machine).exists()


def test_gc_keeps_a_layer_nspawn_runs(registry, pushed, image_root):
    assert_ok(pull(registry, "locks/v1", image_root, "--backend", "dir", local="app"))
    top = json.loads((image_root / ".dkr/machines/app.json").read_text())["layers"][-1]
    assert_ok(dkr(image_root, "remove", "app"))
    layer = image_root / f".dkr-{top}"
    with running(layer, "--read-only"):
        kept = assert_ok(dkr(image_root, "gc"))
        assert f"layer {top[:12]} is in use by process" in kept.err and "keeping it" in kept.err
        assert layer.is_dir()
    assert_ok(dkr(image_root, "gc"))
    assert not layer.exists()


def test_nspawn_cannot_start_while_dkr_holds_the_lock(registry, pushed, image_root):
    """The locks dkr takes are the ones nspawn checks (the same files, the same kind)."""
    assert_ok(pull(registry, "locks/v1", image_root, "--backend", "dir", local="app"))
    machine = image_root / "app"
    with ImageLock(machine, "machine app", "app"):
        proc = nspawn(machine, "/bin/sh", "-c", "echo started")
        out, err = proc.communicate(timeout=60)
        assert proc.returncode != 0 and "started" not in out
        assert "busy" in err.lower() or "lock" in err.lower(), err
    proc = nspawn(machine, "/bin/sh", "-c", "echo started")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "started" in out, err
