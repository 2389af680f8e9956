"""A streaming tar reader: headers parsed by hand, bodies copied without detours.

It reads v7, ustar, GNU (long names, long links, base-256 numbers, sparse
files) and pax (path, linkpath, size, uid, gid, mtime, xattrs, GNU sparse
0.0, 0.1 and 1.0) headers from a file-like stream, one pass, never seeking.
Paths stay bytes: a layer may name files in any encoding. Everything it
reads is hashed on the way (the layer's DiffID).

What a header means is what GNU tar's extraction makes of it; where Go's
archive/tar (containerd, podman, umoci) reads it otherwise, the comment at
that place says which one dkr follows and why. Anything malformed is a
TarError that names the member where the header says which one it is.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import queue
import re
import struct
import threading
from dataclasses import dataclass, field
from urllib.parse import unquote_to_bytes
from zlib import adler32

from dkr.treeops import write_all

BLOCK = 512
CHUNK = 1024 * 1024
# Data after the end-of-archive blocks still counts for the DiffID, so it is
# read and hashed; tar writers pad to a record (10 KiB by default), nothing
# legitimate adds megabytes. More than this is refused instead of inflating a
# bomb of trailing zeros for minutes.
MAX_TRAILING = 4 * 1024 * 1024
_ZERO_BLOCK = bytes(BLOCK)

REGULAR, HARDLINK, SYMLINK, CHAR, BLOCKDEV, DIRECTORY, FIFO = (
    "file", "hardlink", "symlink", "char", "block", "dir", "fifo")
# GNU sparse files ('S') are regular files whose body holds only their data
# segments. Every other kind but REGULAR is header-only: whatever its size
# field says, the next header follows at once. That is what GNU tar's
# extraction, Go's archive/tar and Python's tarfile all do (GNU tar's
# *listing*, -t, skips a body after a symlink, device or fifo; its
# extraction does not, and extraction is what a layer is for).
_TYPES = {b"0": REGULAR, b"\0": REGULAR, b"7": REGULAR, b"S": REGULAR, b"1": HARDLINK,
          b"2": SYMLINK, b"3": CHAR, b"4": BLOCKDEV, b"5": DIRECTORY, b"6": FIFO}
# A regular-file type whose name ends in "/" is a directory (pre-POSIX tars
# marked directories so). GNU tar does this for NUL, '0' and '7' in every
# format; Go's archive/tar and tarfile only for NUL, and read a '0' or '7'
# "d/" as a file whose body follows. dkr follows GNU tar: the archives that
# carry such headers come from old tars whose own readers meant a directory,
# and a file named "d/" cannot exist on disk anyway.
_SLASH_MEANS_DIR = (b"\0", b"0", b"7")
# Sparse maps and pax headers are metadata held in memory while a member is
# read: bounded, as a long name is.
MAX_METADATA = 1 << 20


class TarError(Exception):
    """The stream is not a tar archive we can read safely."""


def quoted(value: bytes, limit: int = 40) -> str:
    """A bad value as an error line shows it: quoted, escaped, cut short."""
    text = value[:limit].decode("utf-8", "backslashreplace")
    return repr(text) + ("..." if len(value) > limit else "")


def member_label(path: bytes) -> str:
    """How an error line names a member: ``member 'etc/passwd'``."""
    return "member " + quoted(path, 200)


@dataclass(slots=True)
class Member:
    path: bytes
    kind: str
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    linkname: bytes = b""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    # A sparse file: its data segments as ((offset, length), ...); ``size`` is
    # the file's full size, holes included.
    sparse: tuple | None = None


# name mode uid gid size mtime chksum typeflag linkname magic+version uname gname
# devmajor devminor prefix: one unpack per header instead of a slice per field.
_HEADER = struct.Struct("100s8s8s8s12s12s8sc100s8s32s32s8s8s155s12x")
# mode, uid, gid, size, mtime and checksum as (nearly) every writer formats them:
# zero-padded octal, each ended by a NUL or a space. One match reads all six.
_PLAIN_NUMBERS = re.compile(rb"([0-7]{7})[\0 ]([0-7]{7})[\0 ]([0-7]{7})[\0 ]"
                            rb"([0-7]{11})[\0 ]([0-7]{11})[\0 ]([0-7]{6})[\0 ][\0 ]")
_NUMBER_FIELDS = ((100, 108, "mode"), (108, 116, "uid"), (116, 124, "gid"),
                  (124, 136, "size"), (136, 148, "mtime"))
_OCTAL = (8,) * 6


def _number(field_: bytes, what: str) -> int:
    """An octal field (space or NUL padded) or GNU base-256.

    Only an mtime may be negative (before 1970): a size of -512 would rewind
    the reader onto the same header, for ever. (int() alone would also take
    a sign or underscores.)
    """
    # GNU base-256: two's complement after the flag. GNU tar (and tarfile) take
    # only 0x80 (positive) and 0xff (negative) as the first byte; Go's
    # archive/tar takes any byte with its top bit set. dkr follows GNU tar:
    # no writer makes the others, so they are damage, not numbers.
    if field_[0] in (0x80, 0xff):
        bits = 8 * len(field_) - 1
        value = int.from_bytes(field_, "big") & ((1 << bits) - 1)
        if field_[0] & 0x40:
            value -= 1 << bits
            if what != "mtime":
                raise TarError(f"negative {what} field in tar header")
        return value
    text = field_.split(b"\0", 1)[0].strip(b" ")
    if text.isdigit():
        try:
            return int(text, 8)
        except ValueError:                         # an 8 or a 9
            pass
    elif not text:
        return 0
    raise TarError(f"bad {what} field {quoted(field_)} in tar header")


class _FieldError(TarError):
    """A bad field in a header whose checksum adds up: its name can be believed."""


def _header_numbers(block: bytes) -> list[int]:
    """Mode, uid, gid, size and mtime of a header, once its checksum is right."""
    plain = _PLAIN_NUMBERS.match(block, 100)
    if plain:
        *numbers, stored = map(int, plain.groups(), _OCTAL)
    else:
        numbers, stored = None, _number(block[148:156], "checksum")
    if not _checksum_ok(block, stored):
        raise TarError("tar header checksum mismatch (corrupt or not a tar stream)")
    if numbers:
        return numbers
    try:
        return [_number(block[start:end], what) for start, end, what in _NUMBER_FIELDS]
    except TarError as e:
        raise _FieldError(str(e)) from None


def _cstr(field_: bytes) -> bytes:
    return field_.split(b"\0", 1)[0]


def _byte_sum(block: bytes) -> int:
    """The sum of a header's bytes, from zlib's Adler-32 (whose low half is 1 +
    the byte sum, modulo 65521): exact per 256 bytes, which sum to 65280 at
    most. Four times faster than ``sum(block)``, once per member."""
    return (adler32(block[:256]) & 0xFFFF) + (adler32(block[256:]) & 0xFFFF) - 2


def _checksum_ok(block: bytes, stored: int) -> bool:
    # The checksum field itself counts as eight spaces.
    unsigned = _byte_sum(block) - sum(block[148:156]) + 8 * 32
    if stored == unsigned:
        return True
    signed = sum((b - 256 if b > 127 else b) for b in block[:148] + b" " * 8 + block[156:])
    return stored == signed


def _pax_number(pax: dict[bytes, bytes], key: bytes) -> int | None:
    """A pax size/uid/gid: plain decimal digits only (a negative size would rewind the reader)."""
    value = pax.get(key)
    if value is None:
        return None
    return _decimal(value, f"PAX {key.decode()}")


_SPARSE_OFFSET, _SPARSE_NUMBYTES = b"GNU.sparse.offset", b"GNU.sparse.numbytes"
_SPARSE_MAP = b"GNU.sparse.map"


def _parse_pax(data: bytes) -> dict[bytes, bytes]:
    """The records of a pax header; GNU sparse 0.0's repeated offset and
    numbytes records become one GNU.sparse.map, as 0.1 writes it (Go's
    archive/tar does the same)."""
    records: dict[bytes, bytes] = {}
    sparse: list[bytes] = []
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0 or not data[pos:space].isdigit():
            if data[pos:].strip(b"\0"):
                raise TarError("bad PAX record")
            break                               # (padding after the last record)
        if space - pos > 19:                    # (int() of thousands of digits is refused)
            raise TarError("bad PAX record length")
        length = int(data[pos:space])
        if length <= space + 1 - pos or pos + length > len(data) or data[pos + length - 1] != 10:
            raise TarError("bad PAX record length")
        record = data[space + 1: pos + length - 1]     # drop trailing newline
        key, sep, value = record.partition(b"=")
        if not sep or not key or b"\0" in key:
            raise TarError(f"bad PAX record {quoted(record)}")
        if key in (_SPARSE_OFFSET, _SPARSE_NUMBYTES):
            # They alternate, offset first; anything else cannot be paired up.
            if (key == _SPARSE_OFFSET) != (len(sparse) % 2 == 0) or not value.isdigit():
                raise TarError(f"bad GNU sparse map in PAX header ({key.decode()} {quoted(value)})")
            sparse.append(value)
        else:
            records[key] = value
        pos += length
    if sparse:
        records[_SPARSE_MAP] = b",".join(sparse)
    return records


class ReadAhead:
    """Inflates and hashes on a second thread, a few chunks ahead of the tar parser.

    zlib/ISA-L, zstd and sha256 all release the GIL on large buffers, so this
    puts a second core to work on the same layer (as ``pigz -dc | tar -x``
    does with two processes), while memory stays bounded by ``depth`` chunks.
    """

    def __init__(self, open_stream, depth: int = 4):
        # Opened on the read-ahead thread: sniffing the format may already wait for bytes.
        self._open_stream = open_stream
        self.hash = hashlib.sha256()
        self._chunks: queue.Queue = queue.Queue(depth)
        self._error: BaseException | None = None
        self._finished = False
        self._thread = threading.Thread(target=self._fill, name="inflate", daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        try:
            stream = self._open_stream()
            while True:
                chunk = stream.read(CHUNK)
                if not chunk:
                    break
                self.hash.update(chunk)
                self._chunks.put(chunk)
        except BaseException as e:   # handed to the reading thread, raised there
            self._error = e
        self._chunks.put(None)

    def read(self, size: int = -1) -> bytes:
        """The next inflated chunk (whatever its size), or b"" at the end."""
        if self._finished:
            return b""
        chunk = self._chunks.get()
        if chunk is None:
            self._finished = True
            if self._error is not None:
                raise self._error
            return b""
        return chunk

    def keep_ahead(self, depth: int) -> None:
        """From now on hold at most ``depth`` chunks (what is held already stays)."""
        with self._chunks.mutex:
            self._chunks.maxsize = depth


class TarReader:
    """Yields Members; the caller must consume each member's body (copy or skip).

    ``fast_path``, if set, is offered the read buffer before each header that
    carries no pax, long-name or long-link context: ``fast_path(buffer, pos)``
    may apply whole members straight from it and returns where the next one
    starts (``pos`` when it takes none). Each member is either taken whole by
    it or yielded here, never both.
    """

    def __init__(self, stream, *, max_bytes: int | None = None):
        self.stream = stream
        # A stream that hashes what it hands out (ReadAhead, on another thread)
        # keeps that work off this one.
        self._hashed_by_stream = hasattr(stream, "hash")
        self.hash = stream.hash if self._hashed_by_stream else hashlib.sha256()
        self.total = 0
        self.max_bytes = max_bytes
        self._buf = b""
        self._pos = 0
        self._pending = 0             # unread body + padding of the current member
        self._sparse: tuple | None = None     # the current member's map, if it is sparse
        self._sparse_size = 0
        self._path = b""              # the current member's, for an error in its body
        self._globals: dict[bytes, bytes] = {}
        self.fast_path = None

    # --- raw bytes ----------------------------------------------------------
    def _more(self) -> bool:
        chunk = self.stream.read(CHUNK)
        if not chunk:
            return False
        if not self._hashed_by_stream:
            self.hash.update(chunk)
        self.total += len(chunk)
        if self.max_bytes is not None and self.total > self.max_bytes:
            raise TarError(f"layer unpacks to more than {self.max_bytes} bytes")
        rest = self._buf[self._pos:]
        self._buf = rest + chunk if rest else chunk
        self._pos = 0
        return True

    def _read(self, n: int) -> bytes:
        while len(self._buf) - self._pos < n:
            if not self._more():
                raise TarError("unexpected end of archive (truncated layer?)")
        data = self._buf[self._pos:self._pos + n]
        self._pos += n
        return data

    def copy_body(self, fd: int | None) -> None:
        """Write the current member's body to ``fd`` (None: skip it).

        A sparse file's data goes to its offsets from where ``fd`` stands, and
        the file is cut to its full size there: its holes stay holes.
        """
        if self._sparse is not None:
            if fd is not None:
                self._copy_sparse(fd)
                return
            self._sparse = None
        remaining, padding = self._pending, (-self._pending) % BLOCK
        self._pending = 0
        start = self._pos
        if start + remaining + padding <= len(self._buf):     # all of it is here already
            self._pos = start + remaining + padding
            if fd is not None and remaining:
                write_all(fd, memoryview(self._buf)[start:start + remaining])
            return
        while remaining:
            if self._pos >= len(self._buf) and not self._more():
                raise self._cut_short()
            take = min(remaining, len(self._buf) - self._pos)
            if fd is not None:
                write_all(fd, memoryview(self._buf)[self._pos:self._pos + take])
            self._pos += take
            remaining -= take
        if padding:
            self._read(padding)

    def _cut_short(self) -> TarError:
        return TarError(f"{member_label(self._path)}: unexpected end of archive inside "
                        "its data (truncated layer?)")

    def _copy_sparse(self, fd: int) -> None:
        segments, size, self._sparse = self._sparse, self._sparse_size, None
        padding = (-self._pending) % BLOCK
        self._pending = 0
        base = os.lseek(fd, 0, os.SEEK_CUR)
        for offset, length in segments:
            at = base + offset
            while length:
                if self._pos >= len(self._buf) and not self._more():
                    raise self._cut_short()
                take = min(length, len(self._buf) - self._pos)
                view = memoryview(self._buf)[self._pos:self._pos + take]
                while view:
                    written = os.pwrite(fd, view, at)
                    view, at = view[written:], at + written
                self._pos += take
                length -= take
        os.ftruncate(fd, base + size)
        if padding:
            self._read(padding)

    def read_body(self, limit: int = 1 << 20) -> bytes:
        if self._pending > limit:
            raise TarError(f"tar metadata entry of {self._pending} bytes is too large")
        size = self._pending
        self._pending = 0
        data = self._read(size)
        self._read((-size) % BLOCK)
        return data

    def drain(self) -> None:
        """Read to the end of the stream so the DiffID covers every byte.

        What follows the end-of-archive blocks is hashed but never parsed; it
        may be a record's padding, not megabytes (see MAX_TRAILING).
        """
        end = self.total - (len(self._buf) - self._pos)
        self._pos = len(self._buf)
        while self._more():
            self._pos = len(self._buf)
            if self.total - end > MAX_TRAILING:
                raise TarError(f"more than {MAX_TRAILING // (1024 * 1024)} MiB of data after "
                               "the end of the tar archive")

    # --- members ------------------------------------------------------------
    def __iter__(self):
        long_name = long_link = None
        pax: dict[bytes, bytes] = {}
        pax_error: TarError | None = None      # told once the member it belongs to is known
        while True:
            if self._pending:
                self.copy_body(None)
            self._sparse = None
            if (self.fast_path is not None and long_name is None and long_link is None
                    and not pax and not self._globals and pax_error is None):
                self._pos = self.fast_path(self._buf, self._pos)
            try:
                block = self._read(BLOCK)
            except TarError as e:
                if self.total == 0:
                    raise TarError("empty layer stream") from None
                # An archive whose end-of-archive blocks are missing ends where
                # its last member does, as GNU tar, Go's archive/tar and tarfile
                # read it (a stream cut short there still fails its DiffID);
                # one cut inside a header does not. (An extension header
                # whose member never comes is dropped, here as at an end
                # marker: GNU tar and Go do so, tarfile refuses.)
                if self._pos == len(self._buf) and pax_error is None:
                    return
                raise pax_error or e
            if block == _ZERO_BLOCK:
                if pax_error is not None:         # (no member to name)
                    raise pax_error
                self._end_of_archive()
                return
            try:
                numbers = _header_numbers(block)
            except _FieldError as e:
                raise TarError(f"{member_label(long_name or _cstr(block[:100]))}: {e}") from None
            fields = _HEADER.unpack(block)
            typeflag = fields[7]
            self._pending = numbers[3]
            # Solaris tar's 'X' is a pax extended header under an older name.
            # GNU tar reads it as one; Go's archive/tar does not know it (it
            # hands it on as a member of an unknown type, which containerd and
            # Docker then refuse). dkr follows GNU tar: the records are the
            # same, and the member they describe is read as its writer meant.
            if typeflag in (b"x", b"g", b"X"):
                body = self.read_body()
                try:
                    records = _parse_pax(body)
                except TarError as e:
                    pax_error = pax_error or e
                    continue
                if typeflag == b"g":
                    self._globals.update(records)
                else:
                    pax.update(records)
                continue
            if typeflag == b"L":
                long_name = _cstr(self.read_body())
                continue
            if typeflag == b"K":
                long_link = _cstr(self.read_body())
                continue
            if self._globals:
                pax = {**self._globals, **pax}
            try:
                if pax_error is not None:
                    raise pax_error
                member = self._member(block, fields, numbers, pax, long_name, long_link)
            except TarError as e:
                raise TarError(f"{member_label(_shown_name(fields, pax, long_name))}: {e}") \
                    from None
            long_name = long_link = None
            pax = {}
            pax_error = None
            self._path = member.path
            yield member

    def _end_of_archive(self) -> None:
        """A zero block ends the archive only if the stream ends or another zero block follows.

        Go's archive/tar (Docker, containerd, umoci) refuses a lone zero block
        followed by a header; members hidden behind one must not be read by
        some tools and skipped by others.
        """
        while len(self._buf) - self._pos < BLOCK:
            if not self._more():
                if len(self._buf) - self._pos == 0:
                    return
                raise TarError("unexpected end of archive (truncated layer?)")
        if self._buf[self._pos:self._pos + BLOCK] != _ZERO_BLOCK:
            raise TarError("a lone zero block in the middle of the tar archive "
                           "(members hidden after an end marker?)")
        self._pos += BLOCK

    def _member(self, block: bytes, fields: tuple, numbers: list[int], pax: dict[bytes, bytes],
                long_name: bytes | None, long_link: bytes | None) -> Member:
        name, _, _, _, _, _, _, typeflag, linkname, magic, _, _, devmajor, devminor, prefix = fields
        name = long_name or _cstr(name)
        if long_name is None and magic[:6] == b"ustar\0" and prefix[0]:
            name = _cstr(prefix) + b"/" + name
        mode, uid, gid, size, mtime = numbers
        kind = _TYPES.get(typeflag)
        if kind is None:
            # GNU tar extracts a member of a type it does not know as a regular
            # file; Go's archive/tar hands it on, and Docker, containerd and
            # umoci refuse the layer ("unhandled tar header type"). dkr refuses
            # too: the runtimes the image is made for could not use it, and
            # GNU's volume labels, multi-volume parts and dump directories
            # have no meaning in a layer.
            raise TarError(f"unsupported tar entry type {typeflag!r}")
        linkname = long_link or _cstr(linkname)
        mtime_ns = mtime * 1_000_000_000
        xattrs = {}
        sparse = None
        if typeflag == b"S":
            sparse, size = self._old_gnu_sparse(block)
        if pax:
            name, linkname, uid, gid, mtime_ns, xattrs = self._pax_overrides(
                pax, name, linkname, uid, gid, mtime_ns)
        # (The name that counts is the final one, a pax path's too, as GNU tar has it.)
        if typeflag in _SLASH_MEANS_DIR and name.endswith(b"/"):
            kind = DIRECTORY
        if pax and kind is REGULAR:
            sparse, size = self._pax_sparse(pax, sparse, size)
        if uid > _MAX_ID or gid > _MAX_ID:
            raise TarError(f"owner {uid}:{gid} is out of range")
        if kind is REGULAR:
            if sparse is not None:
                sparse = _checked_map(sparse, size, self._pending)
                self._sparse, self._sparse_size = sparse, size
            else:
                size = self._pending
        else:
            # Header-only, whatever its size field says (see _TYPES).
            self._pending = size = 0
        device = kind is CHAR or kind is BLOCKDEV
        major = _number(devmajor, "devmajor") if device else 0
        minor = _number(devminor, "devminor") if device else 0
        if major > _MAX_ID or minor > _MAX_ID:
            raise TarError(f"device number {major},{minor} is out of range")
        if not -_MAX_TIME_NS <= mtime_ns <= _MAX_TIME_NS:
            mtime_ns = _MAX_TIME_NS if mtime_ns > 0 else -_MAX_TIME_NS
        return Member(name, kind, mode & 0o7777, uid, gid, size, mtime_ns, linkname, major, minor,
                      xattrs, sparse)

    def _pax_overrides(self, pax: dict[bytes, bytes], name: bytes, linkname: bytes,
                       uid: int, gid: int, mtime_ns: int) -> tuple:
        pax_size = _pax_number(pax, b"size")
        if pax_size is not None:
            self._pending = pax_size
        if b"mtime" in pax:
            mtime_ns = _pax_time_ns(pax[b"mtime"])
        pax_uid, pax_gid = _pax_number(pax, b"uid"), _pax_number(pax, b"gid")
        name = pax.get(b"GNU.sparse.name", pax.get(b"path", name))
        linkname = pax.get(b"linkpath", linkname)
        # (Go's archive/tar refuses these too; a NUL would cut the name short.)
        if b"\0" in name or b"\0" in linkname:
            raise TarError("a PAX path or linkpath with a NUL byte in it")
        return (name, linkname, uid if pax_uid is None else pax_uid,
                gid if pax_gid is None else pax_gid, mtime_ns, _xattrs(pax))

    # --- sparse files -----------------------------------------------------------
    def _old_gnu_sparse(self, block: bytes) -> tuple[list, int]:
        """The map of an old GNU 'S' header: four entries in the header, 21 in
        each extension block that follows it (before the data)."""
        entries: list[tuple[int, int]] = []
        done = False

        def take(area: bytes, count: int) -> None:
            nonlocal done
            for at in range(0, 24 * count, 24):
                # An entry whose numbytes field is empty ends the map (as GNU tar reads it).
                if done or area[at + 12] == 0:
                    done = True
                    return
                entries.append((_number(area[at:at + 12], "sparse offset"),
                                _number(area[at + 12:at + 24], "sparse numbytes")))

        take(block[386:482], 4)
        extended = block[482]
        blocks = 0
        while extended:
            blocks += 1
            if blocks * BLOCK > MAX_METADATA:
                raise TarError("GNU sparse map is too large")
            ext = self._read(BLOCK)
            take(ext[:504], 21)
            extended = ext[504]
        return entries, _number(block[483:495], "sparse realsize")

    def _pax_sparse(self, pax: dict[bytes, bytes], sparse, size: int) -> tuple:
        """GNU's pax sparse formats: 0.0 and 0.1 give the map in the records,
        1.0 at the start of the member's data."""
        major, minor = pax.get(b"GNU.sparse.major"), pax.get(b"GNU.sparse.minor")
        if major is None and minor is None and _SPARSE_MAP not in pax:
            return sparse, size
        real = pax.get(b"GNU.sparse.realsize", pax.get(b"GNU.sparse.size"))
        if real is None:
            raise TarError("GNU sparse file without its size")
        size = _decimal(real, "GNU.sparse size")
        if (major, minor) == (b"1", b"0"):
            return self._sparse_map_1_0(), size
        if major not in (None, b"0") or minor not in (None, b"0", b"1") or _SPARSE_MAP not in pax:
            raise TarError(f"unsupported GNU sparse format {quoted(major or b'?')}."
                           f"{quoted(minor or b'?')}")
        numbers = [_decimal(n, "GNU sparse map entry") for n in pax[_SPARSE_MAP].split(b",")]
        if len(numbers) % 2:
            raise TarError("bad GNU sparse map (an offset without its length)")
        return list(zip(numbers[::2], numbers[1::2])), size

    def _sparse_map_1_0(self) -> list:
        """Decimal lines at the start of the data, the count first, padded to a block."""
        numbers: list[int] = []
        count = None
        text = b""
        while count is None or len(numbers) < 2 * count:
            if b"\n" not in text:
                if self._pending < BLOCK or len(text) > 64:
                    raise TarError("bad GNU sparse map at the start of the data")
                text += self._read(BLOCK)
                self._pending -= BLOCK
                continue
            line, text = text.split(b"\n", 1)
            value = _decimal(line, "GNU sparse map entry")
            if count is None:
                if value * 2 * 2 > MAX_METADATA:
                    raise TarError("GNU sparse map is too large")
                count = value
            else:
                numbers.append(value)
        return list(zip(numbers[::2], numbers[1::2]))


