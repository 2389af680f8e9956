"""A tiny OS tree for systemd-nspawn, made of the host's own programs, for tests
that run a real nspawn on a machine dkr made."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

from dkr.testing.images import Dir, File, Layer

NSPAWN = shutil.which("systemd-nspawn")
# (nspawn resolves User= by running getent in the machine)
PROGRAMS = ["/bin/sh", "/usr/bin/env", "/bin/sleep", "/usr/bin/getent"]


def _libraries(programs) -> set[str]:
    out = subprocess.run(["ldd", *programs], capture_output=True, text=True, check=True).stdout
    return {word for word in out.split() if word.startswith("/") and not word.endswith(":")}


def os_layer(extra=()) -> Layer:
    """/bin/sh, env, sleep and their libraries; an os-release, a passwd with user
    'app' (uid 1000), and /out writable by all."""
    entries, dirs = [], set()
    for path in sorted(set(PROGRAMS) | _libraries(PROGRAMS)):
        real = os.path.realpath(path)
        parts = path.strip("/").split("/")
        for i in range(1, len(parts)):
            dirs.add("/".join(parts[:i]))
        entries.append(File(path.strip("/"), Path(real).read_bytes(), mode=0o755))
    # (what nspawn mounts on must be there for --read-only)
    dirs |= {"etc", "out", "srv", "srv/work dir", "dev", "proc", "sys", "run", "tmp", "var",
             "var/tmp", "root"}
    return Layer([*(Dir(d, mode=0o1777 if d == "out" else 0o755) for d in sorted(dirs)),
                  *entries,
                  File("etc/os-release", b"ID=dkrtest\n"),
                  File("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"
                                     b"app:x:1000:1000:app:/srv:/bin/sh\n"),
                  File("etc/group", b"root:x:0:\napp:x:1000:\n"),
                  *extra])


def nspawn(tree: Path, *args, **kwargs) -> subprocess.Popen:
    """``systemd-nspawn -D tree`` as a user would start it, without machined."""
    return subprocess.Popen([NSPAWN, "-q", "--register=no", "--keep-unit", "-D", str(tree),
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kwargs)


@contextmanager
def running(tree: Path, *args):
    """nspawn running ``sleep`` in ``tree`` until the block ends; yields the process
    once nspawn holds its image locks."""
    proc = nspawn(tree, *args, "/bin/sleep", "300")
    try:
        lock = tree.parent / f".#{tree.name}.lck"
        deadline = time.monotonic() + 30
        while not _locked(lock):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"nspawn did not start: {proc.communicate()}")
            time.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        proc.communicate(timeout=60)


def _locked(path: Path) -> bool:
    try:
        ino = os.stat(path).st_ino
    except FileNotFoundError:
        return False
    with open("/proc/locks") as f:
        return any(line.split()[5].endswith(f":{ino}") for line in f if len(line.split()) > 5)
