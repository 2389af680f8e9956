"""dkr against GNU tar: every archive GNU tar extracts, dkr extracts to the same tree.

Archives written by GNU tar itself in each ``--format`` (v7, oldgnu, gnu,
ustar, posix; with ``--sparse`` in every sparse format GNU tar writes, and
``--xattrs``), by Python's tarfile in each of its formats, and by hand (a
header-only member with a size field, pre-POSIX directories). Each becomes
the top layer of an image pushed to the real registry and pulled on the
dir, btrfs and overlay backends (on dir and btrfs both straight and staged
ahead, see dkr.unpack.staging); the oracle is GNU tar extracting the same layers,
as root, into a plain directory. The trees must be equal (types, modes,
owners, sizes, contents, link targets, hard-link groups, xattrs), and the
holes of sparse files must still be holes.
"""

from __future__ import annotations

import gzip
import io
import os
import re
import shutil
import subprocess
import tarfile
from contextlib import ExitStack
from pathlib import Path

import pytest
from reliability_helpers import BlobLayer, DkrProcess, backend_mount, error_lines

from dkr.testing import images
from dkr.testing.images import File, Image, Layer
from dkr.testing.oracle import diff_trees, tree_snapshot

AS_ROOT = os.geteuid() == 0
pytestmark = pytest.mark.skipif(not AS_ROOT, reason="owners, devices and loop mounts need root")

MIB = 1 << 20
# name: (data segments as (offset, bytes), size). Holes at the start, in the
# middle and at the end, and a file that is all hole.
SPARSE = {
    "sparse/start": ([(MIB, b"A" * 5000)], MIB + 5000),
    "sparse/middle": ([(0, b"B" * 4096), (3 * MIB, b"C" * 8192)], 3 * MIB + 8192),
    "sparse/end": ([(0, b"D" * 10000)], 5 * MIB),
    "sparse/allhole": ([], 2 * MIB),
    "sparse/many": ([(i * 65536, bytes([65 + i % 26]) * 100) for i in range(40)], 41 * 65536),
}
# Holes a sparse file must keep, as (start, end); the edges are left a block's slack.
HOLES = {name: [] for name in SPARSE}
for _name, (_segments, _size) in SPARSE.items():
    _at = 0
    for _offset, _data in [*_segments, (_size, b"")]:
        if _offset - _at >= 3 * 65536:
            HOLES[_name].append((_at + 65536, _offset - 65536))
        _at = _offset + len(_data)


def _tree(top: Path, kind: str) -> Path:
    """A source tree: "v7" (what a v7 header can hold), "ustar" (and devices,
    fifos, prefix-split paths), "full" (and long names and link targets, big
    owners, xattrs), "sparse" (full, and the SPARSE files)."""
    top.mkdir()
    umask = os.umask(0)
    try:
        return _fill(top, kind)
    finally:
        os.umask(umask)


