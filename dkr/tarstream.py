"""A streaming tar reader: headers parsed by hand, bodies copied without detours.

It reads ustar, GNU (long names, long links, base-256 numbers) and pax
(path, linkpath, size, uid, gid, mtime, xattrs) headers from a file-like
stream, one pass, never seeking. Paths stay bytes: a layer may name files in
any encoding. Everything it reads is hashed on the way (the layer's DiffID).
"""

from __future__ import annotations

import base64
import hashlib
import os
import queue
import threading
from urllib.parse import unquote_to_bytes
from dataclasses import dataclass, field

BLOCK = 512
CHUNK = 1024 * 1024
# Data after the end-of-archive blocks still counts for the DiffID, so it is
# read and hashed; tar writers pad to a record (10 KiB by default), nothing
# legitimate adds megabytes. More than this is refused instead of inflating a
# bomb of trailing zeros for minutes.
MAX_TRAILING = 4 * 1024 * 1024

REGULAR, HARDLINK, SYMLINK, CHAR, BLOCKDEV, DIRECTORY, FIFO = (
    "file", "hardlink", "symlink", "char", "block", "dir", "fifo")
_TYPES = {b"0": REGULAR, b"\0": REGULAR, b"7": REGULAR, b"1": HARDLINK, b"2": SYMLINK,
          b"3": CHAR, b"4": BLOCKDEV, b"5": DIRECTORY, b"6": FIFO}


class TarError(Exception):
    """The stream is not a tar archive we can read safely."""


@dataclass
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


def _number(field_: bytes, what: str) -> int:
    if field_[:1] and field_[0] & 0x80:          # GNU base-256
        value = int.from_bytes(field_, "big", signed=False) & ~(0x80 << (8 * (len(field_) - 1)))
        return value
    text = field_.split(b"\0", 1)[0]
    try:
        return int(text, 8)                      # int() skips the spaces itself
    except ValueError:
        if not text.strip(b" "):
            return 0
        raise TarError(f"bad {what} field {text[:20]!r} in tar header") from None


def _cstr(field_: bytes) -> bytes:
    return field_.split(b"\0", 1)[0]


def _checksum_ok(block: bytes) -> bool:
    stored = _number(block[148:156], "checksum")
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
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

    def __init__(self, stream, depth: int = 4):
        self.stream = stream
        self.hash = hashlib.sha256()
        self._chunks: queue.Queue = queue.Queue(depth)
        self._error: BaseException | None = None
        self._finished = False
        self._thread = threading.Thread(target=self._fill, name="inflate", daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        try:
            while True:
                chunk = self.stream.read(CHUNK)
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


class TarReader:
    """Yields Members; the caller must consume each member's body (copy or skip)."""

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
        while remaining:
            if self._pos >= len(self._buf) and not self._more():
                raise TarError("unexpected end of archive inside a file")
            take = min(remaining, len(self._buf) - self._pos)
            if fd is not None:
                view = memoryview(self._buf)[self._pos:self._pos + take]
                while view:
                    view = view[os.write(fd, view):]
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
            try:
                block = self._read(BLOCK)
            except TarError:
                if self.total == 0:
                    raise TarError("empty layer stream") from None
                raise
            if block == bytes(BLOCK):
                self._end_of_archive()
                return
            if not _checksum_ok(block):
                raise TarError("tar header checksum mismatch (corrupt or not a tar stream)")
            typeflag = block[156:157]
            self._pending = _number(block[124:136], "size")
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
            member = self._member(block, typeflag, {**self._globals, **pax}, long_name, long_link)
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
        if self._buf[self._pos:self._pos + BLOCK] != bytes(BLOCK):
            raise TarError("a lone zero block in the middle of the tar archive "
                           "(members hidden after an end marker?)")
        self._pos += BLOCK

    def _member(self, block: bytes, typeflag: bytes, pax: dict[bytes, bytes],
                long_name: bytes | None, long_link: bytes | None) -> Member:
        kind = _TYPES.get(typeflag)
        if kind is None:
            raise TarError(f"unsupported tar entry type {typeflag!r}")
        if pax and any(k.startswith(b"GNU.sparse") for k in pax):
            raise TarError("sparse files in layers are not supported")
        name = _cstr(block[0:100])
        if block[257:263] == b"ustar\0":
            prefix = _cstr(block[345:500])
            if prefix:
                name = prefix + b"/" + name
        name = pax.get(b"path", long_name or name)
        linkname = pax.get(b"linkpath", long_link or _cstr(block[157:257]))
        if pax:
            pax_size = _pax_number(pax, b"size")
            if pax_size is not None:
                self._pending = pax_size
        mtime_ns = _number(block[136:148], "mtime") * 10**9
        if b"mtime" in pax:
            mtime_ns = _pax_time_ns(pax[b"mtime"])
        if kind != REGULAR and kind != DIRECTORY:
            size = 0                       # links and devices carry no body we use
        else:
            size = self._pending
        uid, gid = (_pax_number(pax, b"uid"), _pax_number(pax, b"gid")) if pax else (None, None)
        device = kind == CHAR or kind == BLOCKDEV
        return Member(
            path=name, kind=kind, mode=_number(block[100:108], "mode") & 0o7777,
            uid=_number(block[108:116], "uid") if uid is None else uid,
            gid=_number(block[116:124], "gid") if gid is None else gid,
            size=size, mtime_ns=mtime_ns, linkname=linkname,
            devmajor=_number(block[329:337], "devmajor") if device else 0,
            devminor=_number(block[337:345], "devminor") if device else 0,
            xattrs=_xattrs(pax) if pax else {})


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
