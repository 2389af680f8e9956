"""What a plugin may use of dkr besides ``dkr.hookspecs``: the one helper module.

A plugin imports nothing else of dkr (an import-linter contract in setup.cfg
keeps dkr's own plugins so), so that dkr may move its internals freely while
this module and ``dkr.hookspecs`` stay the contract. Everything here is
re-exported from where dkr keeps it; the names below are the promise.
"""

from __future__ import annotations

from dkr.errors import DkrError
from dkr.fsinfo import (BTRFS_SUPER_MAGIC, OVERLAYFS_SUPER_MAGIC, is_mount_point, mount_type,
                        mounts, mounts_below, statfs_magic)
from dkr.libc import AT_FDCWD, libc, os_error
from dkr.treeops import remove_tree, tied, tree_size

__all__ = [
    # errors: a user-facing failure is a DkrError whose text is the whole line
    "DkrError",
    # file trees
    "remove_tree", "tree_size", "tied",
    # what the kernel says about file systems
    "statfs_magic", "mount_type", "mounts", "mounts_below", "is_mount_point",
    "BTRFS_SUPER_MAGIC", "OVERLAYFS_SUPER_MAGIC",
    # the C library, for system calls the os module lacks
    "libc", "os_error", "AT_FDCWD",
]
