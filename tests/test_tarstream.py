"""The tar reader on damaged and crafted archives: it ends, and it fails only with TarError.

Mutations of real ustar, GNU and pax archives (written by Python's tarfile),
most with their header checksums fixed up so that the damage reaches the
field parsers: numbers with signs, base-256 values, huge sizes, stray type
flags, cut blocks. A reader that loops (a size of -512 once rewound it onto
its own header) or raises anything but TarError fails here.
"""

from __future__ import annotations

import io
import os
import random
import re
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


# --- against Python's tarfile ------------------------------------------------------------------

class _AsGnuTarReadsIt(tarfile.TarInfo):
    """tarfile, told three things GNU tar (which dkr follows) reads otherwise.

    Each is changed in a header whose checksum adds up, and the checksum
    made to add up again: GNU tar reads device numbers only for devices
    (tarfile for every member, and refuses a bad one); it joins the prefix
    field to the name only in POSIX headers (tarfile in any but GNU's long
    name and sparse headers); and a NUL, '0' or '7' member whose final name
    (a long or pax name, if it has one) ends in "/" is a directory to it
    (to tarfile only a NUL one, and by the header's own name).
    """

    @classmethod
    def fromtarfile(cls, tar):
        buf = tar.fileobj.read(tarfile.BLOCKSIZE)
        given = getattr(tar, "final_name", None) or getattr(tar, "global_name", None)
        obj = cls.frombuf(_as_gnu_tar_reads(buf, given), tar.encoding, tar.errors)
        obj.offset = tar.fileobj.tell() - tarfile.BLOCKSIZE
        if obj.type == tarfile.XGLTYPE:
            tar.global_name = _name_given_by(obj, tar) or getattr(tar, "global_name", None)
        elif obj.type in (tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE):
            tar.final_name = _name_given_by(obj, tar) or getattr(tar, "final_name", None)
        elif obj.type != tarfile.GNUTYPE_LONGLINK:
            tar.final_name = None
        return obj._proc_member(tar)


def _name_given_by(extension: tarfile.TarInfo, tar) -> bytes | None:
    at = tar.fileobj.tell()
    body = tar.fileobj.read(min(extension.size, 1 << 20))
    tar.fileobj.seek(at)
    if extension.type == tarfile.GNUTYPE_LONGNAME:
        return body.split(b"\0", 1)[0]
    found = re.findall(rb"(?:^|\n)\d+ path=([^\n]*)\n", body)
    return found[-1] if found else None


def _as_gnu_tar_reads(buf: bytes, final_name: bytes | None) -> bytes:
    if len(buf) != 512 or buf == bytes(512):
        return buf
    try:
        if tarfile.nti(buf[148:156]) not in tarfile.calc_chksums(buf):
            return buf
    except tarfile.HeaderError:
        return buf
    out = bytearray(buf)
    if out[156:157] not in (b"3", b"4"):
        out[329:345] = bytes(16)
    if out[257:263] != b"ustar\0":
        out[345] = 0
    header_name = buf[:100].split(b"\0", 1)[0]
    final = header_name if final_name is None else final_name
    if out[156:157] in (b"\0", b"0", b"7"):
        if final.endswith(b"/"):
            out[156:157] = b"5"
        elif header_name.endswith(b"/"):
            out[156:157] = b"0"
    out[148:156] = b" " * 8
    out[148:156] = b"%06o\0 " % sum(out)
    return bytes(out)


_KINDS = {tarfile.LNKTYPE: tarstream.HARDLINK, tarfile.SYMTYPE: tarstream.SYMLINK,
          tarfile.CHRTYPE: tarstream.CHAR, tarfile.BLKTYPE: tarstream.BLOCKDEV,
          tarfile.DIRTYPE: tarstream.DIRECTORY, tarfile.FIFOTYPE: tarstream.FIFO}
SMALL = 1 << 16          # bodies compared byte for byte up to this size


def _expected(ti: tarfile.TarInfo, content: bytes | None) -> tuple:
    kind = tarstream.REGULAR if ti.isreg() else _KINDS.get(ti.type, ("unknown", ti.type))
    name = ti.name.encode("utf-8", "surrogateescape").rstrip(b"/")
    link = ti.linkname.encode("utf-8", "surrogateescape") if kind in (
        tarstream.HARDLINK, tarstream.SYMLINK) else b""
    device = (ti.devmajor, ti.devminor) if kind in (tarstream.CHAR, tarstream.BLOCKDEV) else None
    xattrs = {k[13:]: v.encode("utf-8", "surrogateescape") for k, v in ti.pax_headers.items()
              if k.startswith("SCHILY.xattr.")}
    size = ti.size if kind == tarstream.REGULAR else 0
    return (name, kind, ti.mode & 0o7777, ti.uid, ti.gid, size, link, device, xattrs, content)


