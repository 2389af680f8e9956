"""Records, blobs and their temporary files in ``IMAGE_ROOT/.dkr``; removals that are
killed; gc beside pulls.

- A failed pull leaves no layer record without its tree.
- A kill (SIGKILL of dkr's whole process group) while a record, blob or tree is
  being written leaves temporary entries that the next pull and gc remove: the
  moment is found with inotify on the image root and its ``.dkr/`` folders.
- A kill during ``dkr remove`` leaves the whole machine or nothing that counts.
- Two processes at work on one image root never remove each other's live
  temporary entries.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import random
import select
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import assert_clean_failure, assert_ok, pull, run_dkr, temp_entries
from reliability_helpers import (DkrProcess, backend_mount, check_layers_complete)

from dkr.testing import images
from dkr.testing.images import Dir, File, Hardlink, Image, Layer

BASE = Layer([Dir("base")] + [File(f"base/f{i}", b"%d\n" % i) for i in range(2000)])
BAD = {
    "hardlink-to-a-missing-name": Layer([Hardlink("h", "no/such/name")]),
    "member-outside-the-layer": Layer([Hardlink("h", "../" * 30 + "etc/passwd")]),
    "parent-not-a-directory": Layer([File("plain", b"x"), File("plain/child", b"y")]),
}
TOP = Layer([Dir("app"), File("app/data", random.Random(17).randbytes(300_000))])


@pytest.fixture(params=["dir", "btrfs", "overlay"])
def backend_root(request, image_root):
    with backend_mount(request.param) as mount:
        yield request.param, (mount / "machines" if mount else image_root)


@pytest.fixture(scope="module")
def pushed(registry):
    for name, bad in BAD.items():
        images.push_image(registry, f"records/{name}", "latest", Image([BASE, bad]))
    images.push_image(registry, "records/good", "latest", Image([BASE, TOP]))
    images.push_image(registry, "records/other", "latest",
                      Image([Layer([File("other", b"other\n")])]))
    return registry


def records_name_trees(root: Path) -> None:
    """Every layer record names a tree that exists."""
    layers = root / ".dkr" / "layers"
    for record in layers.glob("*.json") if layers.is_dir() else []:
        assert (root / f".dkr-{record.stem}").is_dir(), \
            f"{record.name} names a layer tree that does not exist"


# --- a failed pull ------------------------------------------------------------------------

@pytest.mark.parametrize("bad", sorted(BAD))
def test_a_refused_layer_leaves_no_record_of_a_missing_tree(pushed, backend_root, bad):
    backend, root = backend_root
    for attempt in range(3):          # the base is sealing when its child fails: a race
        run = pull(pushed, f"records/{bad}", root, "--backend", backend, local="m")
        assert_clean_failure(run, root, r"layer sha256:", local="m")
        records_name_trees(root)
        check_layers_complete(root)
    assert temp_entries(root) == []


# --- kills at the moment a record, blob or tree is written ---------------------------------

IN_CREATE = 0x100
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
_EVENT = struct.Struct("iIII")


class Inotify:
    """Names created in some directories, as they are created (inotify(7) through libc)."""

    def __init__(self, directories):
        self.libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self.fd = self.libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.watches = {}
        for directory in directories:
            wd = self.libc.inotify_add_watch(self.fd, os.fsencode(directory), IN_CREATE)
            if wd < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch {directory}")
            self.watches[wd] = Path(directory)

    def created(self, timeout: float) -> list[Path]:
        if not select.select([self.fd], [], [], timeout)[0]:
            return []
        data, found, offset = os.read(self.fd, 65536), [], 0
        while offset < len(data):
            wd, _mask, _cookie, length = _EVENT.unpack_from(data, offset)
            offset += _EVENT.size
            name = data[offset:offset + length].rstrip(b"\0").decode()
            offset += length
            found.append(self.watches[wd] / name)
        return found

    def close(self) -> None:
        os.close(self.fd)


TEMPS = {   # what is being written: (folder of the image root, how its temp entry is named)
    "layer-record": (".dkr/layers", r"\..+\.json\.tmp-"),
    "machine-record": (".dkr/machines", r"\..+\.json\.tmp-"),
    "blob": (".dkr/blobs/sha256", r"\.[0-9a-f]{64}\.tmp-"),
    "layer-tree": (".", r"\.dkr-[0-9a-f]{64}\.tmp-"),
    "machine-tree": (".", r"\.dkr-local-.+\.tmp-"),
    "partial-download": (".dkr/partial", r"[0-9a-f]{64}"),
}
FOLDERS = sorted({folder for folder, _ in TEMPS.values()})


def kill_when_written(server, root: Path, backend: str, kind: str) -> bool:
    """Pull records/good into ``root`` and kill dkr's process group as soon as a temp
    entry of ``kind`` appears. True if the kill left one (it may have been renamed
    already: a record is written in a millisecond)."""
    import re
    folder, pattern = TEMPS[kind]
    for sub in FOLDERS:
        (root / sub).mkdir(parents=True, exist_ok=True)
    watch = Inotify([root / sub for sub in FOLDERS])
    proc = DkrProcess("pull", "--insecure", "--image-root", root, "--backend", backend, "--json",
                      f"{server.host}/records/good", "m")
    try:
        deadline = time.monotonic() + 60
        while proc.proc.poll() is None and time.monotonic() < deadline:
            hit = [p for p in watch.created(0.5)
                   if p.parent == root / folder and re.match(pattern, p.name)]
            if hit:
                proc.kill_group()
                break
        proc.finish()
    finally:
        proc.stop()
        watch.close()
    folder_path = root / folder
    return any(re.match(pattern, name) for name in os.listdir(folder_path))


def whole(root: Path, local: str = "m") -> None:
    assert (root / local / "base" / "f1999").read_bytes() == b"1999\n"
    assert (root / local / "app" / "data").read_bytes() == random.Random(17).randbytes(300_000)


@pytest.mark.parametrize("kind", sorted(TEMPS))
def test_a_kill_while_writing_leaves_nothing_the_next_pull_and_gc_keep(pushed, backend_root,
                                                                        kind):
    backend, base = backend_root
    for attempt in range(8):
        root = base / f"attempt{attempt}"
        if kill_when_written(pushed, root, backend, kind):
            break
    else:
        pytest.fail(f"no kill in 8 attempts left a temporary {kind}")
    assert not os.path.lexists(root / "m") or (root / ".dkr" / "machines" / "m.json").exists()
    check_layers_complete(root)

    assert_ok(pull(pushed, "records/good", root, "--backend", backend, local="m"))
    whole(root)
    assert temp_entries(root) == [], "the next pull left what it owns"
    assert_ok(run_dkr("gc", "--image-root", root))
    whole(root)
    assert temp_entries(root) == []
    assert not any((root / ".dkr" / "partial").iterdir())
    records_name_trees(root)
    check_layers_complete(root)
    if backend == "overlay":          # no upper directory of a machine that is gone
        assert len(list((root / ".dkr" / "overlay" / "m").iterdir())) == 1


# --- a kill during dkr remove ----------------------------------------------------------------

EXTRA = 3000          # files the machine gets after its pull: removing them takes a while


def extra_counts(root: Path) -> list[int]:
    """How many of the machine's own files each place that may hold them has now."""
    places = [root / "m", *root.glob(".dkr-local-m.tmp-*"), *root.glob(".dkr/overlay/m/*/upper")]
    counts = []
    for place in places:
        try:
            counts.append(len(os.listdir(place / "extra")))
        except OSError:
            pass
    return counts


