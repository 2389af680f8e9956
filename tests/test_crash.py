"""Crashes and interruptions: no half layer, no half machine, and the next run finishes.

SIGKILL (a power cut: dkr and every child at once) during a download, during
extraction, between layers and while the machine is copied; SIGINT / SIGTERM
during a slow pull. Afterwards no layer is visible unless it is complete, no
machine is half made (an existing one is untouched), and the next run removes
the leftovers it recognises, resumes the download with ``Range`` from the
spool file, and completes.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import assert_ok, interpreter_with_site_hook, pull, run_dkr, temp_entries
from reliability_helpers import (
    DkrProcess,
    backend_mount,
    catches_sigint,
    chain_ids,
    check_layers_complete,
    children,
    error_lines,
    extractor_pids,
    fingerprint,
    ignores_sigint,
    layer_dir,
    sent,
    session_pids,
    spool_files,
    spool_size,
    visible_layers,
    wait_gone,
)

from dkr.testing import images
from dkr.testing.faultproxy import FaultProxy
from dkr.testing.images import Dir, File, Image, Layer

SLOW_BYTES = 1_000_000
RATE = 250_000                      # bytes/s through the proxy: a 1 MB blob takes 4 s
MANY = 10_000                       # files in the "many" layer: extraction and copy take a while

SLOW = Layer([Dir("slow"), File("slow/blob", random.Random(7).randbytes(SLOW_BYTES))])
SMALL = Layer([Dir("etc"), File("etc/small", b"small\n")])
MANY_FILES = Layer([Dir("many")] + [File(f"many/f{i}", b"") for i in range(MANY)])
TOP = Layer([File("version", b"new\n")])

DOWNLOAD = Image([SLOW])
BETWEEN = Image([SMALL, SLOW])
EXTRACT = Image([MANY_FILES])
OLD = Image([Layer([File("version", b"old\n")])])
NEW = Image([MANY_FILES, TOP])
THIRD = Image([Layer([File("version", b"third\n")])])


@pytest.fixture(scope="module")
def pushed(registry):
    for repo, image in [("crash/download", DOWNLOAD), ("crash/between", BETWEEN),
                        ("crash/extract", EXTRACT), ("crash/old", OLD), ("crash/new", NEW),
                        ("crash/third", THIRD)]:
        images.push_image(registry, repo, "latest", image)
    return registry


@pytest.fixture
def proxy(pushed):
    with FaultProxy("127.0.0.1", pushed.port) as p:
        yield p


def start(server, repo, root, local, *extra) -> DkrProcess:
    if "--backend" not in extra:
        extra = ("--backend", "dir", *extra)
    # Upper layers are staged: a kill also finds stage directories to clean up.
    return DkrProcess("pull", "--insecure", "--image-root", root, "--json", "--retries", "2",
                      "--stage-ahead", "always", *extra, f"{server.host}/{repo}", local)


def assert_nothing_half_made(root, local=None) -> None:
    check_layers_complete(root)
    if local:
        assert not os.path.lexists(root / local), f"a killed pull left machine {local}"


def leftovers(root) -> list[str]:
    return [p.name for p in root.iterdir() if ".tmp-" in p.name]


# --- SIGKILL ------------------------------------------------------------------------------

def test_kill_during_download_then_resume_with_range(proxy, image_root):
    proxy.add_fault(f"/blobs/{SLOW.digest}", "slow", times=None, rate=RATE)
    # (A layer that can be built at once streams into its extractor: only what is
    # spooled survives a kill, and --spool-all spools it.)
    proc = start(proxy, "crash/download", image_root, "dl", "--spool-all")
    try:
        proc.wait_until(lambda: spool_size(image_root, SLOW) >= 200_000, what="200 kB spooled")
        proc.kill_group()
        assert proc.finish() [0] == -signal.SIGKILL
    finally:
        proc.stop()
    assert visible_layers(image_root) == []
    assert_nothing_half_made(image_root, "dl")
    have = spool_size(image_root, SLOW)
    assert 0 < have < SLOW.size

    proxy.clear_faults()
    proxy.clear_log()
    run = assert_ok(pull(proxy, "crash/download", image_root, "--backend", "dir", "--retries", "2",
                         local="dl"))
    request, = [e for e in proxy.log_for(f"/blobs/{SLOW.digest}") if e.method == "GET"]
    assert request.range == f"bytes={have}-" and request.status == 206
    assert f"resuming at byte {have}" in run.err
    assert temp_entries(image_root) == [] and spool_files(image_root) == []
    expected = random.Random(7).randbytes(SLOW_BYTES)
    assert (image_root / "dl" / "slow" / "blob").read_bytes() == expected


@pytest.fixture(params=["dir", "btrfs", "overlay"])
def backend_root(request, image_root):
    """An image root for each backend: tmp_path for dir, a loop file system for the others."""
    with backend_mount(request.param) as mount:
        yield request.param, (mount / "machines" if mount else image_root)


def test_kill_during_extraction(pushed, backend_root):
    backend, root = backend_root
    proc = start(pushed, "crash/extract", root, "ex", "--backend", backend)
    tmp_many = []
    try:
        proc.wait_event(lambda e: e["event"] == "download-done")

        def extracting() -> bool:
            tmp_many[:] = [p / "many" for p in root.iterdir()
                           if ".tmp-" in p.name and (p / "many").is_dir()]
            return bool(tmp_many) and len(os.listdir(tmp_many[0])) >= 500
        proc.wait_until(extracting, what="extraction under way")
        proc.kill_group()
        proc.finish()
    finally:
        proc.stop()
    assert "layer-done" not in [e["event"] for e in proc.events], "killed too late"
    assert visible_layers(root) == []
    assert_nothing_half_made(root, "ex")
    left = leftovers(root)
    assert len(left) == 1 and left[0].startswith(".dkr-")
    assert 500 <= len(os.listdir(tmp_many[0])) < MANY

    run = assert_ok(pull(pushed, "crash/extract", root, "--backend", backend, local="ex"))
    assert f"Removing {left[0]} left by an interrupted pull." in run.err
    assert temp_entries(root) == []
    assert len(os.listdir(root / "ex" / "many")) == MANY


def test_kill_between_layers(proxy, image_root):
    proxy.add_fault(f"/blobs/{SLOW.digest}", "slow", times=None, rate=RATE)
    proc = start(proxy, "crash/between", image_root, "bt")
    first, second = chain_ids(BETWEEN)
    try:
        proc.wait_event(lambda e: e["event"] == "layer-done")
        proc.kill_group()
        proc.finish()
    finally:
        proc.stop()
    assert visible_layers(image_root) == [layer_dir(image_root, first)]
    assert_nothing_half_made(image_root, "bt")
    assert (layer_dir(image_root, first) / "etc" / "small").read_bytes() == b"small\n"

    proxy.clear_faults()
    rerun = start(proxy, "crash/between", image_root, "bt")
    rc, err = rerun.finish()
    assert rc == 0 and "Traceback" not in err, err
    done = {e["event"]: e for e in rerun.events if e["event"] in ("skipped", "layer-done")}
    assert done["skipped"]["chain_id"].endswith(first.split(":")[1])
    assert done["layer-done"]["chain_id"].endswith(second.split(":")[1])
    assert temp_entries(image_root) == [] and spool_files(image_root) == []
    assert (image_root / "bt" / "slow" / "blob").stat().st_size == SLOW_BYTES


def test_kill_during_machine_copy_keeps_the_old_machine(pushed, image_root):
    assert_ok(pull(pushed, "crash/old", image_root, "--backend", "dir", local="mc"))
    proc = start(pushed, "crash/new", image_root, "mc", "--force")
    try:
        proc.wait_until(lambda: any(p.name.startswith(".dkr-local-mc.tmp-")
                                    for p in image_root.iterdir()), what="the machine copy")
        proc.kill_group()
        proc.finish()
    finally:
        proc.stop()
    assert "machine" not in [e["event"] for e in proc.events], "killed too late"
    # The old machine is whole and untouched; the new image's layers are complete.
    assert (image_root / "mc" / "version").read_bytes() == b"old\n"
    assert not (image_root / "mc" / "many").exists()
    assert set(visible_layers(image_root)) >= {layer_dir(image_root, c) for c in chain_ids(NEW)}
    assert_nothing_half_made(image_root)
    assert [n for n in leftovers(image_root) if n.startswith(".dkr-local-mc.tmp-")]

    assert_ok(pull(pushed, "crash/new", image_root, "--backend", "dir", "--force", local="mc"))
    assert (image_root / "mc" / "version").read_bytes() == b"new\n"
    assert len(os.listdir(image_root / "mc" / "many")) == MANY
    assert temp_entries(image_root) == []


def test_kill_dkr_alone_leaves_no_orphan_writing(proxy, image_root):
    """The OOM killer takes dkr but not its children: they notice and exit by themselves."""
    proxy.add_fault(f"/blobs/{SLOW.digest}", "slow", times=None, rate=RATE)
    proc = start(proxy, "crash/download", image_root, "orphan")
    try:
        proc.wait_until(lambda: sent(proxy, SLOW) >= 100_000 and
                        len(extractor_pids(proc.pid)) > 0, what="a download and an extractor")
        proc.signal(signal.SIGKILL)
        proc.finish()
        assert wait_gone(lambda: session_pids(proc.pid)) == [], "orphaned children live on"
    finally:
        proc.stop()
    assert_nothing_half_made(image_root, "orphan")
    proxy.clear_faults()
    assert_ok(pull(proxy, "crash/download", image_root, "--backend", "dir", local="orphan"))
    assert temp_entries(image_root) == [] and spool_files(image_root) == []


# A ``cp`` first in PATH that holds the copy whose command line names
# $DKR_TEST_HOLD at its start (as if the disk were slow), until the test
# creates $DKR_TEST_GATE.go: a copy that does not die with dkr starts then.
HOLDING_CP = """#!/bin/sh
case "$*" in *"$DKR_TEST_HOLD"*)
    touch "$DKR_TEST_GATE.held"
    while [ ! -e "$DKR_TEST_GATE.go" ]; do sleep 0.01; done;;