def _tarfile_reads(data: bytes) -> tuple[str, list | None]:
    """What tarfile reads: ("read", members), ("refused", None), or
    ("dangling", members) where it refuses only an extension header (long
    name, long link, pax) with no member after it, which GNU tar and Go's
    archive/tar drop, and dkr too.

    tarfile ends quietly at the first bad header after the first member, and
    reads no body unless asked: an archive counts as read only if it ended at
    an end-of-archive marker (a zero block and then the end of the stream or
    another zero block, as dkr and Go's archive/tar want it) or the end of
    the stream, with every regular member's body there.
    """
    members = []
    tar = None
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:",
                          tarinfo=_AsGnuTarReadsIt) as tar:
            for ti in tar:
                if ti.size < 0 or len(members) > 50:
                    return "refused", None   # (a negative size rewinds tarfile, for ever)
                content = None
                if ti.isreg() and not ti.sparse:
                    f = tar.extractfile(ti)
                    body = f.read(SMALL + 1)
                    content = body if len(body) <= SMALL else None
                    if len(body) < min(ti.size, SMALL + 1):
                        return "refused", None
                    if ti.size > SMALL:      # read the rest: its end must be there
                        f.seek(ti.size - 1)
                        if len(f.read(1)) != 1:
                            return "refused", None
                members.append(_expected(ti, content))
            end = tar.offset
    except Exception:  # noqa: BLE001 - tarfile refuses with whatever it raises
        if tar is not None and members and _dangling(data, tar.offset):
            return "dangling", members
        return "refused", None
    if not _ends_there(data, end):
        return "refused", None
    return "read", members


def _ends_there(data: bytes, at: int) -> bool:
    rest = data[at:]
    return not rest or (rest[:512] == bytes(512)
                        and (len(rest) == 512 or rest[512:1024] == bytes(512)))


