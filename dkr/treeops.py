"""Small file-tree operations shared by the engine and the backends."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from typing import Sequence

# A program a pull starts must die with it: a ``cp`` that outlived a killed dkr
# (the OOM killer takes the main process alone) went on writing into a tree
# that the next run was removing. PR_SET_PDEATHSIG does that, but a process
# sets it only on itself, and Python's ``preexec_fn`` is unsafe where threads
# run. So util-linux's ``setpriv`` sets it and execs a shell that checks that
# its parent is still ours: had dkr died before setpriv asked, the signal
# would never come. (Exec keeps the setting.)
_STILL_OURS = '[ "$PPID" = "$1" ] || exit 125; shift; exec "$@"'
_STILL_OURS_PY = ("import ctypes, os, sys; ctypes.CDLL(None).prctl(1, 9); "
                  "os.getppid() == int(sys.argv[1]) or os._exit(125); "
                  "os.execvp(sys.argv[2], sys.argv[2:])")


def tied(argv: Sequence[str]) -> list[str]:
    """``argv`` so wrapped that the program gets SIGKILL when this process dies.

    The kernel sends it when the *thread* that started the program ends: start
    it from a thread that waits for it (as ``subprocess.run`` does).
    """
    import shutil  # (see remove_tree)
    setpriv = shutil.which("setpriv")
    if setpriv:
        return [setpriv, "--pdeathsig", "KILL", "--", "/bin/sh", "-c", _STILL_OURS, "sh",
                str(os.getpid()), *argv]
    return [sys.executable, "-I", "-S", "-c", _STILL_OURS_PY, str(os.getpid()), *argv]


def write_all(fd: int, view: memoryview) -> None:
    """All of ``view`` to ``fd`` (a write to a file or pipe may take only part)."""
    while view:
        view = view[os.write(fd, view):]


def _make_writable_and_retry(func, path, exc_info) -> None:
    if isinstance(exc_info[1], FileNotFoundError):
        return        # gone meanwhile: another run cleaning up a tree that our run left
    # Without root, a read-only directory cannot lose its entries: open it up, try again.
    parent = os.path.dirname(path)
    for p in (parent, path):
        try:
            st = os.lstat(p)
            if stat.S_ISDIR(st.st_mode):
                os.chmod(p, st.st_mode | stat.S_IRWXU)
        except OSError:
            pass
    func(path)


def remove_tree(path: Path | str) -> None:
    """Remove a file or directory tree; a missing path is not an error."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        import shutil  # here: with bz2 and lzma it costs every start ~5 ms
        shutil.rmtree(path, onerror=_make_writable_and_retry)
    else:
        os.unlink(path)


def tree_size(path: Path | str) -> int:
    """Bytes used by the files below ``path``, each inode counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in filenames + dirnames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            key = (st.st_dev, st.st_ino)
            if key not in seen:
                seen.add(key)
                total += st.st_blocks * 512
    return total
