"""The extractor's C fast path for plain files: what it takes, and what it leaves to Python.

`dkr.unpack._tarcore.create_plain_files` must create exactly what the Python path
would, and stop, untouched, before any member it does not take.
"""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
import tarfile

import pytest

from dkr.unpack import _tarcore
from dkr.unpack import extract
from dkr.unpack import tarstream
from dkr.testing import images
from dkr.testing.oracle import diff_trees, tree_snapshot

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the fast path serves root only")


def _padded(n: int) -> int:
    return -(-n // 512) * 512


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    umask = os.umask(0)                 # as in the extractor
    yield tmp_path
    os.umask(umask)


@pytest.fixture(scope="module")
def classify():
    return extract._load_classifier()


def test_plain_files_get_their_bytes_mode_owner_and_mtime(in_tmp, classify):
    os.mkdir("sgid", 0o2775)
    os.chown("sgid", 0, 1234)           # its group would pass to new files
    files = [images.File("empty", b""),
             images.File("small", b"x" * 511, mode=0o600),
             images.File("block", b"y" * 512, uid=1000, gid=1001),
             images.File("setuid", os.urandom(5000), mode=0o4755, mtime=1_234_567_890),
             images.File("sgid/setgid", b"z" * 700, mode=0o2711, uid=7)]
    tar = images.Layer(files).tar
    added: set[bytes] = set()
    pos, created = _tarcore.create_plain_files(tar, 0, classify, added)
    assert (pos, created) == (len(tar) - 1024, 5)       # up to the end-of-archive blocks
    assert added == {f.path.encode() for f in files}
    for f in files:
        st = os.lstat(f.path)
        assert (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode)) == (stat.S_IFREG, f.mode)
        assert (st.st_uid, st.st_gid, st.st_mtime_ns) == (f.uid, f.gid, f.mtime * 10**9)
        assert open(f.path, "rb").read() == f.data