esac
exec /usr/bin/cp "$@"
"""


def _extracting(root, prefix) -> bool:
    for entry in root.iterdir():
        if entry.name.startswith(prefix + ".tmp-"):
            try:
                return len(os.listdir(entry / "many")) >= 200
            except FileNotFoundError:
                pass
    return False


@pytest.mark.parametrize("backend, moment", [("dir", "extraction"), ("dir", "layer copy"),
                                             ("dir", "machine copy"), ("btrfs", "extraction")])
def test_kill_dkr_alone_and_every_helper_stops_writing(pushed, tmp_path, backend, moment):
    """The OOM killer takes only dkr's main process: while an extractor writes the
    many-files layer, or while ``cp`` links that layer into the one above, or
    copies it into the machine. Every child dies with dkr at once, nothing
    writes into the image root after, nothing prints a traceback, and the next
    ``pull --force`` cleans up and succeeds. (On btrfs, layers are sealed in
    helpers too.)"""
    with backend_mount(backend) as mount:
        _kill_dkr_alone(pushed, mount / "machines" if mount else tmp_path / "machines",
                        tmp_path, backend, moment)


def _kill_dkr_alone(pushed, image_root, tmp_path, backend, moment):
    assert_ok(pull(pushed, "crash/old", image_root, "--backend", backend, local="fm"))
    many, top = (f".dkr-{c.split(':')[1]}" for c in chain_ids(NEW))
    bin_dir, gate = tmp_path / "bin", tmp_path / "gate"
    bin_dir.mkdir()
    (bin_dir / "cp").write_text(HOLDING_CP)
    (bin_dir / "cp").chmod(0o755)
    hold = {"extraction": "no copy", "layer copy": top + ".tmp-",
            "machine copy": ".dkr-local-fm.tmp-"}[moment]
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "DKR_TEST_HOLD": hold, "DKR_TEST_GATE": str(gate)}
    proc = DkrProcess("pull", "--insecure", "--image-root", image_root, "--json",
                      "--backend", backend, "--force", f"{pushed.host}/crash/new", "fm", env=env)
    try:
        if moment == "extraction":
            proc.wait_until(lambda: _extracting(image_root, many), what="extraction under way")
        else:
            proc.wait_until(lambda: os.path.exists(f"{gate}.held"), what=f"the {moment}")
        helpers = [pid for pid in session_pids(proc.pid) if pid != proc.pid]
        assert helpers
        proc.signal(signal.SIGKILL)
        _, err = proc.finish()
        before = fingerprint(image_root)
        Path(f"{gate}.go").touch()
        assert wait_gone(lambda: session_pids(proc.pid), timeout=2) == [], \
            "a child of dkr lives on"
    finally:
        Path(f"{gate}.go").touch()
        proc.stop()
    time.sleep(0.5)
    assert fingerprint(image_root) == before, "something wrote into the image root after dkr"
    assert "Traceback" not in err and "Error" not in err, err
    assert (image_root / "fm" / "version").read_bytes() == b"old\n"

    assert_ok(pull(pushed, "crash/new", image_root, "--backend", backend, "--force", local="fm"))
    assert (image_root / "fm" / "version").read_bytes() == b"new\n"
    assert len(os.listdir(image_root / "fm" / "many")) == MANY
    assert temp_entries(image_root) == []


# --- SIGINT / SIGTERM -----------------------------------------------------------------------

@pytest.mark.parametrize("signum, to_group", [(signal.SIGINT, True), (signal.SIGTERM, False)])
def test_interrupt_stops_cleanly(proxy, image_root, signum, to_group):
    """Ctrl-C reaches the whole process group; SIGTERM (systemd, kill) only dkr itself."""
    proxy.add_fault(f"/blobs/{SLOW.digest}", "slow", times=None, rate=RATE)
    proc = start(proxy, "crash/between", image_root, "it")
    try:
        # Extractors that have started up ignore SIGINT (dkr stops them itself); one still
        # starting is the subject of test_ctrl_c_while_an_extractor_starts.
        proc.wait_until(lambda: sent(proxy, SLOW) >= 100_000 and
                        len(extractor_pids(proc.pid)) > 0 and
                        all(ignores_sigint(p) for p in extractor_pids(proc.pid)),
                        what="a download and an extractor")
        if to_group:
            proc.kill_group(signum)
        else:
            proc.signal(signum)
        rc, err = proc.finish()
    finally:
        proc.stop()
    assert rc == 128 + signum, err
    assert error_lines(err) == [f"dkr: error: interrupted by {signal.Signals(signum).name}"], err
    assert "Traceback" not in err, err
    assert session_pids(proc.pid) == [], "a child (an extractor?) outlived dkr"
    assert temp_entries(image_root) == []
    assert visible_layers(image_root) in ([], [layer_dir(image_root, chain_ids(BETWEEN)[0])])
    assert_nothing_half_made(image_root, "it")
    assert re.search(r"interrupted", err)


SLOW_START = """\
import sys, time
if "--fork-server" in sys.argv:     # the extractors' fork server only: start up slowly
    time.sleep(3)
