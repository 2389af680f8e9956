"""Small file-tree operations shared by the engine and the backends."""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import sys
import threading
from pathlib import Path
from typing import Sequence

from dkr.fsinfo import is_mount_point
from dkr.libc import AT_FDCWD, libc, os_error

RENAME_EXCHANGE = 2
CLONE_NEWNS = 0x20000
MS_REC, MS_PRIVATE = 0x4000, 0x40000
MNT_DETACH = 2

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
    """Bytes used on disk by ``path`` and the files below it, as ``du -s`` counts
    them: allocated blocks, a file of several hard links once. One lstat per
    entry (scandir's), so a machine of 100,000 files takes a fraction of a second."""
    seen: set[tuple[int, int]] = set()
    try:
        top = os.lstat(path)
    except OSError:
        return 0
    total = top.st_blocks * 512
    pending = [os.fspath(path)]
    while pending:
        try:
            entries = os.scandir(pending.pop())
        except OSError:
            continue                  # gone meanwhile, or not ours to read
        with entries:
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                is_dir = entry.is_dir(follow_symlinks=False)
                if st.st_nlink > 1 and not is_dir:       # a hard link: count its file once
                    key = (st.st_dev, st.st_ino)
                    if key in seen:
                        continue
                    seen.add(key)
                total += st.st_blocks * 512
                if is_dir:
                    pending.append(entry.path)
    return total


# --- swapping two directory entries, mounts and all ------------------------------------

def _rename_exchange(a: Path, b: Path) -> None:
    if libc.renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE):
        raise os_error(path=b)


def _exchange_unmounted(a: Path, b: Path) -> None:
    """In this thread's own mount namespace: nothing mounted on ``a`` or ``b``, then swap.

    Private first, so that taking the mounts away here is not passed on to the
    namespace dkr was started in (a shared mount would be).
    """
    if libc.unshare(CLONE_NEWNS):
        raise os_error("cannot make a mount namespace to swap mounted machines in", b)
    if libc.mount(b"none", b"/", None, ctypes.c_ulong(MS_REC | MS_PRIVATE), None):
        raise os_error("cannot make the swap's mount namespace private", b)
    for path in (a, b):
        for _ in range(100):      # mounts may be stacked; EINVAL: nothing (more) mounted
            if libc.umount2(os.fsencode(path), MNT_DETACH):
                if ctypes.get_errno() != errno.EINVAL:
                    raise os_error("cannot unmount in the swap's mount namespace", path)
                break
    _rename_exchange(a, b)


def exchange_paths(a: Path, b: Path) -> None:
    """Atomically swap two directory entries, whatever is mounted on them: the mounts
    go with their directories."""
    if not (is_mount_point(a) or is_mount_point(b)):
        _rename_exchange(a, b)
        return
    # A thread of its own may leave this process's mount namespace; it ends after.
    failure: list[BaseException] = []

    def swap() -> None:
        try:
            _exchange_unmounted(a, b)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            failure.append(e)
    thread = threading.Thread(target=swap, name="dkr-swap")
    thread.start()
    interrupted = None
    while thread.is_alive():      # an undo must not start before the rename is done or not
        try:
            thread.join()
        except BaseException as e:  # noqa: BLE001 - raised once the thread is done
            interrupted = interrupted or e
    if interrupted is not None:
        raise interrupted
    if failure:
        raise failure[0]
