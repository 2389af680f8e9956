"""The overlay backend on a real, loop-mounted ext4: diff layers and overlay mounts."""

from __future__ import annotations

import fcntl
import json
import os
import random
import signal
import stat
import subprocess
import sys
import threading
from contextlib import ExitStack

import pytest
from helpers import (assert_clean_failure, assert_ok,
                     backend_registered_by_hand, pull, run_dkr, temp_entries,
                     write_into_one_of_two)
from reliability_helpers import need

from dkr.errors import DkrError
from dkr.testing import images, loopfs
from dkr.testing.faultproxy import FaultProxy
from dkr.testing.images import Dir, File, Image, Layer, Opaque
from dkr.testing.oracle import diff_trees, tree_snapshot, umoci_unpack
from dkr_plugins import overlay
from test_crash import DIES_AT



@pytest.fixture(scope="module")
def ext4_mount():
    need(loopfs.unavailable_reason("ext4"))
    with ExitStack() as stack:
        try:
            mount = stack.enter_context(loopfs.ext4("256M"))
        except loopfs.LoopFsError as e:
            need(str(e))
        need(overlay.OverlayBackend().unusable_reason(mount))
        yield mount


@pytest.fixture
def root(ext4_mount, request):
    """A fresh image root on the ext4, one per test."""
    path = ext4_mount / request.node.name.replace("[", "-").rstrip("]")
    path.mkdir()
    return path


def record(root, local):
    return json.loads((root / ".dkr" / "machines" / f"{local}.json").read_text())


def layers_of(root, local):
    return [root / f".dkr-{key}" for key in record(root, local)["layers"]]


def is_whiteout(path) -> bool:
    st = os.lstat(path)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0)


def state_dirs(root, local):
    base = root / ".dkr" / "overlay" / local
    return sorted(base.iterdir()) if base.exists() else []


# --- correctness -------------------------------------------------------------------

def test_merged_view_matches_umoci(registry, root, tmp_path):
    images.push_image(registry, "ovl/sample", "latest", images.sample_image())
    run = assert_ok(pull(registry, "ovl/sample", root, "-v", "--json"))
    chosen = [e for e in run.events if e["event"] == "backend"][0]
    assert chosen["name"] == "overlay", run.err
    assert "not on btrfs" in chosen["why"]
    machine = root / "sample"
    assert overlay.mount_type(machine) == "overlay"
    oracle = tree_snapshot(umoci_unpack(registry, "ovl/sample", "latest", tmp_path / "oracle"))
    assert diff_trees(oracle, tree_snapshot(machine), "umoci", "dkr") == []


def test_an_opaque_layer_root_hides_every_layer_below(registry, root, tmp_path):
    """overlayfs honours an opaque mark below a layer's root only: one at the root
    must end the stack there."""
    images.push_image(registry, "ovl/rootopq", "latest", Image([
        Layer([File("x", b"x"), File("dd/z", b"z")]),
        Layer([File("keep", b"keep")]),
        Layer([File(".wh..wh..opq", b""), File("y", b"y"), Opaque("dd"), File("dd/w", b"w")]),
        Layer([File("top", b"top")])]))
    assert_ok(pull(registry, "ovl/rootopq", root))
    machine = root / "rootopq"
    assert sorted(os.listdir(machine)) == ["dd", "top", "y"]
    assert os.listdir(machine / "dd") == ["w"]
    oracle = tree_snapshot(umoci_unpack(registry, "ovl/rootopq", "latest", tmp_path / "oracle"))
    assert diff_trees(oracle, tree_snapshot(machine), "umoci", "dkr") == []


def test_layers_are_diffs_with_overlay_whiteouts(registry, root):
    images.push_image(registry, "ovl/diffs", "latest", images.sample_image())
    assert_ok(pull(registry, "ovl/diffs", root, local="m"))
    base, update, app = layers_of(root, "m")
    # Each layer holds only its own files ...
    assert (base / "etc" / "old.conf").is_file()
    assert not (update / "usr" / "bin" / "busybox").exists()
    assert (update / "usr" / "bin" / "tool").is_file()
    # ... and its whiteouts as overlay markers, which hide the lower files.
    assert is_whiteout(update / "etc" / "old.conf")
    assert os.getxattr(update / "var" / "cache" / "apt", "trusted.overlay.opaque") == b"y"
    assert is_whiteout(app / "usr" / "share" / "doc")
    machine = root / "m"
    assert not os.path.lexists(machine / "etc" / "old.conf")
    assert not os.path.lexists(machine / "usr" / "share" / "doc")
    assert sorted(os.listdir(machine / "var" / "cache" / "apt")) == ["fresh.bin"]
    assert (base / "var" / "cache" / "apt" / "pkgcache.bin").is_file()