"""


def test_ctrl_c_while_an_extractor_starts(proxy, image_root, tmp_path):
    """Ctrl-C (SIGINT to the foreground process group) while the extractors' server starts up.

    The window is real but short (Python's start-up and imports, before
    dkr.unpack.extract ignores SIGINT); a sitecustomize that makes the fork server
    start slowly holds it open, so the test does not depend on timing.
    """
    python = interpreter_with_site_hook(tmp_path / "slow-start", SLOW_START)
    proxy.add_fault(f"/blobs/{SLOW.digest}", "slow", times=None, rate=RATE)
    proc = DkrProcess("pull", "--insecure", "--image-root", image_root, "--backend", "dir",
                      "--json", "--retries", "2", f"{proxy.host}/crash/between", "it",
                      python=python)
    try:
        # dkr starts the server first thing, then loads itself (a Ctrl-C during
        # Python's own imports is not ours to handle). Once dkr is pulling, wait
        # until the server is past the moment Python sets up its SIGINT handling.
        proc.wait_event(lambda e: e["event"] == "resolved")

        def server_starting() -> bool:
            kids = children(proc.pid)
            return len(kids) >= 1 and all(catches_sigint(p) or ignores_sigint(p) for p in kids)
        proc.wait_until(server_starting, what="the extractors' fork server starting up")
        proc.kill_group(signal.SIGINT)
        rc, err = proc.finish()
    finally:
        proc.stop()
    assert rc == 130, err
    assert error_lines(err) == ["dkr: error: interrupted by SIGINT"], err
    assert "Traceback" not in err, err


# A dkr killed (SIGKILL) in a step of making a machine: where a backend puts the
# new machine up (under its temp name, before a --force pull swaps the trees, or
# after the rename of a first pull), right after the swap itself
# ("exchange_paths"), or where the replaced machine is taken down and removed.
DIES_AT = """
import os, signal, sys
from dkr.pull import puller as pull
from dkr import treeops
from dkr_plugins import btrfs, dir, overlay
step = sys.argv.pop(1)
die = lambda *_: os.kill(os.getpid(), signal.SIGKILL)
if step == "exchange_paths":      # (how the built-in backends swap machines)
    exchange = treeops.exchange_paths
    treeops.exchange_paths = lambda a, b: (exchange(a, b), die())