def listed(root: Path) -> list[dict]:
    return json.loads(assert_ok(run_dkr("list", "--json", "--image-root", root)).out)


def test_a_killed_remove_leaves_the_whole_machine_or_none(pushed, backend_root):
    backend, base = backend_root
    partial_seen = 0
    for attempt in range(6):          # until a kill fell in the middle of a removal
        if partial_seen or (attempt >= 2 and backend == "btrfs"):
            break
        root = base / f"attempt{attempt}"
        assert_ok(pull(pushed, "records/good", root, "--backend", backend, local="m"))
        (root / "m" / "extra").mkdir()
        for i in range(EXTRA):
            (root / "m" / "extra" / f"f{i}").write_bytes(b"")
        proc = subprocess.Popen([sys.executable, "-m", "dkr", "remove", "--image-root", str(root),
                                 "m"], start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            while proc.poll() is None:
                if any(0 < n < EXTRA for n in extra_counts(root)):
                    os.killpg(proc.pid, signal.SIGKILL)
                    partial_seen += 1
                    break
        finally:
            proc.wait()

        present = [m for m in listed(root) if m["local"] == "m" and m["present"]]
        if os.path.lexists(root / "m"):
            # the whole machine, still counted as one
            assert present, "a machine directory without a record"
            assert_ok(run_dkr("mount", "--image-root", root, "m"))
            whole(root)
            assert len(os.listdir(root / "m" / "extra")) == EXTRA
            assert_ok(run_dkr("remove", "--image-root", root, "m"))
        else:
            assert not present
        # gc (or the next run) finishes the deletion: nothing of m is left
        assert_ok(run_dkr("gc", "--image-root", root))
        assert listed(root) == []
        assert temp_entries(root) == [] and not os.path.lexists(root / ".dkr" / "overlay" / "m")
        assert_ok(pull(pushed, "records/good", root, "--backend", backend, local="m"))
        whole(root)
    if backend != "btrfs":            # (a subvolume goes at once)
        assert partial_seen, "no kill fell in the middle of a removal"


# --- two processes' temporary entries --------------------------------------------------------

HOLDER = r"""
import fcntl, os, sys
fds = []
for name in sys.argv[1:]:
    fd = os.open(name, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    fds.append(fd)
print("held", flush=True)
sys.stdin.read()
"""


def test_live_temporary_entries_of_another_process_are_left_alone(pushed, image_root):
    """A process writing a record or blob holds that entry's lock: another pull and gc
    remove only the temporary entries whose writer is gone."""
    root = image_root
    assert_ok(pull(pushed, "records/good", root, "--backend", "dir", local="m"))
    meta = root / ".dkr"
    key = sorted(p.stem for p in (meta / "layers").glob("*.json"))[0]
    blob = "ab" * 32
    live = [meta / "layers" / f".{key}.json.tmp-0123abcd",
            meta / "machines" / ".busy.json.tmp-4567ef01",
            meta / "blobs" / "sha256" / f".{blob}.tmp-89abcdef",
            meta / "machines" / ".m.json.tmp-fedcba98"]
    live_trees = [root / f".dkr-{'12' * 32}.tmp-0a0b0c0d", root / ".dkr-local-busy.tmp-1a1b1c1d"]
    for tree in live_trees:
        (tree / "etc").mkdir(parents=True)
    live += live_trees
    stale = [meta / "layers" / f".{'cd' * 32}.json.tmp-00112233",
             meta / "machines" / ".gone.json.tmp-44556677",
             meta / "blobs" / "sha256" / f".{'ef' * 32}.tmp-8899aabb"]
    for path in live + stale:
        if path not in live_trees:
            path.write_bytes(b"{half")
    locks = [meta / "locks" / f"{name}.lock"
             for name in (f"layer-{key}", "machine-busy", f"blob-{blob}", "machine-m",
                          f"layer-{'12' * 32}")]
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, *map(str, locks)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert_ok(pull(pushed, "records/other", root, "--backend", "dir", local="m2"))
        assert_ok(run_dkr("gc", "--image-root", root))
        left = set(temp_entries(root))
        assert {str(p.relative_to(root)) for p in live} == left
    finally:
        holder.stdin.close()
        holder.wait()
    assert_ok(run_dkr("gc", "--image-root", root))      # their writer is gone now
    assert temp_entries(root) == []
    whole(root)


def test_a_remove_killed_after_the_rename_is_finished_by_the_next_run(pushed, image_root):
    """The state a kill right after the rename leaves: the record, and the tree under a
    temporary name. Not a machine (list says missing, a pull may take the name);
    the next remove, or the next pull of that name, finishes the deletion."""
    root = image_root
    for finish in ("remove", "pull"):
        assert_ok(pull(pushed, "records/good", root, "--backend", "dir", local="m"))
        (root / "m").rename(root / ".dkr-local-m.tmp-0badc0de")
        assert [m["present"] for m in listed(root)] == [False]
        if finish == "remove":
            assert_ok(run_dkr("remove", "--image-root", root, "m"))
            assert listed(root) == []
        else:
            assert_ok(pull(pushed, "records/good", root, "--backend", "dir", local="m"))
            whole(root)
            assert_ok(run_dkr("remove", "--image-root", root, "m"))
        assert temp_entries(root) == []


# --- gc beside a pull -------------------------------------------------------------------------

IN_MOVED_TO = 0x80


def test_gc_leaves_the_blobs_a_pull_has_stored_for_its_machine(pushed, image_root):
    """A pull stopped between storing its manifest and config and writing its machine's
    record (which names them): gc, run then, leaves them."""
    root = image_root
    blobs = root / ".dkr" / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    (root / ".dkr" / "locks").mkdir(parents=True)
    watch = Inotify([blobs])
    watch.libc.inotify_add_watch(watch.fd, os.fsencode(blobs), IN_CREATE | IN_MOVED_TO)
    proc = DkrProcess("pull", "--insecure", "--image-root", root, "--backend", "dir", "--json",
                      f"{pushed.host}/records/good", "m")
    try:
        stored = set()
        while len(stored) < 2 and proc.proc.poll() is None:
            stored |= {p.name for p in watch.created(0.5) if not p.name.startswith(".")}
        os.killpg(proc.pid, signal.SIGSTOP)
        assert len(stored) == 2, "the pull did not store its manifest and config"
        assert not (root / ".dkr" / "machines" / "m.json").exists(), "stopped too late"
        assert_ok(run_dkr("gc", "--image-root", root))
        os.killpg(proc.pid, signal.SIGCONT)
        rc, err = proc.finish()
    finally:
        os.killpg(proc.pid, signal.SIGCONT) if proc.proc.poll() is None else None
        proc.stop()
        watch.close()
    assert rc == 0, err
    inspected = json.loads(assert_ok(run_dkr("inspect", "--image-root", root, "m")).out)
    assert inspected["manifest"] and inspected["config"]
    whole(root)