def test_umount_and_mount_again_give_the_same_tree(registry, root):
    images.push_image(registry, "ovl/remount", "latest", images.sample_image())
    assert_ok(pull(registry, "ovl/remount", root, local="box"))
    machine = root / "box"
    (machine / "etc" / "hostname").write_text("changed in the machine\n")
    (machine / "root-was-here").write_bytes(b"x")
    os.unlink(machine / "usr" / "bin" / "ls")
    before = tree_snapshot(machine)

    assert "Unmounted machine box" in assert_ok(run_dkr("umount", "--image-root", root, "box")).err
    assert overlay.mount_type(machine) is None and os.listdir(machine) == []
    assert "not mounted" in assert_ok(run_dkr("umount", "--image-root", root, "box")).err

    assert "Mounted machine box" in assert_ok(run_dkr("mount", "--image-root", root, "box")).err
    assert tree_snapshot(machine) == before
    assert "already mounted" in assert_ok(run_dkr("mount", "--image-root", root, "--all")).err
    assert tree_snapshot(machine) == before


def test_mount_all_mounts_the_rest_when_one_cannot_be(registry, root):
    images.push_image(registry, "ovl/aa", "latest", Image([Layer([File("a", b"a")])]))
    images.push_image(registry, "ovl/bb", "latest", Image([Layer([File("b", b"b")])]))
    assert_ok(pull(registry, "ovl/aa", root))
    assert_ok(pull(registry, "ovl/bb", root))
    assert_ok(run_dkr("umount", "--image-root", root, "--all"))
    [gone] = layers_of(root, "aa")
    os.rename(gone, gone.with_name("elsewhere"))
    run = run_dkr("mount", "--image-root", root, "--all")
    assert run.rc == 1
    errors = [line for line in run.err.splitlines() if line.startswith("dkr: error: ")]
    assert len(errors) == 1 and "machine aa needs layer" in errors[0], run.err
    assert overlay.mount_type(root / "bb") == "overlay"
    assert (root / "bb" / "b").read_bytes() == b"b"
    assert overlay.mount_type(root / "aa") is None


def test_writes_stay_in_the_machine(registry, root):
    write_into_one_of_two(registry, "ovl/write", root)
    [state] = state_dirs(root, "one")
    upper = state / "upper"
    assert (upper / "new-file").read_bytes() == b"new"
    assert (upper / "etc" / "hostname").read_text() == "mine\n"
    assert is_whiteout(upper / "usr" / "bin" / "busybox")


def test_force_and_remove_clean_up_the_upper_dir(registry, root):
    images.push_image(registry, "ovl/force", "v1", Image([Layer([File("version", b"1")])]))
    images.push_image(registry, "ovl/force", "v2", Image([Layer([File("version", b"2")])]))
    assert_ok(pull(registry, "ovl/force:v1", root, local="box"))
    (root / "box" / "scribble").write_text("gone after --force")
    [old_state] = state_dirs(root, "box")
    assert_ok(pull(registry, "ovl/force:v2", root, "--force", local="box"))
    assert (root / "box" / "version").read_bytes() == b"2"
    assert not (root / "box" / "scribble").exists()
    [new_state] = state_dirs(root, "box")
    assert new_state != old_state

    assert_ok(run_dkr("remove", "--image-root", root, "box"))
    assert not os.path.lexists(root / "box")
    assert not (root / ".dkr" / "overlay" / "box").exists()
    assert not (root / ".dkr" / "machines" / "box.json").exists()