def _shown_name(fields: tuple, pax: dict[bytes, bytes], long_name: bytes | None) -> bytes:
    """The name an error names a member by, as far as its headers could be read."""
    name = long_name or _cstr(fields[0])
    if long_name is None and fields[9][:6] == b"ustar\0" and fields[14][0]:
        name = _cstr(fields[14]) + b"/" + name
    return pax.get(b"GNU.sparse.name") or pax.get(b"path") or name


# uid_t, gid_t and a device number's halves are 32 bits; (uid_t)-1 means "no change".
_MAX_ID = 2 ** 32 - 2
# utimensat takes nanoseconds in 64 bits here: dates past 2262 are kept at its end.
_MAX_TIME_NS = 2 ** 63 - 1


def _decimal(value: bytes, what: str) -> int:
    # (19 digits fit 64 bits; int() of thousands of digits is slow, or refused.)
    if not value.isdigit() or len(value) > 19:
        raise TarError(f"bad {what} {quoted(value)}")
    return int(value)


def _checked_map(entries: list, size: int, stored: int) -> tuple:
    """A sparse map in order, inside the file, and covering exactly the stored data.

    (Go's archive/tar refuses maps out of order or overlapping; GNU tar
    never writes them.)
    """
    end = total = 0
    for offset, length in entries:
        if offset < end or offset + length > size:
            raise TarError("bad GNU sparse map (segments out of order or past the end)")
        end = offset + length
        total += length
    if total != stored:
        raise TarError(f"GNU sparse map holds {total} bytes, the member {stored}")
    return tuple(entries)


_PAX_TIME = re.compile(rb"-?[0-9]{1,19}(\.[0-9]*)?\Z")


def _pax_time_ns(value: bytes) -> int:
    if not _PAX_TIME.match(value):
        raise TarError(f"bad PAX mtime {quoted(value)}")
    whole, _, frac = value.partition(b".")
    frac = (frac + b"000000000")[:9]
    sign = -1 if whole.startswith(b"-") else 1
    return int(whole) * 10**9 + sign * int(frac or b"0")


def _xattrs(pax: dict[bytes, bytes]) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for key, value in pax.items():
        if key.startswith(b"SCHILY.xattr."):
            name = key[13:]
        elif key.startswith(b"LIBARCHIVE.xattr."):
            name = unquote_to_bytes(key[17:])
            try:
                value = base64.b64decode(value + b"=" * (-len(value) % 4), validate=True)
            except binascii.Error:
                raise TarError(f"bad PAX {quoted(key)} (not base64)") from None
        else:
            continue
        if not name or b"\0" in name:
            raise TarError(f"bad PAX xattr name {quoted(key)}")
        out[name.decode("utf-8", "surrogateescape")] = value
    return out