def _dangling(data: bytes, at: int) -> bool:
    """Extension headers at ``at`` (checksums right), and then the end."""
    seen = False
    while at + 512 <= len(data) and data[at + 156:at + 157] in (b"L", b"K", b"x", b"g"):
        block = data[at:at + 512]
        try:
            if tarfile.nti(block[148:156]) not in tarfile.calc_chksums(block):
                return False
            size = tarfile.nti(block[124:136])
        except tarfile.HeaderError:
            return False
        if size < 0 or at + 512 + size > len(data):
            return False
        at += 512 + -(-size // 512) * 512
        seen = True
    return seen and _ends_there(data, at)


def _dkr_reads(data: bytes, rng: random.Random) -> tuple[list, tarstream.TarError | None]:
    members = []
    reader = tarstream.TarReader(_Chunks(data, rng), max_bytes=1 << 26)
    try:
        for m in reader:
            content = None
            if m.kind == tarstream.REGULAR:
                fd = os.memfd_create("body")
                try:
                    if m.sparse is None and m.size <= SMALL:
                        reader.copy_body(fd)
                        content = os.pread(fd, SMALL + 1, 0)
                    else:
                        reader.copy_body(None)
                finally:
                    os.close(fd)
            link = m.linkname if m.kind in (tarstream.HARDLINK, tarstream.SYMLINK) else b""
            device = (m.devmajor, m.devminor) if m.kind in (tarstream.CHAR,
                                                             tarstream.BLOCKDEV) else None
            members.append((m.path.rstrip(b"/"), m.kind, m.mode, m.uid, m.gid, m.size, link,
                            device, m.xattrs, content))
        reader.drain()
    except tarstream.TarError as e:
        return members, e
    return members, None


# Where tarfile reads on and dkr refuses, and GNU tar or Go's archive/tar (or the
# runtimes built on it) refuse too: (pattern of dkr's error, why).
STRICTER = [
    (r"unsupported tar entry type", "types no runtime extracts: Docker, containerd and umoci "
                                    "refuse them (see dkr.unpack.tarstream._decode)"),
    (r"PAX", "tarfile ignores a malformed pax record or value (takes 0 for a bad uid or mtime); "
             "GNU tar and Go refuse them"),
    (r"sparse", "tarfile reads a sparse map without checking it against the data; GNU tar and "
                "Go do"),
    (r"out of range", "owners and device numbers that no uid_t or dev_t holds"),
    (r"negative", "tarfile takes a negative size or owner; GNU tar and Go refuse them"),
    (r"bad \w+ field '[^']*[-+_]", "int() takes signs and underscores, GNU tar and Go do not"),
]


def _not_comparable(members, data: bytes) -> bool:
    """Archives tarfile reads otherwise than GNU tar in ways the header fix-up
    above cannot reach: an empty long name (Go's archive/tar, as dkr,
    keeps the header's own name then; tarfile takes the empty one); two long
    names or pax headers for one member (the last counts to GNU tar and Go,
    the first to tarfile, whose pax_headers then show only the first); a
    long name whose size ends before its first NUL (GNU tar and Go read as
    many bytes as the size says, tarfile the whole block)."""
    return any(not m[0] for m in members) or _tarfile_reads_otherwise(data)


def _tarfile_reads_otherwise(data: bytes) -> bool:
    at, seen = 0, []
    while at + 512 <= len(data) and data[at:at + 512] != bytes(512):
        flag = data[at + 156:at + 157]
        if flag in (b"L", b"K", b"x", b"X"):
            if flag in seen:
                return True
            seen.append(flag)
        else:
            seen = []
        try:
            size = tarfile.nti(data[at + 124:at + 136])
        except tarfile.HeaderError:
            return False
        if flag in (b"1", b"2", b"3", b"4", b"5", b"6") or size < 0:
            size = 0
        if flag in (b"L", b"K") and b"\0" not in data[at + 512:at + 512 + size] and \
                data[at + 512 + size:at + 513 + size] not in (b"", b"\0"):
            return True
        at += 512 + -(-size // 512) * 512
    return False


PAX_VALUES = [b"mtime=12a", b"uid=x", b"gid=-1", b"size=9z", b"mtime=1.5e3",
              b"LIBARCHIVE.xattr.user.a=!!!", b"path=a\0b", b"GNU.sparse.map=1,2,3",
              b"GNU.sparse.major=1"]


def _mutate_more(rng: random.Random, data: bytes) -> bytes:
    """_mutate, and what the reader's newer paths read: pax values, trailing
    slashes, header-only types over a body."""
    out = bytearray(_mutate(rng, data))
    headers = [o for o in range(0, len(out) - 511, 512) if out[o + 257:o + 262] == b"ustar"]
    if not headers:
        return bytes(out)
    pick = rng.random()
    at = rng.choice(headers)
    if pick < 0.2:                                  # a pax record's value
        start = out.find(b"=", at + 512, at + 1024)
        if out[at + 156] == ord("x") and start > 0:
            record = rng.choice(PAX_VALUES)
            line = b" " + record + b"\n"
            line = str(len(line) + 2).encode() + line
            body_len = int(out[at + 124:at + 135], 8) if out[at + 124:at + 135].isdigit() else 0
            out[at + 512:at + 512 + body_len] = line[:body_len].ljust(body_len, b"\n")
    elif pick < 0.35:                               # a name ending in "/"
        end = out.find(b"\0", at, at + 100)
        if end > at:
            out[end] = ord("/")
    elif pick < 0.5:                                # a header-only type over a body
        out[at + 156] = rng.choice(b"123456")
    _fix_checksums(out)
    return bytes(out)


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT],
                         ids=["ustar", "gnu", "pax"])
def test_mutated_archives_read_as_tarfile_reads_them(fmt):
    """An archive tarfile reads gives the same members from dkr; one it refuses
    is a TarError from dkr, never another exception (see STRICTER for where
    dkr, with GNU tar or Go, refuses what tarfile reads)."""
    rng = random.Random(1000 + fmt)
    original = _archive(fmt)
    compared = refused = stricter = 0
    for case in range(1500):
        damaged = _mutate_more(rng, original)
        verdict, expected = _tarfile_reads(damaged)
        members, error = _dkr_reads(damaged, rng)
        if expected is None:
            assert error is not None, f"case {case}: tarfile refuses, dkr reads {members}"
            refused += 1
            continue
        if error is not None:
            reason = [why for pattern, why in STRICTER if re.search(pattern, str(error))]
            assert reason or _not_comparable(expected, damaged), \
                f"case {case}: tarfile reads {len(expected)} members, dkr: {error}\n" \
                f"{damaged[:2048]!r}"
            stricter += 1
            continue
        if _not_comparable(expected, damaged):
            continue
        assert members == expected, f"case {case}: {damaged[:2048]!r}"
        compared += 1
    # The mutations must reach every outcome, or the test says little.
    assert compared > 150 and refused > 150 and stricter > 20, (compared, refused, stricter)