@pytest.mark.parametrize("damage, unreadable", [
    (lambda text: text[:40], True),                                 # cut short
    (lambda text: text.replace('"layers"', '"layers_"'), False),    # no list of layers
], ids=["cut-short", "no-layers"])
def test_a_broken_record_stops_gc_and_is_no_dead_end(registry, root, damage, unreadable):
    """gc cannot tell what a machine with a broken record stands on, and an overlay
    machine stands on its layers: gc must stop, not take them. remove still deals
    with the machine, and so does pull --force, mounted or not."""
    images.push_image(registry, "ovl/broken", "v1", Image([Layer([File("version", b"1")])]))
    images.push_image(registry, "ovl/broken", "v2", Image([Layer([File("version", b"2")])]))
    assert_ok(pull(registry, "ovl/broken:v1", root, local="box"))
    needed = layers_of(root, "box")
    path = root / ".dkr" / "machines" / "box.json"
    path.write_text(damage(path.read_text()))
    for dry in ([], ["--dry-run"]):
        failed = run_dkr("gc", "--image-root", root, *dry)
        assert_clean_failure(failed, root, r"gc cannot tell which layers machine 'box' needs "
                                           r"\(mend the record, or 'dkr remove box'\)")
    assert all(layer.is_dir() for layer in needed)
    assert (root / "box" / "version").read_bytes() == b"1"

    # The old machine stays up until the new one takes its place: nothing has to
    # know how to mount it again.
    replaced = assert_ok(pull(registry, "ovl/broken:v2", root, "--force", local="box"))
    assert ("replacing machine box as found on disk" in replaced.err) == unreadable
    assert (root / "box" / "version").read_bytes() == b"2"
    path.write_text(damage(path.read_text()))
    removed = assert_ok(run_dkr("remove", "--image-root", root, "box"))
    assert ("removing machine box as found on disk" in removed.err) == unreadable
    assert not os.path.lexists(root / "box") and not path.exists()
    assert state_dirs(root, "box") == []
    assert_ok(run_dkr("gc", "--image-root", root))
    assert not any(layer.exists() for layer in needed)


# dkr with the swap of a --force pull failing (a file system without
# RENAME_EXCHANGE, say): an OSError after the old machine was taken down.
EXCHANGE_FAILS = """
import errno, sys
from dkr import treeops
def refuse(a, b):
    raise OSError(errno.EINVAL, "Invalid argument", str(b))
treeops.exchange_paths = refuse
from dkr.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("mounted, after_a_crash", [(True, False), (False, False), (True, True)],
                         ids=["up", "down", "up-after-a-crash"])
def test_a_failed_swap_leaves_the_old_machine_up_or_down_as_it_was(registry, root, mounted,
                                                                   after_a_crash):
    """Also when an earlier --force was killed while it removed the tree it replaced:
    its record is right, and what it made goes back up."""
    images.push_image(registry, "ovl/swapfail", "v1", Image([Layer([File("version", b"1")])]))
    images.push_image(registry, "ovl/swapfail", "v2", Image([Layer([File("version", b"2")])]))
    assert_ok(pull(registry, "ovl/swapfail:v2" if after_a_crash else "ovl/swapfail:v1", root,
                   local="box"))
    if after_a_crash:
        died = subprocess.run([sys.executable, "-c", DIES_AT, "remove_machine", "pull", "--insecure",
                               "--image-root", str(root), "--force",
                               f"{registry.host}/ovl/swapfail:v1", "box"])
        assert died.returncode == -signal.SIGKILL
        assert_ok(run_dkr("umount", "--image-root", root, "box"))
        assert_ok(run_dkr("mount", "--image-root", root, "box"))
    if not mounted:
        assert_ok(run_dkr("umount", "--image-root", root, "box"))
    record = (root / ".dkr" / "machines" / "box.json").read_bytes()
    failed = subprocess.run([sys.executable, "-c", EXCHANGE_FAILS, "pull", "--insecure",
                             "--image-root", str(root), "--force",
                             f"{registry.host}/ovl/swapfail:v2", "box"],
                            capture_output=True, text=True)
    assert failed.returncode == 1 and "dkr: error: Invalid argument" in failed.stderr
    assert (overlay.mount_type(root / "box") == "overlay") == mounted
    if mounted:
        assert (root / "box" / "version").read_bytes() == b"1"
    assert (root / ".dkr" / "machines" / "box.json").read_bytes() == record


# stat()s PATH in a loop until STOP exists (holding nothing open, which would keep
# a mount busy); says how often each size was seen, how often PATH was missing,
# and the longest time it was.
POLLER = """
import json, os, sys, time
path, stop = sys.argv[1], sys.argv[2]
seen, misses, gap, longest = {}, 0, None, 0.0
print("ready", flush=True)
while not os.path.exists(stop):
    try:
        size = os.stat(path).st_size
    except OSError:
        misses += 1
        gap = gap or time.monotonic()
        continue
    if gap:
        longest, gap = max(longest, time.monotonic() - gap), None
    seen[size] = seen.get(size, 0) + 1
