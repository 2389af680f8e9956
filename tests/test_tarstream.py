"""The tar reader on damaged and crafted archives: it ends, and it fails only with TarError.

Mutations of real ustar, GNU and pax archives (written by Python's tarfile),
most with their header checksums fixed up so that the damage reaches the
field parsers: numbers with signs, base-256 values, huge sizes, stray type
flags, cut blocks. A reader that loops (a size of -512 once rewound it onto
its own header) or raises anything but TarError fails here.
"""

from __future__ import annotations

import io
import random
import signal
import tarfile

import pytest

from dkr.unpack import tarstream

NUMBERS = [b"-0000001000\0", b"77777777777\0", b"\x80" + bytes(10) + b"\x01", b"\xff" * 12,
           b"0" * 12, b" " * 12, b"0_00000644\0 "]
TYPE_FLAGS = [b"x", b"g", b"L", b"K", b"1", b"2", b"5", b"S", b"\0", b"7"]


def _archive(fmt: int) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for i in range(6):
            name = ("d/" * 40 if i == 3 else f"dir{i % 2}/") + f"f{i}"
            if i == 3 and fmt != tarfile.USTAR_FORMAT:
                name += "x" * 120                      # a GNU long name or a pax path
            info = tarfile.TarInfo(name)
            data = bytes([i]) * (i * 700)
            info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
            if i == 4 and fmt == tarfile.PAX_FORMAT:
                info.pax_headers = {"SCHILY.xattr.user.a": "v"}
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link")
        link.type, link.linkname = tarfile.SYMTYPE, "dir0/f0"
        tar.addfile(link)
    return out.getvalue()


def _fix_checksums(data: bytearray) -> None:
    for offset in range(0, len(data) - 511, 512):
        if data[offset + 257:offset + 262] == b"ustar":
            data[offset + 148:offset + 156] = b" " * 8
            data[offset + 148:offset + 156] = b"%06o\0 " % sum(data[offset:offset + 512])


FIELDS = [(100, 8), (108, 8), (116, 8), (124, 12), (136, 12), (329, 8), (337, 8)]


def _mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    headers = [o for o in range(0, len(out) - 511, 512) if out[o + 257:o + 262] == b"ustar"]
    for _ in range(rng.randint(1, 6)):
        pos = rng.randrange(len(out))
        pick = rng.random()
        if pick < 0.3:
            out[pos] = rng.randrange(256)
        elif pick < 0.7:                               # a number field of some header
            start, size = rng.choice(FIELDS)
            start += rng.choice(headers)
            value = rng.choice(NUMBERS)
            out[start:start + size] = value[:size] if rng.random() < 0.5 else value[-size:]
        elif pick < 0.85:
            out[rng.choice(headers) + 156] = rng.choice(TYPE_FLAGS)[0]
        else:
            del out[pos:pos + rng.randrange(1, 600)]
        headers = [o for o in headers if o + 512 <= len(out)] or [0]
    if rng.random() < 0.8:
        _fix_checksums(out)
    return bytes(out)


class _Chunks:
    """A stream that hands out odd-sized pieces, as a pipe may."""

    def __init__(self, data: bytes, rng: random.Random):
        self._data, self._rng = io.BytesIO(data), rng

    def read(self, size: int = -1) -> bytes:
        return self._data.read(self._rng.choice([1, 7, 512, 4096, 1 << 20]))


class _Endless(Exception):
    pass


def _raise_endless(*_):
    raise _Endless


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT],
                         ids=["ustar", "gnu", "pax"])
def test_damaged_archives_end_with_a_tar_error_or_members(fmt):
    rng = random.Random(fmt)
    original = _archive(fmt)
    assert len(list(tarstream.TarReader(_Chunks(original, rng)))) == 7
    previous = signal.signal(signal.SIGALRM, _raise_endless)
    try:
        for case in range(3000):
            damaged = _mutate(rng, original)
            signal.setitimer(signal.ITIMER_REAL, 5.0)
            try:
                reader = tarstream.TarReader(_Chunks(damaged, rng), max_bytes=1 << 26)
                for _ in reader:
                    if rng.random() < 0.5:
                        reader.copy_body(None)
                reader.drain()
            except tarstream.TarError:
                pass
            except _Endless:
                pytest.fail(f"case {case}: the reader did not end: {damaged[:1024]!r}")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        signal.signal(signal.SIGALRM, previous)


def _gnu_member(**fields) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("old")
        for name, value in fields.items():
            setattr(info, name, value)
        tar.addfile(info, io.BytesIO(b"x" * info.size))
    return out.getvalue()


def test_gnu_base_256_numbers_keep_their_sign():
    """A file from before 1970: GNU tar writes its mtime as a negative base-256 number."""
    data = _gnu_member(mtime=-86400, size=1, uid=8 ** 8)     # both past what octal can hold
    assert data[136] == 0xff and data[108] == 0x80
    [member] = _members(data)
    assert member.mtime_ns == -86400 * 10 ** 9 and member.uid == 8 ** 8


def test_a_negative_base_256_size_or_owner_is_a_tar_error():
    for offset in (108, 124):
        data = bytearray(_gnu_member(mtime=0, size=1))
        data[offset:offset + 8] = b"\xff" * 8
        _fix_checksums_gnu(data)
        with pytest.raises(tarstream.TarError, match="negative"):
            _members(bytes(data))


def _fix_checksums_gnu(data: bytearray) -> None:
    data[148:156] = b" " * 8
    data[148:156] = b"%06o\0 " % sum(data[:512])


def _members(data: bytes) -> list:
    return list(tarstream.TarReader(io.BytesIO(data)))


def test_the_header_byte_sum_is_exact_for_any_block():
    """Checksums are summed through Adler-32 halves: exact only while no half can
    reach 65521, so all-0xff blocks (the largest sums) are among the cases."""
    import random

    from dkr.unpack.tarstream import _byte_sum
    rng = random.Random(7)
    blocks = [bytes(512), b"\xff" * 512, b"\xff" * 256 + bytes(256), bytes(256) + b"\xff" * 256]
    blocks += [bytes(rng.getrandbits(8) for _ in range(512)) for _ in range(300)]
    assert [_byte_sum(b) for b in blocks] == [sum(b) for b in blocks]


def test_read_ahead_holds_what_it_is_told_to():
    """A job started before its tree reads far ahead; once the tree is there it
    holds no more than a direct job (extractors run one per core)."""
    import io
    import time

    from dkr.unpack.tarstream import CHUNK, ReadAhead

    def held_settles_at(ahead: ReadAhead, count: int) -> int:
        for _ in range(500):
            if ahead._chunks.qsize() >= count:
                break
            time.sleep(0.01)
        time.sleep(0.05)                        # room for one more, if it would take it
        return ahead._chunks.qsize()

    ahead = ReadAhead(lambda: io.BytesIO(bytes(30 * CHUNK)), depth=16)
    assert held_settles_at(ahead, 16) == 16
    ahead.keep_ahead(4)
    for _ in range(13):
        assert len(ahead.read()) == CHUNK
    assert held_settles_at(ahead, 4) == 4
    assert sum(len(chunk) for chunk in iter(ahead.read, b"")) == 17 * CHUNK