# --- malformed values: a TarError that names the member ------------------------------------

def _pax_member(records: dict, name: str = "x", data: bytes = b"abc") -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size, info.pax_headers = len(data), records
        tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _raw_pax(body: bytes) -> bytes:
    info = tarfile.TarInfo("PaxHeaders/x")
    info.type, info.size = tarfile.XHDTYPE, len(body)
    return info.tobuf(tarfile.USTAR_FORMAT) + body + bytes(-len(body) % 512)


def _with_field(offset: int, value: bytes, typeflag: bytes = b"0") -> bytes:
    data = bytearray(_gnu_member(size=1))
    data[offset:offset + len(value)] = value
    data[156:157] = typeflag
    data[0:4] = b"x\0\0\0"
    _fix_checksums_gnu(data)
    return bytes(data)


MALFORMED = {
    "pax mtime": (_pax_member({"mtime": "12a"}), r"member 'x': bad PAX mtime '12a'$"),
    "pax mtime exponent": (_pax_member({"mtime": "1e5"}), r"member 'x': bad PAX mtime '1e5'$"),
    "pax uid": (_pax_member({"uid": "-1"}), r"member 'x': bad PAX uid '-1'$"),
    "pax gid too big": (_pax_member({"gid": "9" * 12}), r"member 'x': owner .* out of range"),
    "pax size": (_pax_member({"size": "12x"}), r"member 'x': bad PAX size '12x'$"),
    "base64 xattr": (_pax_member({"LIBARCHIVE.xattr.user.a": "!!!"}),
                     r"member 'x': bad PAX 'LIBARCHIVE.xattr.user.a' \(not base64\)$"),
    "empty xattr name": (_pax_member({"SCHILY.xattr.": "v"}),
                         r"member 'x': bad PAX xattr name 'SCHILY.xattr.'$"),
    "nul in path": (_pax_member({"path": "a\0b"}), r"member 'a\\x00b': .*NUL"),
    "pax record": (_raw_pax(b"5 a\n") + _pax_member({}), r"member 'x': bad PAX record"),
    "pax record key": (_raw_pax(b"6 =ab\n") + _pax_member({}), r"member 'x': bad PAX record"),
    "pax record length digits": (_raw_pax(b"9" * 5000 + b" a=b\n") + _pax_member({}),
                                 r"member 'x': bad PAX record length$"),
    "pax uid digits": (_pax_member({"uid": "9" * 5000}), r"member 'x': bad PAX uid '9+'\.\.\.$"),
    "sparse map odd": (_pax_member({"GNU.sparse.map": "0,3,7", "GNU.sparse.size": "10"}),
                       r"member 'x': bad GNU sparse map"),
    "sparse map size": (_pax_member({"GNU.sparse.map": "0,5", "GNU.sparse.size": "10"}),
                        r"member 'x': GNU sparse map holds 5 bytes, the member 3$"),
    "sparse map past end": (_pax_member({"GNU.sparse.map": "8,3", "GNU.sparse.size": "10"}),
                            r"member 'x': bad GNU sparse map \(segments out of order"),
    "sparse version": (_pax_member({"GNU.sparse.major": "2", "GNU.sparse.minor": "0",
                                    "GNU.sparse.realsize": "3"}),
                       r"member 'x': unsupported GNU sparse format '2'.'0'$"),
    "sparse 1.0 map": (_pax_member({"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                                    "GNU.sparse.realsize": "3"}, data=b"z" * 600),
                       r"member 'x': bad GNU sparse map at the start of the data$"),
    "mode field": (_with_field(100, b"0_00644\0"), r"member 'x': bad mode field '0_00644"),
    "base-256 flag": (_with_field(108, b"\x81" + bytes(7)), r"member 'x': bad uid field"),
    "device number": (_with_field(329, b"\x80" + b"\xff" * 7, b"3"),
                      r"member 'x': device number .* out of range"),
    "body cut short": (_gnu_member(size=2000)[:1024],
                       r"member 'old': unexpected end of archive inside its data"),
    "unknown type": (_with_field(156, b"Z", b"Z"), r"member 'x': unsupported tar entry type"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_value_is_a_tar_error_naming_its_member(case):
    data, pattern = MALFORMED[case]
    with pytest.raises(tarstream.TarError) as caught:
        reader = tarstream.TarReader(io.BytesIO(data))
        for _ in reader:
            reader.copy_body(None)
        reader.drain()
    assert re.search(pattern, str(caught.value)), str(caught.value)
    assert "\n" not in str(caught.value)
