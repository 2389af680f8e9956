"""The ``btrfs`` backend: one subvolume per layer, snapshots all the way up.

A base layer is a new subvolume; layer N is a writable snapshot of layer
N-1 that the extractor applies the layer to (whiteouts delete, since the
tree is ``stacked``), made read-only when sealed. A machine is a writable
snapshot of its top layer, so every layer and machine of an image shares
the extents they have in common, and writing in a machine never reaches a
layer.

The subvolumes are made through the ``btrfsutil`` Python module where it is
installed (``pip install 'dkr[btrfs]'``; it builds against libbtrfsutil's
headers), else through the ``btrfs`` command of btrfs-progs: ``pip install
dkr`` works where those headers are missing, and pulls onto btrfs all the same.
"""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path
from typing import Sequence

from dkr.hookspecs import hookimpl
from dkr.pluginkit import BTRFS_SUPER_MAGIC, DirectoryEntries, DkrError, remove_tree, statfs_magic

try:
    import btrfsutil
except ImportError:            # then the btrfs command does the work, if it is there
    btrfsutil = None

# Every subvolume's root directory has this inode number (BTRFS_FIRST_FREE_OBJECTID).
SUBVOLUME_ROOT_INODE = 256
MISSING = ("neither the btrfsutil Python module (pip install 'dkr[btrfs]', which needs "
           "libbtrfsutil-dev) nor the btrfs command (btrfs-progs) is installed")


class _Library:
    """Subvolumes through libbtrfsutil's ioctls."""

    name = "btrfsutil"

    def create(self, path: Path) -> None:
        btrfsutil.create_subvolume(path)

    def snapshot(self, source: Path, path: Path) -> None:
        btrfsutil.create_snapshot(source, path)

    def set_read_only(self, path: Path, read_only: bool) -> None:
        btrfsutil.set_subvolume_read_only(path, read_only)

    def read_only(self, path: Path) -> bool:
        return btrfsutil.get_subvolume_read_only(path)

    def is_subvolume(self, path: Path) -> bool:
        return btrfsutil.is_subvolume(path)

    def nested(self, path: Path) -> list[Path]:
        """The subvolumes below ``path``, innermost first."""
        return [path / rel for rel, _ in btrfsutil.SubvolumeIterator(path, post_order=True)]

    def delete(self, path: Path) -> None:
        btrfsutil.delete_subvolume(path)


class _Command:
    """Subvolumes through the ``btrfs`` command, where the module is not installed."""

    name = "btrfs-progs"

    def __init__(self, program: str):
        self.program = program

    def _run(self, *args) -> str:
        done = subprocess.run([self.program, *map(str, args)], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            said = (done.stderr.strip() or done.stdout.strip()).splitlines()
            raise OSError(0, said[-1] if said else f"btrfs exited with {done.returncode}")
        return done.stdout

    def create(self, path: Path) -> None:
        self._run("subvolume", "create", path)

    def snapshot(self, source: Path, path: Path) -> None:
        self._run("subvolume", "snapshot", source, path)

    def set_read_only(self, path: Path, read_only: bool) -> None:
        self._run("property", "set", "-ts", path, "ro", "true" if read_only else "false")

    def read_only(self, path: Path) -> bool:
        return self._run("property", "get", "-ts", path, "ro").strip() == "ro=true"

    def is_subvolume(self, path: Path) -> bool:
        st = os.lstat(path)
        return st.st_ino == SUBVOLUME_ROOT_INODE and os.path.isdir(path) and \
            statfs_magic(path) == BTRFS_SUPER_MAGIC

    def nested(self, path: Path) -> list[Path]:
        """The subvolumes below ``path``, innermost first (each below its parent)."""
        found = []
        for dirpath, dirnames, _ in os.walk(path):
            found += [Path(dirpath, name) for name in dirnames
                      if os.lstat(Path(dirpath, name)).st_ino == SUBVOLUME_ROOT_INODE]
        return sorted(found, key=lambda p: len(p.parts), reverse=True)

    def delete(self, path: Path) -> None:
        self._run("subvolume", "delete", path)


@functools.cache
def _subvolumes() -> _Library | _Command | None:
    if btrfsutil is not None:
        return _Library()
    import shutil  # (only here: it costs every start of dkr a few ms)
    program = shutil.which("btrfs")
    return _Command(program) if program else None


def _fail(what: str, path: Path, e: Exception) -> DkrError:
    detail = getattr(e, "strerror", None) or str(e)
    return DkrError(f"btrfs: {what} {path}: {detail}")


class BtrfsBackend(DirectoryEntries):
    name = "btrfs"
    layer_format = "stacked"
    auto_priority = 100

    def unusable_reason(self, image_root: Path) -> str | None:
        if _subvolumes() is None:
            return MISSING
        try:
            magic = statfs_magic(image_root)
        except OSError as e:
            return f"cannot statfs {image_root}: {e.strerror}"
        if magic != BTRFS_SUPER_MAGIC:
            return f"{image_root} is not on btrfs"
        return None

    def create_layer(self, image_root: Path, key: str, path: Path, parent: Path | None) -> None:
        try:
            if parent is None:
                _subvolumes().create(path)
            else:
                _subvolumes().snapshot(parent, path)
        except OSError as e:                 # BtrfsUtilError is one too
            raise _fail("cannot create layer subvolume", path, e) from None

    def seal_layer(self, image_root: Path, key: str, path: Path) -> None:
        try:
            _subvolumes().set_read_only(path, True)
        except OSError as e:
            raise _fail("cannot make layer read-only", path, e) from None

    def create_machine(self, image_root: Path, local: str, path: Path,
                       layers: Sequence[Path]) -> None:
        try:
            if layers:
                _subvolumes().snapshot(layers[-1], path)
            else:
                _subvolumes().create(path)
        except OSError as e:
            raise _fail("cannot snapshot machine", path, e) from None

    def activate_machine(self, image_root: Path, local: str, path: Path,
                         layers: Sequence[Path]) -> None:
        pass

    def deactivate_machine(self, image_root: Path, local: str, path: Path) -> None:
        pass

    def remove(self, path: Path) -> None:
        if not os.path.lexists(path):
            return
        subvolumes = _subvolumes()
        if subvolumes is None:
            raise DkrError(f"btrfs: cannot delete {path}: {MISSING}")
        try:
            if os.path.isdir(path) and not os.path.islink(path) and subvolumes.is_subvolume(path):
                _delete_subvolume_tree(subvolumes, path)
            else:
                _remove_plain_tree(subvolumes, path)
        except OSError as e:
            raise _fail("cannot delete", path, e) from None


def _delete_subvolume_tree(subvolumes: _Library | _Command, path: Path) -> None:
    # A read-only subvolume cannot lose the entries of subvolumes nested in it
    # (a machine's user may have made some, even read-only ones): open them all.
    nested = subvolumes.nested(path)
    for subvolume in [path, *nested]:
        if subvolumes.read_only(subvolume):
            subvolumes.set_read_only(subvolume, False)
    for subvolume in [*nested, path]:
        subvolumes.delete(subvolume)


def _remove_plain_tree(subvolumes: _Library | _Command, path: Path) -> None:
    """A directory that is not a subvolume (e.g. left by another backend)."""
    for dirpath, dirnames, _ in os.walk(path):
        for name in list(dirnames):
            child = Path(dirpath, name)
            if not child.is_symlink() and subvolumes.is_subvolume(child):
                _delete_subvolume_tree(subvolumes, child)
                dirnames.remove(name)
    remove_tree(path)


@hookimpl
def dkr_storage_backends():
    return [BtrfsBackend()]