else:
    for backend in (btrfs.BtrfsBackend, dir.DirBackend, overlay.OverlayBackend):
        setattr(backend, step, die)
from dkr.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def pull_and_die(server, root, step, repo, *extra, backend="dir"):
    died = subprocess.run([sys.executable, "-c", DIES_AT, step, "pull", "--insecure",
                           "--image-root", str(root), "--backend", backend, *extra,
                           f"{server.host}/{repo}", "mc"], capture_output=True, text=True)
    assert died.returncode == -signal.SIGKILL, died.stderr


def listed_reference(root) -> list[str]:
    return [m["reference"] for m in
            json.loads(assert_ok(run_dkr("list", "--image-root", root, "--json")).out)]


def machine_record(root) -> dict:
    return json.loads((root / ".dkr" / "machines" / "mc.json").read_text())


def test_a_machine_killed_in_place_is_recorded(pushed, image_root):
    """Killed once the new machine has its name: list, remove and gc know it."""
    pull_and_die(pushed, image_root, "activate_machine", "crash/old")
    assert (image_root / "mc" / "version").read_bytes() == b"old\n"
    assert listed_reference(image_root) == [f"{pushed.host}/crash/old:latest"]
    old_layers = set(visible_layers(image_root))
    assert_ok(run_dkr("gc", "--image-root", image_root))
    assert set(visible_layers(image_root)) == old_layers
    assert_ok(run_dkr("remove", "--image-root", image_root, "mc"))
    assert not os.path.lexists(image_root / "mc")


