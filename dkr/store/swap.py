"""Putting a machine's tree in place, and replacing one (``pull --force``) as a
journaled transaction that a crash is rolled forward or back from.

The new tree is made under a temp name and brought up there (an overlay is
mounted on it); one ``renameat2(RENAME_EXCHANGE)`` then swaps it with the
tree at ``IMAGE_ROOT/LOCAL``. Mounts stay with their directories, so for
anyone who looks up ``LOCAL/...`` the old machine turns into the new one at
that instant. The kernel refuses to rename a mount point in the renaming
process's own mount namespace, so where one of the two is mounted on, the
exchange is made from a private namespace in which neither is.

A replacement is a ``MachineSwap``. Its journal is the machine's record
(``.dkr/machines/LOCAL.json``), under the key ``swap``:

    no "swap"          the record is the one of the tree at LOCAL
    state "ready"      the record is still the old machine's; the new tree,
                       complete and up, is at ``tree`` and ``record`` is its
                       record. Whether the exchange happened is told by
                       ``new_id``: the new tree's identity, which a rename keeps.
    state "exchanged"  the record is the new machine's; the old tree is at
                       ``tree``, to be taken down and removed; ``record`` is
                       its record.

While a swap is in flight ``swap_layers`` names the other tree's layers too,
so gc keeps what either tree may stand on. ``recover`` finishes what a
killed pull left: forward if the new tree is at LOCAL, else back.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
from pathlib import Path

from dkr.errors import DkrError, os_error_text
from dkr.hookspecs import StorageBackend
from dkr.libc import AT_FDCWD, libc
from dkr.store.locks import AsyncFlock
from dkr.plugins import backend_on_disk, backends
from dkr.store.layout import MACHINE_TMP_PREFIX, ImageRoot, remove_machine_entry
from dkr.treeops import exchange_paths  # noqa: F401 - (tests call it from here)

log = logging.getLogger("dkr.swap")

SYS_OPEN_TREE = 428
OPEN_TREE_CLONE = 1
MAX_HANDLE_SZ = 128

READY, EXCHANGED = "ready", "exchanged"


# --- identity: whether an exchange happened ----------------------------------------------

class _FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * MAX_HANDLE_SZ)]


def tree_id(path: Path) -> str | None:
    """The identity of the directory entry ``path`` itself, not of what is mounted on
    it: its file handle (inode and generation; on btrfs with the subvolume), which a
    rename keeps and a reboot too. None if nothing is there."""
    path = Path(os.path.abspath(path))
    # A clone of the parent's mount carries none of the mounts below it: there
    # ``name`` is the directory itself. Without the right to clone (no root),
    # nothing of dkr's is mounted on a machine anyway.
    clone = libc.syscall(ctypes.c_long(SYS_OPEN_TREE), ctypes.c_int(AT_FDCWD),
                          os.fsencode(path.parent),
                          ctypes.c_uint(OPEN_TREE_CLONE | os.O_CLOEXEC))
    dirfd = clone if clone >= 0 else os.open(path.parent, os.O_PATH | os.O_DIRECTORY |
                                             os.O_CLOEXEC)
    try:
        handle, mount_id = _FileHandle(handle_bytes=MAX_HANDLE_SZ), ctypes.c_int()
        if libc.name_to_handle_at(dirfd, os.fsencode(path.name), ctypes.byref(handle),
                                   ctypes.byref(mount_id), 0) == 0:
            return f"{handle.handle_type}:{bytes(handle.f_handle[:handle.handle_bytes]).hex()}"
        err = ctypes.get_errno()
        if err == errno.ENOENT:
            return None
        if err not in (errno.EOPNOTSUPP, errno.EOVERFLOW):
            raise OSError(err, os.strerror(err), str(path))
        try:                      # a file system without handles: its inode numbers
            return f"ino:{os.stat(path.name, dir_fd=dirfd, follow_symlinks=False).st_ino}"
        except FileNotFoundError:
            return None
    finally:
        os.close(dirfd)


# --- trees --------------------------------------------------------------------------------

def take_away(root: ImageRoot, local: str, backend: StorageBackend, tree: Path) -> None:
    """Take a tree of machine ``local`` down and remove it (a temp or replaced one)."""
    backend.deactivate_machine(root.path, local, tree)
    remove_machine_entry(backend, root.path, local, tree)


def place(root: ImageRoot, local: str, tmp: Path, layers: list[Path],
          backend: StorageBackend, record: dict) -> None:
    """Put the new machine ``tmp`` at ``IMAGE_ROOT/LOCAL``, where there is none, and up.

    The record comes first: a crash must never leave a machine that no record
    names (list and remove would not know it, gc would take its layers). On
    failure ``tmp`` is removed and the record is as it was.
    """
    machine = root.machine_path(local)
    relative = f"machines/{local}.json"
    written = False
    try:
        stale = _read_or_none(root.meta / relative)       # (a crash may leave one)
        root.write_json(relative, record)
        written = True
        backend.commit_machine(root.path, local, tmp, machine)
        try:
            backend.activate_machine(root.path, local, machine, layers)
        except BaseException:
            backend.deactivate_machine(root.path, local, machine)    # in case it got that far
            backend.withdraw(root.path, machine, tmp)
            raise
    except BaseException:
        try:
            if written:
                _put_back(root, relative, stale)
        finally:
            if os.path.lexists(tmp):
                take_away(root, local, backend, tmp)
        raise


# --- the replacement -------------------------------------------------------------------------

class MachineSwap:
    """One replacement of machine LOCAL: ``prepare``, ``exchange``, ``finish`` (or
    ``roll_back``), each one transition of the journal in LOCAL's record."""

    def __init__(self, root: ImageRoot, local: str):
        self.root = root
        self.local = local
        self.machine = root.machine_path(local)
        self.relative = f"machines/{local}.json"
        self.tree: Path | None = None          # the other tree: new while ready, old after
        self.new: dict = {}                    # the new machine's record
        self.old: dict | None = None           # the old one's (None: unreadable)
        self.old_bytes: bytes | None = None    # the record file as it was, to put back
        self.new_id: str | None = None
        self.state: str | None = None
        self.written = False                   # a journal is on disk: undo puts old_bytes back

    # --- transitions ---------------------------------------------------------------------
    def prepare(self, tmp: Path, layers: list[Path], backend: StorageBackend,
                record: dict) -> None:
        """No swap → ready: the journal names the new tree, which is brought up at ``tmp``.

        An old record that cannot be read stays as it is until the exchange (gc
        goes on refusing meanwhile, so it takes none of the old tree's layers).
        """
        self.old_bytes = _read_or_none(self.root.meta / self.relative)
        self.tree, self.new, self.new_id = tmp, record, tree_id(tmp)
        try:
            self.old = self.root.machine_info(self.local)
        except DkrError as e:
            log.warning("%s; replacing machine %s as found on disk.", e, self.local)
            self.old = None
        self.state = READY
        if self.old is not None:
            self._write()
        backend.activate_machine(self.root.path, self.local, tmp, layers)

    def exchange(self) -> None:
        """ready → exchanged: the new tree at LOCAL, the old one at ``tree``."""
        self._new_backend().exchange_machines(self.root.path, self.local, self.tree, self.machine)
        self.state = EXCHANGED
        self._write()

    def finish(self) -> bool:
        """exchanged → no swap: the old tree taken down and removed. False if it could
        not be (busy, say): the journal stays, and the next recovery tries again."""
        try:
            take_away(self.root, self.local, self._old_backend(), self.tree)
        except (DkrError, OSError) as e:
            why = os_error_text(e) if isinstance(e, OSError) else e
            log.warning("The machine that %s replaced is left at %s: %s", self.local,
                        self.tree, why)
            return False
        self.state = None
        self._write()
        return True

    def roll_back(self) -> None:
        """ready → no swap, the old machine untouched: the new tree taken away."""
        if self.tree is not None and os.path.lexists(self.tree):
            take_away(self.root, self.local, self._new_backend(), self.tree)
        self.state = None
        if self.written:
            _put_back(self.root, self.relative, self.old_bytes)

    # --- a whole replacement, and recovery ------------------------------------------------
    def run(self, tmp: Path, layers: list[Path], backend: StorageBackend, record: dict) -> None:
        """Replace LOCAL by ``tmp``. On failure the old machine is as it was, up or
        down, and ``tmp`` is gone, or (if even that failed) the journal says how
        far it got, for ``recover``."""
        try:
            self.prepare(tmp, layers, backend, record)
            self.exchange()
        except BaseException:
            self._undo()
            raise
        self.finish()

    def _undo(self) -> None:
        try:
            if self.state == EXCHANGED or self._exchanged():
                self._new_backend().exchange_machines(             # the old one back
                    self.root.path, self.local, self.tree, self.machine)
            self.roll_back()
        except BaseException as e:  # noqa: BLE001 - the first failure is the one to tell
            log.warning("Could not undo the replacement of machine %s (%s); the next "
                        "pull, mount or list of it will.", self.local, e)

    def _exchanged(self) -> bool:
        return self.new_id is not None and tree_id(self.machine) == self.new_id

    @classmethod
    def from_journal(cls, root: ImageRoot, local: str, info: dict) -> "MachineSwap":
        journal = info["swap"]
        swap = cls(root, local)
        swap.state = journal["state"]
        swap.tree = root.path / journal["tree"]
        swap.new_id = journal.get("new_id")
        other = journal["record"]
        bare = {k: v for k, v in info.items() if k not in ("swap", "swap_layers")}
        swap.new, swap.old = (other, bare) if swap.state == READY else (bare, other)
        swap.old_bytes = None if swap.old is None else _json_bytes(swap.old)
        swap.written = True
        return swap

    def recover(self) -> None:
        """Finish what a pull that stopped left: forward if the new tree made it to
        LOCAL, else back."""
        if self.state == READY:
            if not self._exchanged():
                log.info("Machine %s: taking back a replacement that stopped.", self.local)
                self.roll_back()
                return
            log.info("Machine %s: finishing a replacement that stopped.", self.local)
            self.state = EXCHANGED
            self._write()
        self.finish()

    # --- the journal -------------------------------------------------------------------
    def _write(self) -> None:
        self.written = True
        if self.state is None:
            self.root.write_json(self.relative, self.new)
            return
        # (A record an older dkr left mid-swap names layers of a tree that may be either.)
        old = self.old or {}
        if self.state == READY:
            top, other, other_layers = self.old, self.new, self.new.get("layers", [])
        else:
            top, other, other_layers = self.new, self.old, old.get("layers", [])
        other_layers = list(dict.fromkeys(other_layers + old.get("swap_layers", [])))
        journal = {"state": self.state, "tree": self.tree.name, "record": other}
        if self.new_id is not None:
            journal["new_id"] = self.new_id
        self.root.write_json(self.relative, {**top, "swap_layers": other_layers,
                                             "swap": journal})

    def _new_backend(self) -> StorageBackend:
        return _backend(self.new.get("backend"), self.tree, self.root)

    def _old_backend(self) -> StorageBackend:
        return _backend((self.old or {}).get("backend"), self.tree, self.root)


