"""A streaming tar reader: headers parsed by hand, bodies copied without detours.

It reads ustar, GNU (long names, long links, base-256 numbers) and pax
(path, linkpath, size, uid, gid, mtime, xattrs) headers from a file-like
stream, one pass, never seeking. Paths stay bytes: a layer may name files in
any encoding. Everything it reads is hashed on the way (the layer's DiffID).
"""

from __future__ import annotations

import base64
import hashlib
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
_TYPES = {b"0": REGULAR, b"\0": REGULAR, b"7": REGULAR, b"1": HARDLINK, b"2": SYMLINK,
          b"3": CHAR, b"4": BLOCKDEV, b"5": DIRECTORY, b"6": FIFO}


class TarError(Exception):
    """The stream is not a tar archive we can read safely."""


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
    if field_[0] & 0x80:                           # GNU base-256: two's complement after the flag
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
    raise TarError(f"bad {what} field {field_[:20]!r} in tar header")


def _header_numbers(block: bytes) -> list[int]:
    """Mode, uid, gid, size and mtime of a header, once its checksum is right."""
    plain = _PLAIN_NUMBERS.match(block, 100)
    if plain:
        *numbers, stored = map(int, plain.groups(), _OCTAL)
    else:
        numbers, stored = None, _number(block[148:156], "checksum")
    if not _checksum_ok(block, stored):
        raise TarError("tar header checksum mismatch (corrupt or not a tar stream)")
    return numbers or [_number(block[start:end], what) for start, end, what in _NUMBER_FIELDS]


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
    if not value.isdigit():
        raise TarError(f"bad pax {key.decode()} value {value[:20]!r}")
    return int(value)


def _parse_pax(data: bytes) -> dict[bytes, bytes]:
    records: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0 or not data[pos:space].isdigit():
            break
        length = int(data[pos:space])
        if length <= 0 or pos + length > len(data):
            raise TarError("bad pax record length")
        record = data[space + 1: pos + length - 1]     # drop trailing newline
        key, sep, value = record.partition(b"=")
        if not sep:
            raise TarError("bad pax record")
        records[key] = value
        pos += length
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
        """Write the current member's body to ``fd`` (None: skip it)."""
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
                raise TarError("unexpected end of archive inside a file")
            take = min(remaining, len(self._buf) - self._pos)
            if fd is not None:
                write_all(fd, memoryview(self._buf)[self._pos:self._pos + take])
            self._pos += take
            remaining -= take
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
        while True:
            if self._pending:
                self.copy_body(None)
            if (self.fast_path is not None and long_name is None and long_link is None
                    and not pax and not self._globals):
                self._pos = self.fast_path(self._buf, self._pos)
            try:
                block = self._read(BLOCK)
            except TarError:
                if self.total == 0:
                    raise TarError("empty layer stream") from None
                raise
            if block == _ZERO_BLOCK:
                self._end_of_archive()
                return
            numbers = _header_numbers(block)
            fields = _HEADER.unpack(block)
            typeflag = fields[7]
            self._pending = numbers[3]
            if typeflag in (b"x", b"g"):
                records = _parse_pax(self.read_body())
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
            member = self._member(fields, numbers, pax, long_name, long_link)
            long_name = long_link = None
            pax = {}
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

    def _member(self, fields: tuple, numbers: list[int], pax: dict[bytes, bytes],
                long_name: bytes | None, long_link: bytes | None) -> Member:
        name, _, _, _, _, _, _, typeflag, linkname, magic, _, _, devmajor, devminor, prefix = fields
        mode, uid, gid, _, mtime = numbers
        kind = _TYPES.get(typeflag)
        if kind is None:
            raise TarError(f"unsupported tar entry type {typeflag!r}")
        name = long_name or _cstr(name)
        if long_name is None and magic[:6] == b"ustar\0" and prefix[0]:
            name = _cstr(prefix) + b"/" + name
        linkname = long_link or _cstr(linkname)
        mtime_ns = mtime * 1_000_000_000
        xattrs = {}
        if pax:
            name, linkname, uid, gid, mtime_ns, xattrs = self._pax_overrides(
                pax, name, linkname, uid, gid, mtime_ns)
        # Links and devices carry no body we use.
        size = self._pending if kind is REGULAR or kind is DIRECTORY else 0
        device = kind is CHAR or kind is BLOCKDEV
        return Member(name, kind, mode & 0o7777, uid, gid, size, mtime_ns,
                      linkname, _number(devmajor, "devmajor") if device else 0,
                      _number(devminor, "devminor") if device else 0, xattrs)

    def _pax_overrides(self, pax: dict[bytes, bytes], name: bytes, linkname: bytes,
                       uid: int, gid: int, mtime_ns: int) -> tuple:
        if any(k.startswith(b"GNU.sparse") for k in pax):
            raise TarError("sparse files in layers are not supported")
        pax_size = _pax_number(pax, b"size")
        if pax_size is not None:
            self._pending = pax_size
        if b"mtime" in pax:
            mtime_ns = _pax_time_ns(pax[b"mtime"])
        pax_uid, pax_gid = _pax_number(pax, b"uid"), _pax_number(pax, b"gid")
        return (pax.get(b"path", name), pax.get(b"linkpath", linkname),
                uid if pax_uid is None else pax_uid, gid if pax_gid is None else pax_gid,
                mtime_ns, _xattrs(pax))


def _pax_time_ns(value: bytes) -> int:
    whole, _, frac = value.partition(b".")
    frac = (frac + b"000000000")[:9]
    sign = -1 if whole.startswith(b"-") else 1
    return int(whole) * 10**9 + sign * int(frac or b"0")


def _xattrs(pax: dict[bytes, bytes]) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for key, value in pax.items():
        if key.startswith(b"SCHILY.xattr."):
            out[key[13:].decode("utf-8", "surrogateescape")] = value
        elif key.startswith(b"LIBARCHIVE.xattr."):
            name = unquote_to_bytes(key[17:]).decode("utf-8", "surrogateescape")
            out[name] = base64.b64decode(value + b"=" * (-len(value) % 4))
    return out