def _fill(top: Path, kind: str) -> Path:

    def d(path, mode=0o755, uid=0, gid=0):
        os.mkdir(top / path, mode)
        os.chown(top / path, uid, gid)
        os.chmod(top / path, mode)            # (chown clears set-ID bits)

    def f(path, data=b"", mode=0o644, uid=0, gid=0):
        (top / path).write_bytes(data)
        os.chown(top / path, uid, gid)
        os.chmod(top / path, mode)

    d("d")
    d("d/sub", 0o750, 1234, 5678)
    d("sticky", 0o1777)
    d("sgid", 0o2775, 0, 100)
    f("d/plain", b"hello\n")
    f("d/empty", mode=0o600)
    f("d/sub/owned", b"owned" * 300, 0o640, 1234, 5678)
    f("exact512", b"x" * 512)
    f("suid", b"#!/bin/sh\n", 0o4755)
    f("sgidfile", b"g" * 700, 0o2711, 0, 100)
    f("sgid/inside", b"i")
    f("sticky/file", b"s", 0o1644)
    os.link(top / "d/plain", top / "hard1")
    os.link(top / "d/plain", top / "d/sub/hard2")
    os.symlink("d/plain", top / "link")
    os.symlink("/etc/passwd", top / "abs")
    os.symlink("nowhere", top / "dangling")
    if kind == "v7":
        return top
    os.mknod(top / "chr", 0o620 | 0o020000, os.makedev(1, 5))
    os.mknod(top / "blk", 0o660 | 0o060000, os.makedev(7, 200))
    os.mkfifo(top / "fifo", 0o640)
    deep = "deep/" + "/".join(["p" * 40] * 4)
    os.makedirs(top / deep)
    f(f"{deep}/file", b"deep")                # 171 bytes: a ustar prefix and name
    if kind == "ustar":
        return top
    d("long")
    f("long/" + "n" * 150, b"long name", 0o600)
    os.link(top / "long" / ("n" * 150), top / "long" / ("h" * 120))
    os.symlink("t" * 180, top / "longlink")
    os.makedirs(top / ("q" * 90) / ("r" * 90) / ("s" * 90))
    f(f"{'q' * 90}/{'r' * 90}/{'s' * 90}/file", b"q")
    f("bigid", b"big", 0o644, 3_000_000, 4_000_000)
    f("xattr", b"x")
    os.setxattr(top / "xattr", "user.mime", b"text/plain")
    os.setxattr(top / "xattr", "user.bin", b"\x00\xff\n=")
    os.setxattr(top / "d", "user.dir", b"on a dir")
    if kind == "sparse":
        d("sparse")
        for name, (segments, size) in SPARSE.items():
            fd = os.open(top / name, os.O_WRONLY | os.O_CREAT, 0o644)
            for offset, data in segments:
                os.pwrite(fd, data, offset)
            os.ftruncate(fd, size)
            os.close(fd)
    return top


def _gnu_tar(src: Path, out: Path, *options: str) -> bytes:
    subprocess.run(["tar", "-cf", str(out), "--numeric-owner", *options, "-C", str(src), "."],
                   check=True, capture_output=True)
    return out.read_bytes()


def _python_tar(src: Path, fmt: int) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        tar.add(src, arcname=".")
    return out.getvalue()


# --- hand-made headers ------------------------------------------------------------------