# Where the pull dies, which machine survives, and what comes next.
KILL_POINTS = [
    ("activate_machine", "old", "list"),      # the new tree up under its temp name: back
    ("exchange_paths", "new", "mount"),       # swapped, the record not told yet: forward
    ("exchange_paths", "new", "list"),
    ("deactivate_machine", "new", "pull"),    # the record says swapped, the old tree goes
    ("exchange_paths", "new", "remove"),      # (on overlay both trees are mounted then)
]


@pytest.mark.parametrize("dies_at, survivor, then", KILL_POINTS,
                         ids=[f"{p[0]}-{p[2]}" for p in KILL_POINTS])
def test_a_force_pull_killed_mid_swap_is_rolled_forward_or_back(pushed, backend_root, dies_at,
                                                                 survivor, then):
    """The record is the swap's journal: the next list, mount or pull of the machine
    finishes the swap or takes it back, whichever the tree at LOCAL says, with
    nothing left over. Until then gc keeps the layers of both trees."""
    backend, root = backend_root
    assert_ok(pull(pushed, "crash/old", root, "--backend", backend, local="mc"))
    old_layers = set(visible_layers(root))
    new_layers = {layer_dir(root, c) for c in chain_ids(NEW)}
    pull_and_die(pushed, root, dies_at, "crash/new", "--force", backend=backend)
    assert (root / "mc" / "version").read_bytes() == f"{survivor}\n".encode()
    assert machine_record(root)["swap"]["state"] in ("ready", "exchanged")
    dry = assert_ok(run_dkr("gc", "--image-root", root, "--dry-run"))
    assert "would remove layer" not in dry.out
    assert set(visible_layers(root)) == old_layers | new_layers

    if then == "pull":       # finishes the swap first, then makes its own
        assert_ok(pull(pushed, "crash/third", root, "--backend", backend, "--force",
                       local="mc"))
        assert (root / "mc" / "version").read_bytes() == b"third\n"
        assert temp_entries(root) == [] and "swap" not in machine_record(root)
        assert_ok(run_dkr("gc", "--image-root", root))
        assert set(visible_layers(root)) == {layer_dir(root, c) for c in chain_ids(THIRD)}
        return
    if then == "remove":
        assert_ok(run_dkr("remove", "--image-root", root, "mc"))
        assert not os.path.lexists(root / "mc") and temp_entries(root) == []
        assert_ok(run_dkr("gc", "--image-root", root))
        assert visible_layers(root) == []
        return
    if then == "list":
        assert listed_reference(root) == [f"{pushed.host}/crash/{survivor}:latest"]
    else:
        assert_ok(run_dkr("mount", "--image-root", root, "mc"))
    assert "swap" not in machine_record(root) and "swap_layers" not in machine_record(root)
    assert temp_entries(root) == []
    assert (root / "mc" / "version").read_bytes() == f"{survivor}\n".encode()
    if survivor == "new":
        assert len(os.listdir(root / "mc" / "many")) == MANY
    assert listed_reference(root) == [f"{pushed.host}/crash/{survivor}:latest"]
    assert_ok(run_dkr("gc", "--image-root", root))
    assert set(visible_layers(root)) == (new_layers if survivor == "new" else old_layers)
    if backend == "overlay":
        assert_ok(run_dkr("umount", "--image-root", root, "mc"))
        assert_ok(run_dkr("mount", "--image-root", root, "mc"))
        assert (root / "mc" / "version").read_bytes() == f"{survivor}\n".encode()
        assert len(os.listdir(root / ".dkr" / "overlay" / "mc")) == 1


