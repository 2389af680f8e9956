"""Shared pieces of the reliability and security tests (issue #5).

Used by test_hostile, test_faults, test_crash, test_concurrency and
test_limits: layers with hand-made blobs, fingerprints that notice any change
(ctime too), image roots on the backends this machine can mount, and a dkr
process that can be watched event by event and killed at a chosen moment.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import signal
import stat
import subprocess
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from helpers import checked_event

from dkr.plugins import backends
from dkr.testing import loopfs
from dkr.testing.images import Layer

WAIT = 60          # generous upper bound for "this event will come"; never a timing assertion


class BlobLayer(Layer):
    """A layer whose blob (and optionally tar) is given as bytes, e.g. truncated or corrupt.

    ``tar`` is what the config's DiffID is computed from (defaults to ``blob``
    for an uncompressed layer).
    """

    def __init__(self, blob: bytes, tar: bytes | None = None, compression: str = "gzip"):
        super().__init__([], compression)
        self.__dict__["blob"] = blob
        self.__dict__["tar"] = blob if tar is None else tar


# --- noticing changes ---------------------------------------------------------------

def fingerprint(top: Path) -> dict:
    """Everything about a tree that a write, chmod, chown, link or utime would change."""
    out = {}
    top = Path(top)
    for dirpath, dirnames, filenames in os.walk(top):
        for name in [".", *dirnames, *filenames]:
            path = os.path.join(dirpath, name) if name != "." else dirpath
            st = os.lstat(path)
            content = None
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    content = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            out[os.path.relpath(path, top)] = (st.st_mode, st.st_uid, st.st_gid, st.st_nlink,
                                              st.st_ino, st.st_mtime_ns, st.st_ctime_ns, content)
    return out


def make_sentinel(path: Path) -> Path:
    """A directory OUTSIDE the image root that no pull may touch."""
    path.mkdir(parents=True)
    (path / "file").write_bytes(b"sentinel: must never change\n")
    (path / "sub").mkdir()
    (path / "sub" / "deep").write_bytes(b"deep sentinel\n")
    return path


def top_level(root: Path) -> set[str]:
    return {p.name for p in root.iterdir()} if root.exists() else set()


def visible_layers(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir()
                  if p.name.startswith(".dkr-") and ".tmp-" not in p.name
                  and not p.name.startswith(".dkr-local-")) if root.exists() else []


def layer_dir(root: Path, chain_id: str) -> Path:
    return root / f".dkr-{chain_id.split(':', 1)[-1]}"


def chain_ids(image) -> list[str]:
    from dkr.registry.v2 import chain_ids as _chain_ids
    return _chain_ids([layer.diff_id for layer in image.layers])


def check_layers_complete(root: Path) -> None:
    """Every visible layer has its metadata (written before the commit rename)."""
    for layer in visible_layers(root):
        key = layer.name[len(".dkr-"):]
        assert (root / ".dkr" / "layers" / f"{key}.json").is_file(), \
            f"visible layer {layer.name} has no metadata: a half layer?"


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("dkr: error: ")]


# --- backends on file systems this machine can mount -------------------------------------

def need(reason: str | None) -> None:
    """Cannot run here: skip on a developer's machine, but CI must fail, never skip."""
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"cannot run: {reason}")
        pytest.skip(reason)


@contextmanager
def backend_mount(name: str):
    """A directory whose file system suits backend ``name`` (None: use tmp_path)."""
    if name == "dir":
        yield None
        return
    have = backends()
    need(None if name in have else f"no {name} backend plugin")
    fstype = {"btrfs": "btrfs", "overlay": "ext4"}[name]
    if name == "btrfs":
        try:
            import btrfsutil  # noqa: F401
        except ImportError:
            need("the btrfsutil module is missing")
    need(loopfs.unavailable_reason(fstype))
    with ExitStack() as stack:
        try:
            mount = stack.enter_context(loopfs.loop_fs(fstype, "512M"))
        except loopfs.LoopFsError as e:
            need(str(e))
        need(have[name].unusable_reason(mount))
        yield mount


def sent(proxy, layer) -> int:
    """Bytes of ``layer``'s blob the proxy has handed to dkr so far (by its last GET)."""
    gets = [e for e in proxy.log_for(f"/blobs/{layer.digest}") if e.method == "GET"]
    return gets[-1].bytes_sent if gets else 0


def spool_size(root, layer) -> int:
    """Bytes of ``layer``'s blob in the spool of image root ``root``."""
    path = root / ".dkr" / "partial" / layer.digest.split(":")[1]
    return path.stat().st_size if path.exists() else 0


# --- a dkr process to watch and kill ----------------------------------------------------

