"""The ``btrfs`` backend: one subvolume per layer, snapshots all the way up.

A base layer is a new subvolume; layer N is a writable snapshot of layer
N-1 that the extractor applies the layer to (whiteouts delete, since the
tree is ``stacked``), made read-only when sealed. A machine is a writable
snapshot of its top layer, so every layer and machine of an image shares
the extents they have in common, and writing in a machine never reaches a
layer. Everything goes through ``btrfsutil``; nothing shells out.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from dkr.hookspecs import hookimpl
from dkr.pluginkit import BTRFS_SUPER_MAGIC, DirectoryEntries, DkrError, remove_tree, statfs_magic

try:
    import btrfsutil
except ImportError:            # the backend then reports itself unusable
    btrfsutil = None

def _fail(what: str, path: Path, e: Exception) -> DkrError:
    detail = getattr(e, "strerror", None) or str(e)
    return DkrError(f"btrfs: {what} {path}: {detail}")


class BtrfsBackend(DirectoryEntries):
    name = "btrfs"
    layer_format = "stacked"
    auto_priority = 100

    def unusable_reason(self, image_root: Path) -> str | None:
        if btrfsutil is None:
            return "the btrfsutil Python module is not installed"
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
                btrfsutil.create_subvolume(path)
            else:
                btrfsutil.create_snapshot(parent, path)
        except btrfsutil.BtrfsUtilError as e:
            raise _fail("cannot create layer subvolume", path, e) from None

    def seal_layer(self, image_root: Path, key: str, path: Path) -> None:
        try:
            btrfsutil.set_subvolume_read_only(path, True)
        except btrfsutil.BtrfsUtilError as e:
            raise _fail("cannot make layer read-only", path, e) from None

    def create_machine(self, image_root: Path, local: str, path: Path,
                       layers: Sequence[Path]) -> None:
        try:
            if layers:
                btrfsutil.create_snapshot(layers[-1], path)
            else:
                btrfsutil.create_subvolume(path)
        except btrfsutil.BtrfsUtilError as e:
            raise _fail("cannot snapshot machine", path, e) from None

    def activate_machine(self, image_root: Path, local: str, path: Path,
                         layers: Sequence[Path]) -> None:
        pass

    def deactivate_machine(self, image_root: Path, local: str, path: Path) -> None:
        pass

    def remove(self, path: Path) -> None:
        if not os.path.lexists(path):
            return
        try:
            if os.path.isdir(path) and not os.path.islink(path) and btrfsutil.is_subvolume(path):
                _delete_subvolume_tree(path)
            else:
                _remove_plain_tree(path)
        except OSError as e:            # BtrfsUtilError is one too
            raise _fail("cannot delete", path, e) from None


def _delete_subvolume_tree(path: Path) -> None:
    # A read-only subvolume cannot lose the entries of subvolumes nested in it
    # (a machine's user may have made some, even read-only ones): open them all.
    nested = [path / rel for rel, _ in btrfsutil.SubvolumeIterator(path, post_order=True)]
    for subvolume in [path, *nested]:
        if btrfsutil.get_subvolume_read_only(subvolume):
            btrfsutil.set_subvolume_read_only(subvolume, False)
    btrfsutil.delete_subvolume(path, recursive=True)


def _remove_plain_tree(path: Path) -> None:
    """A directory that is not a subvolume (e.g. left by another backend)."""
    for dirpath, dirnames, _ in os.walk(path):
        for name in list(dirnames):
            child = Path(dirpath, name)
            if not child.is_symlink() and btrfsutil.is_subvolume(child):
                _delete_subvolume_tree(child)
                dirnames.remove(name)
    remove_tree(path)


@hookimpl
def dkr_storage_backends():
    return [BtrfsBackend()]
