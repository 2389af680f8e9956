"""systemd's image locks, taken as systemd takes them.

systemd-nspawn, systemd-machined and importctl lock every image they use
(``image_path_lock()`` in systemd's discover-image.c): a "local" lock file
beside the image, ``.#NAME.lck`` in its directory, and a "global" one for
the tree itself, ``/run/systemd/nspawn/locks/inode-DEV:INO`` (which also
holds when the tree is a mount point, as an overlay machine is). machined
also locks the name, ``/run/systemd/nspawn/locks/name-NAME``, while it
removes or renames an image. nspawn takes both path locks exclusively for a
writable tree, shared for a read-only one, and without waiting.

The kind of lock: open file description (OFD) locks, ``fcntl(F_OFD_SETLK)``
on the whole file, F_WRLCK exclusive and F_RDLCK shared: so in systemd 252
(Debian 12: ``make_lock_file()`` in lockfile-util.c, falling back to flock()
only where the kernel lacks OFD locks) and in current systemd (lock-util.c,
``LOCK_UNPOSIX``). They do not conflict with flock(2) locks, so taking
flock()s here would never see nspawn's. After taking one, systemd checks
that the file still has a link (an exclusive holder unlinks it on release,
and a lock on an unlinked file guards nothing) and tries again if not; an
exclusive holder unlinks the file when it lets go. dkr does the same.

dkr takes the same locks, exclusively and without waiting, before it
replaces or removes a machine or removes a layer, and holds them until it
is done: nspawn cannot start on a machine half replaced, and dkr does not
pull a tree from under a running one.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from pathlib import Path

from dkr.errors import DkrError

LOCK_DIR = Path("/run/systemd/nspawn/locks")

# Where machined finds machine images (systemd's image search path): its name
# locks are for one name space over all of them, and for no other directory.
MACHINE_SEARCH_PATH = ("/etc/machines", "/run/machines", "/var/lib/machines",
                       "/var/lib/container", "/usr/local/lib/machines", "/usr/lib/machines")

# struct flock: l_type, l_whence, l_start, l_len, l_pid (0 for OFD locks)
_FLOCK = "hhqqi4x"


class ImageInUse(DkrError):
    kind = "in-use"


def _ofd_lock(fd: int, exclusive: bool) -> bool:
    """Lock the whole of ``fd`` without waiting; False if someone else holds it."""
    request = struct.pack(_FLOCK, fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK,
                          os.SEEK_SET, 0, 0, 0)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, request)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        if e.errno != errno.EINVAL:
            raise
        try:                    # a kernel without OFD locks: systemd 252 takes flock()
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
    return True


def _lock_file(path: Path) -> int | None:
    """An fd holding ``path`` locked exclusively, or None if another holds it."""
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
                     | os.O_NOCTTY, 0o600)
        try:
            if not _ofd_lock(fd, exclusive=True):
                os.close(fd)
                return None
            if os.fstat(fd).st_nlink > 0:
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)            # its holder removed it as we opened it: again


def local_lock_path(tree: Path) -> Path:
    return tree.parent / f".#{tree.name}.lck"


def global_lock_path(tree: Path) -> Path | None:
    """The lock of the tree itself (by device and inode), if it is there."""
    try:
        st = os.stat(tree)
    except FileNotFoundError:
        return None
    if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
        return None
    return LOCK_DIR / f"inode-{st.st_dev}:{st.st_ino}"


def name_lock_path(name: str) -> Path:
    return LOCK_DIR / f"name-{name}"


class ImageLock:
    """systemd's locks of image ``tree`` (and of its name, where machined finds it by
    name: a machine of another image root may have the same name), held exclusively.

    ``what`` names the image in the error: "machine app", "layer 0123abcd".
    """

    def __init__(self, tree: Path, what: str, name: str | None = None):
        self.tree = tree
        self.what = what
        self.name = name
        self._held: list[tuple[Path, int]] = []

    def acquire(self) -> None:
        by_name = self.name and os.path.realpath(self.tree.parent) in MACHINE_SEARCH_PATH
        paths = [local_lock_path(self.tree), global_lock_path(self.tree),
                 name_lock_path(self.name) if by_name else None]
        try:
            for path in paths:
                if path is None:
                    continue
                try:
                    if path.parent == LOCK_DIR:
                        _make_lock_dir()
                    fd = _lock_file(path)
                except PermissionError:
                    if path.parent == LOCK_DIR and os.geteuid() != 0:
                        # Without root: systemd's own locks in /run are root's, as is
                        # nspawn; the lock beside the image is the one that counts.
                        continue
                    raise
                if fd is None:
                    holder = lock_holder(path)
                    raise ImageInUse(f"{self.what} is in use{f' by {holder}' if holder else ''} "
                                     f"(it holds systemd's image lock {path}): stop it first")
                self._held.append((path, fd))
        except OSError as e:
            self.release()
            raise DkrError(f"cannot take systemd's image lock of {self.what}: "
                           f"{e.strerror or e}") from None
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        while self._held:
            path, fd = self._held.pop()
            try:
                os.unlink(path)       # as systemd's exclusive holder does
            except OSError:
                pass
            os.close(fd)

    def __enter__(self) -> "ImageLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def check_not_in_use(tree: Path, what: str, name: str | None = None) -> None:
    """An ImageInUse now if the image is in use (the locks are let go at once)."""
    with ImageLock(tree, what, name):
        pass


def _make_lock_dir() -> None:
    os.makedirs(LOCK_DIR.parent, mode=0o755, exist_ok=True)
    try:
        os.mkdir(LOCK_DIR, 0o700)
    except FileExistsError:
        pass


def lock_holder(path: Path) -> str | None:
    """"process PID (COMM)" of a process that holds a lock on ``path``, if one can
    be found: OFD locks tell no owner (F_OFD_GETLK says -1), so the lock is
    looked up among the open files of every process (their fdinfo)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    # /proc/locks and fdinfo name a file as MAJOR:MINOR:INODE, the numbers in hex
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        pids = [entry for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:
        return None
    for pid in pids:
        if int(pid) == os.getpid():
            continue
        try:
            for fd in os.listdir(f"/proc/{pid}/fdinfo"):
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    info = f.read()
                if "lock:" in info and f" {device} " in info:
                    comm = Path(f"/proc/{pid}/comm").read_text().strip()
                    return f"process {pid} ({comm})"
        except OSError:
            continue
    return None