class DkrProcess:
    """``python -m dkr ARGS`` in its own session, its --json events readable as they come."""

    def __init__(self, *args, env=None, python=sys.executable):
        self.args = [str(python), "-m", "dkr", *map(str, args)]
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env, start_new_session=True)
        self.events: list[dict] = []
        self._queue: queue.Queue = queue.Queue()
        self._err: list[str] = []
        self._readers = [threading.Thread(target=self._read_out, daemon=True),
                         threading.Thread(target=self._read_err, daemon=True)]
        for reader in self._readers:
            reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read_out(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("{"):
                try:
                    self._queue.put(checked_event(json.loads(line)))
                except AssertionError as off_schema:     # told where the events are read
                    self._queue.put(off_schema)
        self._queue.put(None)

    def _read_err(self) -> None:
        for line in self.proc.stderr:
            self._err.append(line)

    def wait_event(self, predicate, timeout: float = WAIT) -> dict:
        """The first (not yet seen) event for which ``predicate(event)`` holds."""
        for event in self.events:
            if predicate(event):
                return event
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"event never came; stderr so far:\n{''.join(self._err)}")
            try:
                event = self._queue.get(timeout=left)
            except queue.Empty:
                continue
            if event is None:
                self._queue.put(None)
                raise AssertionError(f"dkr ended before the event; rc={self.proc.wait()}\n"
                                     f"{''.join(self._err)}")
            self.events.append(_raised_if_off_schema(event))
            if predicate(event):
                return event

    def wait_until(self, condition, timeout: float = WAIT, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                raise AssertionError(f"dkr exited ({self.proc.returncode}) before {what}:\n"
                                     f"{''.join(self._err)}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.02)

    def kill_group(self, signum: int = signal.SIGKILL) -> None:
        """Like a power cut (SIGKILL) for the whole process group: dkr and its extractors."""
        try:
            os.killpg(self.proc.pid, signum)
        except ProcessLookupError:
            pass

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def finish(self, timeout: float = WAIT) -> tuple[int, str]:
        rc = self.proc.wait(timeout)
        for reader in self._readers:
            reader.join(10)
        while True:
            try:
                event = self._queue.get_nowait()
            except queue.Empty:
                break
            if event is not None:
                self.events.append(_raised_if_off_schema(event))
        return rc, "".join(self._err)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.kill_group()
            self.proc.wait(10)


def _raised_if_off_schema(event):
    if isinstance(event, AssertionError):
        raise event
    return event


def session_pids(sid: int, needle: bytes = b"") -> list[int]:
    """Processes in session ``sid`` (a DkrProcess's pid) whose command line holds ``needle``.

    DkrProcess starts dkr in a session of its own; its children (extractors in
    ``--serve`` mode take their layer over stdin, so their command line does not
    name it) stay in that session even once dkr is gone.
    """
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        # after "pid (comm)": state ppid pgrp session ...; zombies have no command line
        if int(fields[3]) == sid and fields[0] != b"Z" and needle in cmdline:
            found.append(int(entry))
    return found


def extractor_pids(sid: int) -> list[int]:
    """Extractor children (dkr.unpack.extract) of the dkr process that leads session ``sid``."""
    return session_pids(sid, b"dkr.unpack.extract")


def _signal_masks(pid: int) -> dict[str, int]:
    masks = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("SigIgn:", "SigCgt:")):
                    masks[line[:6]] = int(line.split()[1], 16)
    except OSError:
        pass
    return masks


def ignores_sigint(pid: int) -> bool:
    """Whether ``pid`` has SIGINT ignored (an extractor does, once it has started up)."""
    masks = _signal_masks(pid)
    return not masks or bool(masks["SigIgn"] & (1 << (signal.SIGINT - 1)))


def catches_sigint(pid: int) -> bool:
    """Whether ``pid`` has a SIGINT handler: a Python process past its first steps that
    would answer Ctrl-C with KeyboardInterrupt."""
    return bool(_signal_masks(pid).get("SigCgt", 0) & (1 << (signal.SIGINT - 1)))


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (cheap enough to poll every millisecond)."""
    found = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return found


def wait_gone(pids_of, timeout: float = 20) -> list[int]:
    """Wait (bounded) until ``pids_of()`` is empty; return what is still there."""
    deadline = time.monotonic() + timeout
    left = pids_of()
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = pids_of()
    return left


def spool_files(root: Path) -> list[Path]:
    partial = root / ".dkr" / "partial"
    return sorted(partial.iterdir()) if partial.exists() else []


def flock_holders(path: Path) -> set[int]:
    """Pids that hold an flock(2) on ``path`` now, as /proc/locks tells (no lock taken to
    find out, so the processes being watched are never disturbed)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return set()
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    holders = set()
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            # "1: FLOCK  ADVISORY  WRITE 1234 00:2f:5678 0 EOF"; a waiter's line has "->"
            if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == device:
                holders.add(int(fields[4]))
    return holders