def test_an_overlay_swap_killed_before_a_reboot_comes_back_with_mount_all(pushed, image_root):
    """Killed right after the swap, then the machine's mounts are gone (a reboot):
    'dkr mount --all' finishes the swap and mounts the new machine."""
    with backend_mount("overlay") as mount:
        root = mount / "machines"
        assert_ok(pull(pushed, "crash/old", root, "--backend", "overlay", local="mc"))
        pull_and_die(pushed, root, "exchange_paths", "crash/new", "--force", backend="overlay")
        [other] = [p for p in root.iterdir() if p.name.startswith(".dkr-local-mc.tmp-")]
        for tree in (root / "mc", other):
            subprocess.run(["umount", str(tree)], check=True)
        assert_ok(run_dkr("mount", "--image-root", root, "--all"))
        assert (root / "mc" / "version").read_bytes() == b"new\n"
        assert listed_reference(root) == [f"{pushed.host}/crash/new:latest"]
        assert temp_entries(root) == []
        assert len(os.listdir(root / ".dkr" / "overlay" / "mc")) == 1


def test_a_force_pull_over_a_broken_record_killed_before_the_swap(pushed, image_root):
    """The old machine's record cannot be read, so gc does not know its layers: it
    must go on refusing until the new tree is in place."""
    assert_ok(pull(pushed, "crash/old", image_root, "--backend", "dir", local="mc"))
    record = image_root / ".dkr" / "machines" / "mc.json"
    record.write_text(record.read_text()[:30])
    pull_and_die(pushed, image_root, "activate_machine", "crash/new", "--force")
    assert (image_root / "mc" / "version").read_bytes() == b"old\n"
    refused = run_dkr("gc", "--image-root", image_root)
    assert refused.rc == 1 and "gc cannot tell which layers machine 'mc' needs" in refused.err