print(json.dumps({"seen": seen, "misses": misses, "longest_gap": longest}))
"""


def test_force_never_leaves_the_machine_path_empty(registry, root, tmp_path):
    """Another process reads a file of the machine all the while --force replaces it
    (three times): it reads the old content, then the new, and never finds it gone."""
    for version in ("1", "2"):                  # told apart by their sizes
        images.push_image(registry, "ovl/poll", f"v{version}", Image([Layer([
            Dir("etc"), File("etc/version", version.encode() * int(version))])]))
    assert_ok(pull(registry, "ovl/poll:v1", root, local="box"))
    stop = tmp_path / "stop"
    poller = subprocess.Popen([sys.executable, "-c", POLLER, str(root / "box" / "etc" / "version"),
                               str(stop)], stdout=subprocess.PIPE, text=True)
    try:
        assert poller.stdout.readline() == "ready\n"
        for version in ("2", "1", "2"):
            assert_ok(pull(registry, f"ovl/poll:v{version}", root, "--force", local="box"))
    finally:
        stop.touch()
        out, _ = poller.communicate(timeout=60)
    report = json.loads(out)
    assert report["misses"] == 0, report
    assert set(report["seen"]) == {"1", "2"}, report
    assert (root / "box" / "etc" / "version").read_bytes() == b"22"
    assert len(state_dirs(root, "box")) == 1 and temp_entries(root) == []


def test_force_over_a_busy_machine_replaces_it_and_removes_it_once_free(registry, root):
    """What has a file open in the old machine keeps reading it; the new machine is in
    place at once, and the old one goes with the first list after it is let go."""
    for version in ("1", "2"):
        images.push_image(registry, "ovl/inuse", f"v{version}",
                          Image([Layer([File("version", version.encode())])]))
    assert_ok(pull(registry, "ovl/inuse:v1", root, local="box"))
    with open(root / "box" / "version") as held:
        run = assert_ok(pull(registry, "ovl/inuse:v2", root, "--force", local="box"))
        assert "The machine that box replaced is left at" in run.err
        assert (root / "box" / "version").read_bytes() == b"2"
        assert held.read() == "1"
        assert record(root, "box")["swap"]["state"] == "exchanged"
        assert len(state_dirs(root, "box")) == 2
    listed = json.loads(assert_ok(run_dkr("list", "--image-root", root, "--json")).out)
    assert [m["reference"] for m in listed] == [f"{registry.host}/ovl/inuse:v2"]
    assert "swap" not in record(root, "box") and temp_entries(root) == []
    assert len(state_dirs(root, "box")) == 1
    assert overlay.mount_type(root / "box") == "overlay"


def test_a_refused_remove_leaves_each_machine_up_or_down_as_it_was(registry, root, tmp_path):
    """'dkr remove down up dirbox' is refused for a mount inside dirbox, after taking
    the overlay machines down: "up" goes back up, "down" (unmounted by the user)
    stays down."""
    images.push_image(registry, "ovl/updown", "latest", Image([Layer([File("a", b"a")])]))
    images.push_image(registry, "ovl/dirbox", "latest", Image([Layer([File("a", b"dir")])]))
    for repo, local, backend in (("updown", "down", "overlay"), ("updown", "up", "overlay"),
                                 ("dirbox", "dirbox", "dir")):
        assert_ok(pull(registry, f"ovl/{repo}", root, "--backend", backend, local=local))
    assert_ok(run_dkr("umount", "--image-root", root, "down"))
    host = tmp_path / "host"
    host.mkdir()
    (root / "dirbox" / "mnt").mkdir()
    subprocess.run(["mount", "--bind", str(host), str(root / "dirbox" / "mnt")], check=True)
    try:
        refused = run_dkr("remove", "--image-root", root, "down", "up", "dirbox")
        assert_clean_failure(refused, root, r"dirbox has a file system mounted in it")
    finally:
        loopfs.unmount_below(root / "dirbox")
    assert overlay.mount_type(root / "up") == "overlay" and (root / "up" / "a").exists()
    assert overlay.mount_type(root / "down") is None and os.listdir(root / "down") == []
    assert (root / "dirbox" / "a").exists()


def test_a_machine_that_cannot_be_mounted_leaves_the_old_one_as_it_was(registry, root):
    """Activating the new machine fails (here: a backend whose mounts the kernel
    refuses): the old machine, its writes and its record stay; nothing new stays."""
    from dkr import api

    class Refused(overlay.OverlayBackend):
        name = "overlay-refused"

        def activate_machine(self, image_root, local, path, layers):
            raise DkrError(f"cannot mount machine {path.name}: refused")

    images.push_image(registry, "ovl/keep", "v1", Image([Layer([File("version", b"1")])]))
    images.push_image(registry, "ovl/keep", "v2", Image([Layer([File("version", b"2")])]))
    assert_ok(pull(registry, "ovl/keep:v1", root, local="box"))
    (root / "box" / "mine").write_text("keep me")
    before = record(root, "box")
    options = api.PullOptions(image_root=root, backend="overlay-refused", insecure=True,
                              force=True)
    with backend_registered_by_hand(Refused(), "refused-test"):
        for local in ("box", "fresh"):
            with pytest.raises(DkrError, match="refused"):
                api.pull(f"{registry.host}/ovl/keep:v2", local, options=options)
    assert overlay.mount_type(root / "box") == "overlay"
    assert (root / "box" / "version").read_bytes() == b"1"
    assert (root / "box" / "mine").read_text() == "keep me"
    assert record(root, "box") == before and len(state_dirs(root, "box")) == 1
    assert not os.path.lexists(root / "fresh") and state_dirs(root, "fresh") == []
    assert not (root / ".dkr" / "machines" / "fresh.json").exists()
    assert temp_entries(root) == []


def test_a_machine_whose_record_cannot_be_written_is_taken_away(registry, root):
    """No machine may stay mounted that no record names (remove, list and gc go by it)."""
    images.push_image(registry, "ovl/norecord", "latest", Image([Layer([File("f", b"f")])]))
    (root / ".dkr" / "machines" / "norecord.json").mkdir(parents=True)   # as a full disk would
    failed = pull(registry, "ovl/norecord", root)
    assert_clean_failure(failed, root, r"norecord", "norecord")
    assert state_dirs(root, "norecord") == []


def test_too_many_layers_fail_before_the_machine_is_touched(registry, root):
    images.push_image(registry, "ovl/tall", "v1", Image([Layer([File("version", b"1")])]))
    tall = Image([Layer([File(f"f{i}", b"x")]) for i in range(overlay.MAX_STACK + 1)])
    images.push_image(registry, "ovl/tall", "v2", tall)
    assert_ok(pull(registry, "ovl/tall:v1", root, local="tall"))
    failed = pull(registry, "ovl/tall:v2", root, "--force", local="tall")
    assert_clean_failure(failed, root, r"stacks at most 500")
    assert (root / "tall" / "version").read_bytes() == b"1"
    assert overlay.mount_type(root / "tall") == "overlay"


def test_a_relative_image_root_works(registry, root):
    images.push_image(registry, "ovl/here", "latest", Image([Layer([File("f", b"here")])]))
    run = subprocess.run([sys.executable, "-m", "dkr", "pull", "--insecure", "--image-root",
                          root.name, f"{registry.host}/ovl/here", "here"], cwd=root.parent,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert overlay.mount_type(root / "here") == "overlay"
    assert (root / "here" / "f").read_bytes() == b"here"


def test_a_failing_image_does_not_take_a_shared_layer_down_with_it(registry, root, tmp_path):
    """In a batch, broken builds the big base that app shares and fails at once on a
    layer of its own (overlay extracts layers side by side): its failure stops its own
    work, but not the base build that app waits for."""
    base = [Layer([File("big", random.Random(4).randbytes(20_000_000))])]
    own = Layer([File("broken", b"never")])
    images.push_image(registry, "ovl/broken", "latest", Image(base + [own]))
    images.push_image(registry, "ovl/app", "latest",
                      Image(base + [Layer([File("app", b"app")])]))
    with FaultProxy("127.0.0.1", registry.port) as proxy:
        proxy.add_fault(f"/blobs/{own.digest}", "status", times=None, code=404)
        listing = tmp_path / "images.txt"
        listing.write_text(f"{proxy.host}/ovl/broken broken\n{proxy.host}/ovl/app app\n")
        run = run_dkr("pull", "--insecure", "--image-root", root, "--retries", "0",
                      "--batch", listing)
    assert run.rc == 1, run.err
    assert "Pulled 1 of 2 images; 1 failed: broken." in run.err
    errors = [line for line in run.err.splitlines() if line.startswith("dkr: error: ")]
    assert len(errors) == 1 and "ovl/broken" in errors[0] and "404" in errors[0], run.err
    assert (root / "app" / "app").read_bytes() == b"app"
    assert not os.path.lexists(root / "broken")


def test_a_failing_image_spares_the_layer_it_builds_for_another(registry, root, tmp_path):
    """good owns base and shares mid, which bad builds (another process held base's lock
    when good claimed it). bad then fails on a layer of its own while base is still
    coming: mid goes on, and so does base, which bad had been waiting on too."""
    base = Layer([File("base", random.Random(7).randbytes(300_000))])
    mid = Layer([File("mid", b"mid")])
    late = Layer([File("late", random.Random(6).randbytes(200_000))])
    images.push_image(registry, "spare/good", "latest", Image([base, mid]))
    images.push_image(registry, "spare/bad", "latest", Image([base, mid, late]))
    elsewhere = tmp_path / "elsewhere"
    assert_ok(pull(registry, "spare/good", elsewhere, "--backend", "dir"))
    key = record(elsewhere, "good")["layers"][0]
    with FaultProxy("127.0.0.1", registry.port) as proxy:
        proxy.add_fault("/spare/bad/manifests/", "slow", times=None, rate=1000)
        proxy.add_fault(f"/blobs/{base.digest}", "slow", times=None, rate=100_000)
        proxy.add_fault(f"/blobs/{late.digest}", "slow", times=None, rate=150_000)
        proxy.add_fault(f"/blobs/{late.digest}", "corrupt", times=None, offset=1000)
        listing = tmp_path / "images.txt"
        listing.write_text(f"{proxy.host}/spare/good good\n{proxy.host}/spare/bad bad\n")
        (root / ".dkr" / "locks").mkdir(parents=True)
        with open(root / ".dkr" / "locks" / f"layer-{key}.lock", "w") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            threading.Timer(1.0, fcntl.flock, (held, fcntl.LOCK_UN)).start()
            run = run_dkr("pull", "--insecure", "--image-root", root, "--retries", "0",
                          "--batch", listing)
    assert run.rc == 1, run.err
    assert "Pulled 1 of 2 images; 1 failed: bad." in run.err
    errors = [line for line in run.err.splitlines() if line.startswith("dkr: error: ")]
    assert len(errors) == 1 and "spare/bad" in errors[0], run.err
    assert (root / "good" / "mid").read_bytes() == b"mid"
    assert (root / "good" / "base").read_bytes() == random.Random(7).randbytes(300_000)


def test_a_tight_spool_limit_never_stalls_layers_that_all_start_at_once(registry, root):
    """Diff layers do not wait for each other: those with an extractor stream into
    it, the others wait for room in the spool (one blob here); none may wait for
    a room that only its own extraction would free. (Which blob may run ahead
    when: tests/test_spool.py.)"""
    layers = [Layer([File(f"f{n}", random.Random(n).randbytes(200_000))]) for n in range(4)]
    images.push_image(registry, "ovl/limit", "latest", Image(layers))
    run = assert_ok(pull(registry, "ovl/limit", root, "--json", "--spool-limit", "1",
                         local="limit"))
    assert len([e for e in run.events if e["event"] == "download-done"]) == 4
    for n in range(4):
        assert (root / "limit" / f"f{n}").read_bytes() == random.Random(n).randbytes(200_000)
    assert list((root / ".dkr" / "partial").iterdir()) == []


def test_busy_machine_is_not_removed(registry, root):
    images.push_image(registry, "ovl/busy", "latest", Image([Layer([File("f", b"data")])]))
    assert_ok(pull(registry, "ovl/busy", root, local="busy"))
    assert_ok(pull(registry, "ovl/busy", root, local="idle"))
    with open(root / "busy" / "f") as held:
        failed = run_dkr("remove", "--image-root", root, "idle", "busy")
        assert_clean_failure(failed, root, r"machine busy is busy")
        # Nothing half done: the other machine was mounted again, both remain.
        for local in ("idle", "busy"):
            assert overlay.mount_type(root / local) == "overlay"
            assert (root / local / "f").read_bytes() == b"data"
        assert held.read() == "data"
    assert_ok(run_dkr("remove", "--image-root", root, "idle", "busy"))
    assert not os.path.lexists(root / "busy") and not os.path.lexists(root / "idle")


def test_many_layers_fit_in_one_mount(registry, root):
    # Under a long image root, 16 lower dirs make far more than one page of mount options.
    deep = root / ("r" * 200) / ("m" * 200)
    layers = [Layer([Dir("d"), File(f"d/{i:02}", b"%d" % i)], compression="none")
              for i in range(15)]
    layers.append(Layer([images.Whiteout("d/07")], compression="none"))
    assert sum(len(str(deep / f".dkr-{'0' * 64}")) + 1 for _ in layers) > os.sysconf("SC_PAGE_SIZE")
    images.push_image(registry, "ovl/tall", "latest", Image(layers))
    assert_ok(pull(registry, "ovl/tall", deep))
    names = sorted(os.listdir(deep / "tall" / "d"))
    assert names == [f"{i:02}" for i in range(15) if i != 7]


# --- limits and refusals -------------------------------------------------------------

def test_too_many_layers_is_a_clear_error(root):
    backend = overlay.OverlayBackend()
    machine = root / ".dkr-local-tall.tmp-0001"
    layers = []
    for i in range(overlay.MAX_STACK + 1):
        layers.append(root / f".dkr-{i:064x}")
        layers[-1].mkdir()
    with pytest.raises(DkrError, match=r"has 501 layers; an overlay mount stacks at most 500"):
        backend.create_machine(root, "tall", machine, layers)
    assert not os.path.lexists(machine)
    backend.create_machine(root, "tall", machine, layers[:-1])
    with pytest.raises(DkrError, match=r"has 501 layers; an overlay mount stacks at most 500"):
        backend.activate_machine(root, "tall", machine, layers)
    # Without lowerdir+ (before Linux 6.8) one page of options is the limit.
    state = backend._state(root, "tall", machine)
    with pytest.raises(DkrError, match=r"more than this kernel's overlay mount can stack"):
        overlay.mount_old_api(machine, layers[:80], state / "upper", state / "work")
    backend.remove_machine(root, "tall", machine)
    assert not machine.exists() and not (root / ".dkr" / "overlay" / "tall").exists()


@pytest.mark.parametrize("way", ["by-fd", "by-name", "mount(2)"])
def test_every_mount_api_mounts(root, way):
    lower = [root / ".dkr-aa", root / ".dkr-bb"]
    for i, layer in enumerate(lower):
        layer.mkdir()
        (layer / "file").write_text(f"layer {i}")
        (layer / f"only-{i}").write_text("x")
    backend = overlay.OverlayBackend()
    machine = root / "m"
    backend.create_machine(root, "m", machine, lower)
    state = backend._state(root, "m", machine)
    args = (machine, list(reversed(lower)), state / "upper", state / "work")
    try:
        if way == "mount(2)":
            overlay.mount_old_api(*args)
        else:
            overlay.mount_new_api(*args, by_fd=way == "by-fd")
    except overlay._Unsupported:
        pytest.skip(f"this kernel cannot mount an overlay {way}")
    try:
        assert (machine / "file").read_text() == "layer 1"
        assert sorted(os.listdir(machine)) == ["file", "only-0", "only-1"]
    finally:
        backend.remove_machine(root, "m", machine)
    assert overlay.mount_type(machine) is None and not machine.exists()


def test_refused_on_an_overlay_image_root(registry, root):
    images.push_image(registry, "ovl/nested", "latest", Image([Layer([File("f", b"f")])]))
    lower, upper, work, merged = (root / n for n in ("lower", "upper", "work", "merged"))
    for d in (lower, upper, work, merged):
        d.mkdir()
    overlay.mount_overlay(merged, [lower], upper, work)
    try:
        reason = overlay.OverlayBackend().unusable_reason(merged)
        assert reason and "itself on overlayfs" in reason
        failed = pull(registry, "ovl/nested", merged / "machines", "--backend", "overlay")
        assert_clean_failure(failed, merged / "machines", r"cannot be used on .*on overlayfs")
        run = assert_ok(pull(registry, "ovl/nested", merged / "machines", "-v", "--json"))
        chosen = [e for e in run.events if e["event"] == "backend"][0]
        assert chosen["name"] == "dir" and "not overlay" in chosen["why"]
    finally:
        overlay.unmount(merged)