def _header(name: str, typeflag: bytes, size: int = 0, linkname: str = "", magic: bool = True,
            mode: int = 0o755, devices=(0, 0)) -> bytes:
    info = tarfile.TarInfo(name)
    info.mode, info.mtime, info.linkname = mode, images.MTIME, linkname
    info.devmajor, info.devminor = devices
    info.type = typeflag                      # (device numbers are written for devices only)
    block = bytearray(info.tobuf(tarfile.USTAR_FORMAT))
    block[156:157] = typeflag
    block[124:136] = b"%011o\0" % size
    if not magic:
        block[257:512] = bytes(255)           # no magic, no owner names: a v7 header
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def _body(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


def _header_only_with_sizes() -> bytes:
    """Directories, links, devices and fifos whose size field is 255: each is
    header-only, and the member after it must not be swallowed."""
    parts = [_header("f0", b"0", 3, mode=0o644), _body(b"abc")]
    for name, flag, extra in [("mdir", b"5", {}), ("msym", b"2", {"linkname": "f0"}),
                              ("mlnk", b"1", {"linkname": "f0"}),
                              ("mchr", b"3", {"devices": (1, 7)}),
                              ("mblk", b"4", {"devices": (7, 201)}), ("mfifo", b"6", {})]:
        parts.append(_header(name, flag, 255, **extra))
        parts.append(_header(f"after-{name}", b"2", linkname="f0"))
        parts += [_header(f"file-after-{name}", b"0", 5, mode=0o600), _body(b"hello")]
    return b"".join(parts) + bytes(1024)


def _old_directories() -> bytes:
    """Pre-POSIX directories: regular types whose name ends in "/"."""
    parts = []
    for name, flag, magic, size in [("v7nul/", b"\0", False, 0), ("v7zero/", b"0", False, 0),
                                    ("v7size/", b"\0", False, 255), ("ustar0/", b"0", True, 0),
                                    ("ustar0size/", b"0", True, 255), ("seven/", b"7", False, 0)]:
        parts.append(_header(name, flag, size, magic=magic, mode=0o750))
        parts += [_header(name + "child", b"0", 2, magic=magic, mode=0o644), _body(b"ok")]
    pax = b"12 path=pd/\n"
    parts += [_header("PaxHeaders/pd", b"x", len(pax)), _body(pax), _header("pd", b"0", mode=0o700),
              _header("pd/child", b"2", linkname="..")]
    return b"".join(parts) + bytes(1024)


# --- the archives ---------------------------------------------------------------------------

def _base(name: str) -> Layer:
    """A layer below the archive's, one per image: a layer is staged only while
    its parent is being built, and a shared one may be done already."""
    return Layer([File("base-file", f"below {name}\n".encode())])


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> dict[str, bytes]:
    work = tmp_path_factory.mktemp("tar-sources")
    trees = {kind: _tree(work / kind, kind) for kind in ("v7", "ustar", "full", "sparse")}
    out = {}
    for fmt, tree in [("v7", "v7"), ("ustar", "ustar"), ("oldgnu", "full"), ("gnu", "full"),
                      ("posix", "full")]:
        out[f"gnu-{fmt}"] = _gnu_tar(trees[tree], work / f"{fmt}.tar", f"--format={fmt}",
                                     *(["--xattrs"] if fmt == "posix" else []))
    for fmt in ("oldgnu", "gnu"):
        out[f"gnu-{fmt}-sparse"] = _gnu_tar(trees["sparse"], work / f"{fmt}-sparse.tar",
                                            f"--format={fmt}", "--sparse")
    for version in ("0.0", "0.1", "1.0"):
        out[f"gnu-posix-sparse-{version}"] = _gnu_tar(
            trees["sparse"], work / f"posix-sparse-{version}.tar", "--format=posix", "--xattrs",
            "--sparse", f"--sparse-version={version}")
    out["python-ustar"] = _python_tar(trees["ustar"], tarfile.USTAR_FORMAT)
    out["python-gnu"] = _python_tar(trees["full"], tarfile.GNU_FORMAT)
    out["python-pax"] = _python_tar(trees["full"], tarfile.PAX_FORMAT)
    out["header-only-sizes"] = _header_only_with_sizes()
    out["old-directories"] = _old_directories()
    return out


def _gnu_extraction(tars: list[bytes], into: Path) -> dict:
    into.mkdir()
    for tar in tars:
        subprocess.run(["tar", "-xf", "-", "-C", str(into), "--numeric-owner", "--same-owner",
                        "--same-permissions", "--xattrs", "--xattrs-include=*"],
                       input=tar, check=True, capture_output=True)
    return tree_snapshot(into, include_root=False)


def _holes(path: Path) -> list[tuple[int, int]]:
    fd = os.open(path, os.O_RDONLY)
    try:
        size, at, holes = os.fstat(fd).st_size, 0, []
        while at < size:
            hole = os.lseek(fd, at, os.SEEK_HOLE)
            if hole >= size:
                break
            try:
                at = os.lseek(fd, hole, os.SEEK_DATA)
            except OSError:                    # ENXIO: a hole to the end
                at = size
            holes.append((hole, at))
        return holes
    finally:
        os.close(fd)


def _check_holes(machine: Path) -> list[str]:
    problems = []
    for name, wanted in HOLES.items():
        path = machine / name
        found = _holes(path)
        for start, end in wanted:
            if not any(a <= start and end <= b for a, b in found):
                problems.append(f"{name}: bytes {start}-{end} are no hole ({found})")
        if name == "sparse/allhole" and os.stat(path).st_blocks:
            problems.append(f"{name}: {os.stat(path).st_blocks} blocks allocated")
    return problems


# --- pulls ------------------------------------------------------------------------------------

# (backend, --stage-ahead): the staged runs write members into a stage first, then replay them.
RUNS = [("dir", "never"), ("dir", "always"), ("btrfs", "never"), ("btrfs", "always"),
        ("overlay", "never")]


def _mount(stack: ExitStack, backend: str):
    try:
        return stack.enter_context(backend_mount(backend))
    except pytest.skip.Exception as e:
        # As root every backend can be made here: a missing one is a failure, not a skip.
        pytest.fail(f"{backend} backend cannot run: {e}")


@pytest.fixture(scope="module")
def pulled(registry, archives, tmp_path_factory):
    """Every archive as the top layer of an image, pulled on each run's backend."""
    work = tmp_path_factory.mktemp("tar-pulls")
    names = sorted(archives)
    tops = {}
    for name in names:
        tar = archives[name]
        tops[name] = BlobLayer(gzip.compress(tar, compresslevel=1, mtime=0), tar)
        images.push_image(registry, f"tar-formats/{name}", "latest",
                          Image([_base(name), tops[name]]))
    batch = work / "batch.txt"
    batch.write_text("".join(f"{registry.host}/tar-formats/{n} {n}\n" for n in names))
    results = {}
    with ExitStack() as stack:
        mounts = {backend: _mount(stack, backend) for backend in ("btrfs", "overlay")}
        running = {}
        for backend, stage in RUNS:
            mount = mounts.get(backend) or work
            root = mount / f"machines-{backend}-{stage}"
            proc = DkrProcess("pull", "--insecure", "--image-root", root, "--backend", backend,
                              "--stage-ahead", stage, "--retries", "0", "--json", "--batch",
                              batch)
            stack.callback(proc.stop)
            running[(backend, stage)] = (root, proc)
        for run, (root, proc) in running.items():
            rc, err = proc.finish(timeout=300)
            assert "Traceback" not in err, err
            errors = {n: line for line in error_lines(err) for n in names
                      if line.startswith(f"dkr: error: {registry.host}/tar-formats/{n}: ")}
            assert len(errors) == len(error_lines(err)), err
            done = {e["local"] for e in proc.events if e["event"] == "done"}
            assert done | set(errors) == set(names), err
            staged = {e["digest"] for e in proc.events if e["event"] == "layer-staged"}
            if run[1] == "always":           # the top layers, not the base
                assert {tops[n].digest for n in done} <= staged, run
            results[run] = {n: errors[n] if n in errors else
                            (tree_snapshot(root / n, include_root=False),
                             _check_holes(root / n) if "sparse" in n else [])
                            for n in names}
        yield results


@pytest.fixture(scope="module")
def oracle(archives, tmp_path_factory) -> dict[str, dict]:
    work = tmp_path_factory.mktemp("gnu-tar")
    return {name: _gnu_extraction([_base(name).tar, tar], work / name)
            for name, tar in archives.items()}


ARCHIVES = ["gnu-v7", "gnu-ustar", "gnu-oldgnu", "gnu-gnu", "gnu-posix", "gnu-oldgnu-sparse",
            "gnu-gnu-sparse", "gnu-posix-sparse-0.0", "gnu-posix-sparse-0.1",
            "gnu-posix-sparse-1.0", "python-ustar", "python-gnu", "python-pax",
            "header-only-sizes", "old-directories"]


def test_the_archives_hold_what_they_are_meant_to(archives, oracle):
    """The comparison means something only if the trees hold the hard cases."""
    assert sorted(archives) == sorted(ARCHIVES)
    posix = oracle["gnu-posix"]
    assert posix["xattr"].xattrs == (("user.bin", b"\x00\xff\n="), ("user.mime", b"text/plain"))
    assert posix["longlink"].content == "t" * 180
    assert posix["bigid"][2:4] == (3_000_000, 4_000_000)
    assert {posix[p].type for p in ("chr", "blk", "fifo")} == {"chr", "blk", "fifo"}
    assert posix["suid"].mode == 0o4755 and posix["sticky"].mode == 0o1777
    assert posix["hard1"].link == posix["d/plain"].link == "d/plain"
    for name in ARCHIVES:
        if "sparse" in name:
            assert oracle[name]["sparse/many"].size == 41 * 65536
            assert archives[name].count(b"GNUSparseFile") or b"GNU.sparse" in archives[name] \
                or _old_gnu_sparse_in(archives[name]), f"{name} holds no sparse file"
    assert oracle["header-only-sizes"]["file-after-mfifo"].size == 5
    assert oracle["old-directories"]["v7size"].type == "dir"


def _old_gnu_sparse_in(tar: bytes) -> bool:
    return any(tar[o + 156:o + 157] == b"S" and tar[o + 257:o + 263] == b"ustar "
               for o in range(0, len(tar) - 511, 512))


@pytest.mark.parametrize("run", RUNS, ids=[f"{b}-{s}" for b, s in RUNS])
@pytest.mark.parametrize("name", ARCHIVES)
def test_dkr_extracts_what_gnu_tar_extracts(pulled, oracle, run, name):
    outcome = pulled[run][name]
    assert not isinstance(outcome, str), outcome
    tree, hole_problems = outcome
    assert diff_trees(oracle[name], tree, "GNU tar", "dkr") == []
    assert hole_problems == []


def test_the_oracle_keeps_holes_too(oracle, archives, tmp_path):
    """(So that a failing hole check above is dkr's, not the file system's.)"""
    tars = [_base("x").tar, archives["gnu-posix-sparse-1.0"]]
    into = tmp_path / "x"
    _gnu_extraction(tars, into)
    assert _check_holes(into) == []
    shutil.rmtree(into)


# --- malformed values: one line that names the layer and the member ---------------------------

def _pax_layer(records: dict, data: bytes = b"abc") -> BlobLayer:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        ok = tarfile.TarInfo("fine")
        ok.size = 4
        tar.addfile(ok, io.BytesIO(b"fine"))
        info = tarfile.TarInfo("etc/x")
        info.size, info.pax_headers = len(data), records
        tar.addfile(info, io.BytesIO(data))
    tar = out.getvalue()
    return BlobLayer(gzip.compress(tar, mtime=0), tar)


@pytest.mark.parametrize("records, message", [
    ({"mtime": "12a"}, "bad PAX mtime '12a'"),
    ({"LIBARCHIVE.xattr.user.a": "!!!"}, "bad PAX 'LIBARCHIVE.xattr.user.a' (not base64)"),
    ({"GNU.sparse.map": "0,9", "GNU.sparse.size": "10"}, "GNU sparse map holds 9 bytes, the "
                                                         "member 3"),
], ids=["mtime", "base64", "sparse-map"])
def test_a_malformed_value_ends_the_pull_with_one_line_naming_layer_and_member(
        registry, tmp_path, records, message):
    from helpers import assert_clean_failure, pull
    layer = _pax_layer(records)
    repo = f"tar-malformed/{'-'.join(records).lower().replace('.', '-')}"
    images.push_image(registry, repo, "latest", Image([layer]))
    root = tmp_path / "machines"
    run = pull(registry, repo, root, "--backend", "dir", local="m")
    line = f"dkr: error: layer {layer.digest}: member 'etc/x': {message}"
    assert_clean_failure(run, root, "^" + re.escape(line) + "$", local="m")
    assert [p.name for p in root.iterdir() if p.name.startswith(".dkr-")] == []