def _pax_header_of(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.pax_headers = {"comment": "forces a pax header"}
    return info


class _GnuTarInfo(tarfile.TarInfo):
    def tobuf(self, format=None, encoding="utf-8", errors="surrogateescape"):
        return super().tobuf(tarfile.GNU_FORMAT, encoding, errors)


def _gnu_long_name(name: str) -> tarfile.TarInfo:
    info = _GnuTarInfo(name)
    info.size = 1
    return info


def _bad_checksum(tar: bytes, at: int) -> bytes:
    out = bytearray(tar)
    out[at] ^= 1                        # in the name: parsing would go on undisturbed
    return bytes(out)


DECLINED = {
    "a directory": lambda: [images.Dir("b")],
    "a symlink": lambda: [images.Symlink("b", "a")],
    "a whiteout": lambda: [images.Whiteout("a")],
    "an opaque marker": lambda: [images.Opaque("d")],
    "a pax header": lambda: [images.Raw(_pax_header_of(images.File("b", b"1").tarinfo()), b"1")],
    "a GNU long name": lambda: [images.Raw(_gnu_long_name("n" * 120), b"1")],
    "a pax path and more": lambda: [images.File("n" * 120, b"1", mtime=1.5)],
    "a pax path with ..": lambda: [images.File("d/" + "n" * 120 + "/../b", b"1")],
    "a pax-named whiteout": lambda: [images.Whiteout("d/" + "n" * 120)],
    "a pax-named directory": lambda: [images.Dir("n" * 120)],
    "a name with ./": lambda: [images.File("./b", b"1")],
    "a name with ..": lambda: [images.File("d/../b", b"1")],
    "a name with //": lambda: [images.File("d//b", b"1")],
    "a trailing slash": lambda: [images.File("d/b/", b"1")],
    "a missing parent": lambda: [images.File("nowhere/b", b"1")],
    "a name taken": lambda: [images.File("taken", b"1")],
    "a hardlink": lambda: [images.Hardlink("b", "a")],
    "a fifo": lambda: [images.Fifo("b")],
}


@pytest.mark.parametrize("case", sorted(DECLINED))
def test_it_stops_before_a_member_it_does_not_take(in_tmp, classify, case):
    os.mkdir("d")
    open("taken", "w").close()
    first = images.File("a", b"a" * 600)
    tar = images.Layer([first, *DECLINED[case](), images.File("z", b"z")]).tar
    added: set[bytes] = set()
    pos, created = _tarcore.create_plain_files(tar, 0, classify, added)
    assert (pos, created, added) == (512 + _padded(600), 1, {b"a"})
    assert sorted(os.listdir()) == ["a", "d", "taken"]
    assert os.listdir("d") == []
    assert os.path.getsize("taken") == 0


def test_a_long_name_in_a_pax_header_of_its_own_is_taken(in_tmp, classify):
    """What tar writers do for names over 100 bytes: a pax header with only "path"."""
    os.makedirs("d/" + "e" * 90)
    long_name = "d/" + "e" * 90 + "/" + "f" * 60
    tar = images.Layer([images.File(long_name, b"long", mode=0o640), images.File("z", b"z")]).tar
    assert tar[156:157] == b"x"                      # (the layer starts with a pax header)
    added: set[bytes] = set()
    pos, created = _tarcore.create_plain_files(tar, 0, classify, added)
    assert (pos, created) == (len(tar) - 1024, 2)
    assert added == {long_name.encode(), b"z"}
    assert open(long_name, "rb").read() == b"long"
    assert stat.S_IMODE(os.lstat(long_name).st_mode) == 0o640


def test_it_stops_at_a_checksum_that_does_not_add_up_and_at_a_short_body(in_tmp, classify):
    tar = images.Layer([images.File("a", b"a"), images.File("b", b"b" * 3000)]).tar
    second = 512 + 512
    for damaged in (_bad_checksum(tar, second), tar[:second + 512 + 2999]):
        assert _tarcore.create_plain_files(damaged, second, classify, set()) == (second, 0)
    assert os.listdir() == []
    assert _tarcore.create_plain_files(tar, second, classify, set()) == (second + 512 + 3072, 1)


def test_a_failing_write_raises_and_closes_the_file():
    """(In a child: it lowers its file size limit until writes fail with EFBIG.)"""
    code = """if True:
        import errno, os, resource, signal, tempfile
        from dkr.unpack import _tarcore
        from dkr.testing import images
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        os.chdir(tempfile.mkdtemp())
        tar = images.Layer([images.File("big", b"x" * 8192)]).tar
        fds = len(os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
        try:
            _tarcore.create_plain_files(tar, 0, lambda path, *numbers: None, set())
        except OSError as e:
            assert e.errno == errno.EFBIG, e
        else:
            raise AssertionError("no error")
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
        assert len(os.listdir("/proc/self/fd")) == fds, "a descriptor was left open"
        assert os.path.getsize("big") == 4096
        print("ok")
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


def _extract_here(tar: bytes, classify, fast: bool) -> int:
    extractor = extract.Extractor("stacked", classify, as_root=True)
    reader = tarstream.TarReader(io.BytesIO(tar))
    if fast:
        reader.fast_path = extractor.create_plain_files
    extract._apply_all(extractor, reader, reader)
    reader.drain()
    extractor.resolve_whiteouts()
    extractor.finish_dirs()
    return extractor.entries


def test_with_and_without_it_a_layer_makes_the_same_tree(in_tmp, classify):
    """A layer that mixes what the fast path takes with what it leaves, in a
    stream whose read chunks end inside members."""
    entries = [images.Dir("etc", mode=0o2750, gid=5)]
    for i in range(400):
        entries.append(images.File(f"etc/f{i}", os.urandom(i * 37 % 9000),
                                   mode=0o640 | (i % 3) << 10, uid=i % 3, gid=i % 5,
                                   mtime=1_600_000_000 + i))
    entries += [images.File("etc/f1", b"again"),               # replaces a file: name taken
                images.Hardlink("etc/link", "etc/f2"),
                images.Whiteout("etc/f3"),
                images.File("deep/er/file", b"parents made by Python"),
                images.File("etc/big", os.urandom(3 * tarstream.CHUNK // 2)),
                images.Symlink("etc/f4", "f5"),                  # a symlink replaces a file
                images.File("etc/" + "x" * 150, b"long"),
                images.File("etc/tail", b"after it all")]
    tar = images.Layer(entries).tar
    (in_tmp / "fast").mkdir()
    (in_tmp / "slow").mkdir()
    os.chdir(in_tmp / "fast")
    fast_entries = _extract_here(tar, classify, fast=True)
    os.chdir(in_tmp / "slow")
    slow_entries = _extract_here(tar, classify, fast=False)
    assert fast_entries == slow_entries
    fast = _stamped_by_the_layer(tree_snapshot(in_tmp / "fast", mtimes=True))
    slow = _stamped_by_the_layer(tree_snapshot(in_tmp / "slow", mtimes=True))
    assert diff_trees(fast, slow, "fast", "slow") == []
    assert len(fast) > 400


def _stamped_by_the_layer(snapshot: dict) -> dict:
    """The root and the parents a layer does not name get the time of extraction:
    two extractions a second apart differ there, whichever path made them."""
    unnamed = {".", "deep", "deep/er"}
    return {path: entry._replace(mtime=None) if path in unnamed else entry
            for path, entry in snapshot.items()}


def _raw_header(name: str, typeflag: bytes, size: int, magic: bool = True) -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname = typeflag, 0o750, "a" if typeflag in b"12" else ""
    block = bytearray(info.tobuf(tarfile.USTAR_FORMAT))
    block[124:136] = b"%011o\0" % size
    if not magic:
        block[257:512] = bytes(255)
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


@pytest.mark.parametrize("typeflag, name, magic", [
    (b"5", "b", True), (b"2", "b", True), (b"1", "b", True), (b"6", "b", True),
    (b"\0", "b/", False), (b"0", "b/", False), (b"0", "b/", True), (b"7", "b/", False)],
    ids=["dir", "symlink", "hardlink", "fifo", "v7-nul-dir", "v7-zero-dir", "ustar-zero-dir",
         "v7-seven-dir"])
def test_a_header_only_member_with_a_size_is_left_to_python_and_swallows_nothing(
        in_tmp, classify, typeflag, name, magic):
    """Its size field means nothing (see dkr.unpack.tarstream._TYPES): the next header
    follows at once, and the fast path takes it from there."""
    a = images.Layer([images.File("a", b"a" * 600)]).tar[:-1024]
    z = images.Layer([images.File("z", b"z" * 700, mode=0o600)]).tar
    tar = a + _raw_header(name, typeflag, 255, magic) + z
    first = 512 + _padded(600)
    assert _tarcore.create_plain_files(tar, first, classify, set()) == (first, 0)
    os.mkdir("fast")
    os.mkdir("slow")
    os.chdir("fast")
    _extract_here(tar, classify, fast=True)
    os.chdir("../slow")
    _extract_here(tar, classify, fast=False)
    os.chdir("..")
    fast, slow = tree_snapshot("fast"), tree_snapshot("slow")
    assert diff_trees(fast, slow, "fast", "slow") == []
    assert fast["z"].size == 700 and fast["a"].size == 600
    assert len(fast) == 4
    if name.endswith("/"):
        assert fast["b"].type == "dir"
