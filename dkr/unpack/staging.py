"""Staged layers: inflate and check a stacked layer before its parent exists.

A stacked layer (btrfs, dir) is a copy of its parent's tree, so it cannot be
extracted before the parent is complete. Without staging, a chain of layers
extracts one layer at a time however many cores there are. Staging splits a
layer into two passes:

1. **stage** (any time, side by side with the layers below): inflate the
   blob, hash it (the DiffID), parse the tar stream, and write what it
   holds into a stage directory on the image root's file system: every
   member's header, with small bodies inline, into ``members``; large bodies
   into ``pack`` at block-aligned offsets. Nothing here is named by the
   archive, so this pass needs no confinement.
2. **replay** (once the parent's tree is complete, in the confined
   extractor): apply the members to the layer tree exactly as a direct
   extraction would, taking large bodies from the pack with
   ``copy_file_range``, which on btrfs and XFS shares the pack's blocks
   (a reflink) instead of copying them.

What remains on the critical path is the replay's metadata work; the
inflating, hashing and writing of data is done by then.
"""

from __future__ import annotations

import errno
import marshal
import os
import struct
from pathlib import Path
from typing import Iterator

from dkr.treeops import write_all
from dkr.unpack.tarstream import REGULAR, Member, TarReader

PACK = "pack"
MEMBERS = "members"
# Bodies up to this size travel inline with their header: sharing blocks
# costs more than copying a few pages, and the members file is read once
# and deleted before its pages need writing out.
INLINE_MAX = 64 * 1024
ALIGN = 4096               # a clone shares whole file-system blocks
# Each record is length-prefixed: one read and one marshal.loads per member
# (marshal.load on a file reads it field by field, in Python calls).
_LENGTH = struct.Struct("<I")


def stage(reader: TarReader, directory: Path) -> None:
    """Pass 1: write every member of ``reader`` into ``directory``."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    pack = os.open(directory / PACK, flags, 0o600)
    try:
        with open(directory / MEMBERS, "xb", buffering=1024 * 1024) as members:
            offset = 0
            for member in reader:
                body: bytes | int | None = None
                if member.kind == REGULAR:
                    # A sparse file's holes must reach the pack as holes (and
                    # its data sits at its offsets there), never inline.
                    if member.size <= INLINE_MAX and member.sparse is None:
                        body = reader.read_body(INLINE_MAX)
                    else:
                        os.lseek(pack, offset, os.SEEK_SET)
                        reader.copy_body(pack)
                        body = offset
                        offset += -(-member.size // ALIGN) * ALIGN
                record = marshal.dumps((_fields(member), body))
                members.write(_LENGTH.pack(len(record)))
                members.write(record)
            members.write(_LENGTH.pack(0))
        reader.drain()
        # Written out now, while the layers below are still busy: a clone
        # would otherwise wait for this writeback on the critical path.
        os.fdatasync(pack)
    finally:
        os.close(pack)


def _fields(m: Member) -> tuple:
    return (m.path, m.kind, m.mode, m.uid, m.gid, m.size, m.mtime_ns, m.linkname,
            m.devmajor, m.devminor, m.xattrs, m.sparse)


class StagedLayer:
    """Pass 2's input: the members in order, and bodies for ``Extractor.apply``.

    It stands in for the ``TarReader`` that a direct extraction passes along:
    ``copy_body(fd)`` writes the current member's body. Open it before the
    extractor's chroot; the files are read through descriptors only.
    """

    def __init__(self, directory: Path):
        self.pack = os.open(directory / PACK, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            self.members = open(directory / MEMBERS, "rb", buffering=1024 * 1024)
        except BaseException:
            os.close(self.pack)
            raise
        self._body: bytes | int | None = None
        self._size = 0
        self._sparse: tuple | None = None

    def __iter__(self) -> Iterator[Member]:
        while True:
            (length,) = _LENGTH.unpack(self._read(_LENGTH.size))
            if not length:
                return
            fields, self._body = marshal.loads(self._read(length))
            member = Member(*fields)
            self._size, self._sparse = member.size, member.sparse
            yield member

    def _read(self, size: int) -> bytes:
        data = self.members.read(size)
        if len(data) != size:
            raise OSError(errno.EIO, "the stage's member list ends early")
        return data

    def copy_body(self, fd: int) -> None:
        body = self._body
        if isinstance(body, bytes):
            write_all(fd, memoryview(body))
        elif self._sparse is not None:
            # Only the data segments: a copy of the holes would fill them.
            for offset, length in self._sparse:
                _copy_range(self.pack, body + offset, fd, length, offset)
            os.ftruncate(fd, self._size)
        elif body is not None:
            _copy_range(self.pack, body, fd, self._size)

    def close(self) -> None:
        self.members.close()
        os.close(self.pack)


def _copy_range(src: int, offset: int, dst: int, size: int, dst_offset: int = 0) -> None:
    done = 0
    while done < size:
        try:
            n = os.copy_file_range(src, dst, size - done, offset + done, dst_offset + done)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            n = _copy_by_hand(src, offset + done, dst, dst_offset + done, size - done)
        if n <= 0:
            raise OSError(errno.EIO, f"the stage pack ends early ({done} of {size} bytes)")
        done += n


def _copy_by_hand(src: int, offset: int, dst: int, dst_offset: int, size: int) -> int:
    """Where the kernel cannot copy between these files (another file system)."""
    data = os.pread(src, min(size, 1024 * 1024), offset)
    view = memoryview(data)
    while view:
        written = os.pwrite(dst, view, dst_offset)
        view, dst_offset = view[written:], dst_offset + written
    return len(data)