def recover(root: ImageRoot, local: str) -> bool:
    """Roll forward or back a replacement of ``local`` that a killed pull left (the
    caller holds the machine's lock). True when nothing of one is left."""
    try:
        info = root.machine_info(local)
    except DkrError:
        return True               # nothing to go by: the commands say what they say today
    if not info or not _journal_fits(info.get("swap"), local):
        return True
    swap = MachineSwap.from_journal(root, local, info)
    swap.recover()
    return swap.state is None


def recover_if_idle(root: ImageRoot, local: str) -> None:
    """``recover`` unless a dkr process holds the machine (it may be swapping it now)."""
    lock = AsyncFlock(root.meta / "locks" / f"machine-{local}.lock", f"machine {local}")
    try:
        if not lock.try_acquire():
            return
    except OSError:
        return
    try:
        recover(root, local)
    except (DkrError, OSError) as e:
        log.warning("Machine %s: %s", local, os_error_text(e) if isinstance(e, OSError) else e)
    finally:
        lock.release()


def _journal_fits(journal, local: str) -> bool:
    """A journal this module wrote: a tree of LOCAL's temp names, a known state."""
    if not isinstance(journal, dict):
        return False
    tree, state, other = journal.get("tree"), journal.get("state"), journal.get("record")
    return (state in (READY, EXCHANGED) and isinstance(tree, str)
            and tree.startswith(f"{MACHINE_TMP_PREFIX}{local}.tmp-") and "/" not in tree
            and (isinstance(other, dict) or (other is None and state == EXCHANGED)))


def _backend(name: str | None, tree: Path, root: ImageRoot) -> StorageBackend:
    return backends().get(name or "") or backend_on_disk(tree, root.path)


def _json_bytes(record: dict) -> bytes:
    return (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _put_back(root: ImageRoot, relative: str, data: bytes | None) -> None:
    if data is None:
        (root.meta / relative).unlink(missing_ok=True)
    else:
        root.write_bytes(relative, data)
