"""What a plugin may use of dkr besides ``dkr.hookspecs``: the one helper module.

A plugin imports nothing else of dkr (an import-linter contract in setup.cfg
keeps dkr's own plugins so), so that dkr may move its internals freely while
this module and ``dkr.hookspecs`` stay the contract. Everything here is
re-exported from where dkr keeps it; the names below are the promise.
"""

from __future__ import annotations

import os
from pathlib import Path

from dkr import treeops
from dkr.errors import DkrError
from dkr.fsinfo import (BTRFS_SUPER_MAGIC, OVERLAYFS_SUPER_MAGIC, is_mount_point, mount_type,
                        mounts, mounts_below, statfs_magic)
from dkr.libc import AT_FDCWD, libc, os_error
from dkr.treeops import exchange_paths, remove_tree, tied, tree_size

__all__ = [
    # errors: a user-facing failure is a DkrError whose text is the whole line
    "DkrError",
    # file trees
    "remove_tree", "tree_size", "tied", "exchange_paths", "DirectoryEntries",
    # what the kernel says about file systems
    "statfs_magic", "mount_type", "mounts", "mounts_below", "is_mount_point",
    "BTRFS_SUPER_MAGIC", "OVERLAYFS_SUPER_MAGIC",
    # the C library, for system calls the os module lacks
    "libc", "os_error", "AT_FDCWD",
]


class DirectoryEntries:
    """The commits of a backend whose layers and machines are directory entries.

    Each is one ``rename(2)`` (a swap one ``renameat2(RENAME_EXCHANGE)``, done
    from a private mount namespace where a machine is mounted on, so that the
    mounts go with their directories), so whoever looks at the final name finds
    the whole entry or none. A backend that inherits this implements
    ``remove(path)``, which both kinds of entry go through, or
    ``remove_layer`` and ``remove_machine`` themselves.
    """

    def commit_layer(self, image_root: Path, key: str, path: Path, final: Path) -> None:
        os.rename(path, final)

    def commit_machine(self, image_root: Path, local: str, path: Path, final: Path) -> None:
        os.rename(path, final)

    def exchange_machines(self, image_root: Path, local: str, path: Path, final: Path) -> None:
        treeops.exchange_paths(path, final)      # (looked up now: tests stop dkr right after it)

    def withdraw(self, image_root: Path, final: Path, path: Path) -> None:
        os.rename(final, path)

    def remove_layer(self, image_root: Path, key: str, path: Path) -> None:
        self.remove(path)

    def remove_machine(self, image_root: Path, local: str, path: Path) -> None:
        self.remove(path)

    def remove(self, path: Path) -> None:
        remove_tree(path)