def test_a_second_force_pull_over_a_crashed_swap_keeps_what_both_trees_need(pushed, image_root):
    """The first --force died right after its swap; the second one finishes that swap
    first, and is killed before its own: the new tree of the first is kept whole."""
    assert_ok(pull(pushed, "crash/old", image_root, "--backend", "dir", local="mc"))
    pull_and_die(pushed, image_root, "exchange_paths", "crash/new", "--force")
    pull_and_die(pushed, image_root, "activate_machine", "crash/third", "--force")
    assert (image_root / "mc" / "version").read_bytes() == b"new\n"
    assert_ok(run_dkr("gc", "--image-root", image_root))        # finishes the swap first
    assert set(visible_layers(image_root)) == {layer_dir(image_root, c) for c in chain_ids(NEW)}
    assert len(os.listdir(image_root / "mc" / "many")) == MANY
    assert temp_entries(image_root) == [] and "swap" not in machine_record(image_root)


# dkr that cannot write the machine's record once the trees are swapped (a full
# disk), and, with "also-back", cannot swap them back either.
JOURNAL_FAILS = """
import errno, sys
from dkr import treeops
from dkr.store import swap
also_back = sys.argv.pop(1) == "also-back"
write, exchange = swap.MachineSwap._write, treeops.exchange_paths
def full(self):
    if self.state == swap.EXCHANGED:
        raise OSError(errno.ENOSPC, "No space left on device")
    write(self)
def once(a, b, calls=[]):
    calls.append(a)
    if also_back and len(calls) == 2:
        raise OSError(errno.EBUSY, "Device or resource busy", str(b))
    exchange(a, b)
swap.MachineSwap._write, treeops.exchange_paths = full, once
from dkr.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("also_back", [False, True], ids=["swapped-back", "left-to-recovery"])
def test_a_swap_whose_record_cannot_be_written_is_undone(pushed, image_root, also_back):
    """The old machine, and what was written in it, is put back; where even that
    fails, the journal still says where the new tree is, and the next list
    finishes the swap."""
    assert_ok(pull(pushed, "crash/old", image_root, "--backend", "dir", local="mc"))
    (image_root / "mc" / "mine").write_text("written in the machine\n")
    before = (image_root / ".dkr" / "machines" / "mc.json").read_bytes()
    failed = subprocess.run([sys.executable, "-c", JOURNAL_FAILS,
                             "also-back" if also_back else "-", "pull", "--insecure",
                             "--image-root", str(image_root), "--backend", "dir", "--force",
                             f"{pushed.host}/crash/new", "mc"], capture_output=True, text=True)
    errors = error_lines(failed.stderr)
    assert failed.returncode == 1 and len(errors) == 1, failed.stderr
    assert "No space left on device" in errors[0], errors
    if not also_back:
        assert (image_root / "mc" / "mine").read_text() == "written in the machine\n"
        assert (image_root / ".dkr" / "machines" / "mc.json").read_bytes() == before
        assert temp_entries(image_root) == []
        return
    assert "the next pull, mount or list of it will" in failed.stderr
    assert listed_reference(image_root) == [f"{pushed.host}/crash/new:latest"]
    assert (image_root / "mc" / "version").read_bytes() == b"new\n"
    assert temp_entries(image_root) == [] and "swap" not in machine_record(image_root)



@pytest.mark.parametrize("setpriv", [True, False])
def test_a_tied_program_is_set_to_die_with_dkr(monkeypatch, setpriv):
    """dkr.treeops.tied: through setpriv, or Python where there is none."""
    import shutil

    from dkr.treeops import tied
    if not setpriv:
        monkeypatch.setattr(shutil, "which", lambda name: None)
    asks = ("import ctypes; v = ctypes.c_int(); ctypes.CDLL(None).prctl(2, ctypes.byref(v)); "
            "print(v.value)")
    done = subprocess.run(tied([sys.executable, "-c", asks]), capture_output=True, text=True)
    assert (done.returncode, done.stdout) == (0, f"{int(signal.SIGKILL)}\n"), done.stderr


def test_an_extractor_whose_dkr_is_gone_reports_nothing_and_prints_nothing(tmp_path):
    """Its report goes into a pipe nobody reads any more: no BrokenPipeError traceback
    on the terminal dkr left behind."""
    gone, report = os.pipe()
    os.close(gone)
    try:
        done = subprocess.run([sys.executable, "-m", "dkr.unpack.extract", "--root",
                               str(tmp_path / "missing"), "--format", "stacked"],
                              stdin=subprocess.DEVNULL, stdout=report, stderr=subprocess.PIPE,
                              text=True)
    finally:
        os.close(report)
    assert done.returncode == 1 and done.stderr == ""


def test_a_leftover_still_written_for_a_moment_is_removed_once_its_writer_is_gone(
        tmp_path, monkeypatch, caplog):
    """The lock of a killed run goes before its helpers die: the next run may find
    one still writing into the tree it removes (ENOTEMPTY), and tries again."""
    import asyncio
    import errno

    from dkr.pull import puller as pull_module
    from dkr.treeops import remove_tree
    monkeypatch.setattr(pull_module, "LEFTOVER_RETRIES", (0.01, 0.01, 0.01))
    leftover = tmp_path / ".dkr-local-m.tmp-0123abcd"
    leftover.mkdir()
    writes = iter(range(2))

    def remove_while_written(path):
        n = next(writes, None)
        if n is not None:                 # the dying helper writes one more file
            (path / f"late{n}").touch()
            raise OSError(errno.ENOTEMPTY, "Directory not empty", str(path))
        remove_tree(path)
    asyncio.run(pull_module.remove_leftover(remove_while_written, leftover))
    assert not leftover.exists()

    leftover.mkdir()
    with caplog.at_level("WARNING"):
        asyncio.run(pull_module.remove_leftover(
            lambda path: (_ for _ in ()).throw(OSError(errno.EBUSY, "Device or resource busy")),
            leftover))
    assert leftover.exists()              # left for gc; the pull goes on with its own tree
    assert "Could not remove .dkr-local-m.tmp-0123abcd" in caplog.text


def test_two_runs_removing_one_leftover_at_once_both_succeed(tmp_path):
    """A run that let its lock go while it still cleans up (a stage directory after
    a failed layer) and the next run, which finds the same tree as a leftover."""
    import threading

    from dkr.treeops import remove_tree
    for attempt in range(3):
        tree = tmp_path / f"leftover{attempt}"
        for d in range(20):
            (tree / f"d{d}").mkdir(parents=True)
            for f in range(100):
                (tree / f"d{d}" / f"f{f}").touch()
        failures = []

        def remove():
            try:
                remove_tree(tree)
            except OSError as e:
                failures.append(e)
        threads = [threading.Thread(target=remove) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert failures == [] and not tree.exists()
