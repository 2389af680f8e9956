"""What the kernel says about file systems: statfs types and the mount table."""

from __future__ import annotations

import ctypes
import os
import re
from pathlib import Path
from typing import Iterator

from dkr.libc import libc, os_error

BTRFS_SUPER_MAGIC = 0x9123683E
OVERLAYFS_SUPER_MAGIC = 0x794C7630


def statfs_magic(path: Path | str) -> int:
    """The file system type (``f_type`` of statfs(2)) of ``path``; OSError on failure."""
    buf = ctypes.create_string_buffer(256)    # larger than any struct statfs
    if libc.statfs(os.fsencode(path), buf) != 0:
        raise os_error(path=path)
    # f_type is the first member, a native word (__fsword_t).
    return ctypes.c_ulong.from_buffer(buf).value & 0xFFFFFFFF


def _unescape(field: bytes) -> bytes:
    # mountinfo writes space, tab, newline and backslash as \ooo
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field)


def mounts() -> Iterator[tuple[bytes, str]]:
    """(mount point, file system type) of every mount, oldest first."""
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            yield _unescape(fields[4]), fields[fields.index(b"-") + 1].decode()


def mount_type(path: Path | str) -> str | None:
    """The type of the file system mounted right on ``path`` (the top one), or None."""
    target = os.fsencode(os.path.realpath(path))
    found = None
    for point, fstype in mounts():
        if point == target:
            found = fstype
    return found


def is_mount_point(path: Path | str) -> bool:
    """Is anything mounted right on ``path``? (A btrfs subvolume alone is not a mount.)"""
    try:
        return mount_type(path) is not None
    except OSError:
        return os.path.ismount(path)


def mounts_below(top: Path | str) -> list[Path]:
    """Mount points at or below ``top``, deepest (most recently mounted) first."""
    top = Path(os.path.realpath(top))
    found = [Path(os.fsdecode(point)) for point, _ in mounts()]
    return [p for p in reversed(found) if p == top or top in p.parents]
