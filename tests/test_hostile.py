"""Hostile layers: nothing a layer says may reach outside the layer being built.

Every case pulls an image whose layers try to escape (``..`` members,
absolute paths, symlinks and hardlinks pointing out, whiteouts through
symlinks, device nodes, forged overlay xattrs, broken compressed streams,
tricks with the end of the tar archive) and then checks the invariants of
DESIGN.md "Safety invariants":

* a sentinel directory OUTSIDE the image root (each case has its own, and the
  hostile links point at its absolute path, or climb to it with ``..``) is
  unchanged to the ctime: no write, chmod, link or new file;
* nothing new appears next to the image root, and the image root holds only
  ``.dkr``, finished layers and machines (no ``..`` landing in it);
* the pull either succeeds with everything resolved inside the layer root
  (as under a chroot; some cases check where things landed) or fails with
  one clean ``dkr: error:`` line and leaves no half layer and no machine.

Per backend (dir on tmp_path, overlay on a loop ext4, btrfs on a loop btrfs)
one ``dkr pull --batch`` pulls every case at once (the three batches run side
by side), and each case checks its own outcome; the tar and compression cases
run on dir only (the parser is the same everywhere). A few cases are also
pulled on their own, for the exact single-pull CLI behaviour.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import os
import random
import re
import stat
import subprocess
import tarfile
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from helpers import pull, temp_entries
from reliability_helpers import (BlobLayer, DkrProcess, backend_mount, chain_ids,
                                 check_layers_complete, error_lines, fingerprint, layer_dir,
                                 make_sentinel, need, top_level, visible_layers)

from dkr.testing import images
from dkr.testing.images import (MTIME, Device, Dir, Fifo, File, Hardlink, Image, Layer, Opaque,
                                Raw, Symlink, Whiteout)

AS_ROOT = os.geteuid() == 0


# --- what a case knows about where it runs ------------------------------------------

@dataclass
class Ctx:
    sent: Path            # this case's sentinel directory, outside the image root
    root: Path            # the image root
    loop: tuple | None    # (major, minor) of a loop device whose backing file must not change

    @property
    def abs_rel(self) -> str:
        """Where the sentinel's absolute path lands inside a layer (as under a chroot)."""
        return str(self.sent).lstrip("/")

    @property
    def rel(self) -> str:
        """A relative symlink target that reaches the sentinel from a layer root on the host."""
        return os.path.relpath(self.sent, self.root / ".dkr-layer")

    def from_up3(self) -> str:
        """The sentinel's path below ``LAYER_ROOT/../../..`` on the host."""
        base = os.path.normpath(self.root / ".dkr-layer" / "../../..")
        return os.path.relpath(self.sent, base)


def dirs_for(rel: str) -> list[Dir]:
    parts = rel.split("/")
    return [Dir("/".join(parts[:i])) for i in range(1, len(parts) + 1)]


def raw(name: str, type=tarfile.REGTYPE, data: bytes = b"", linkname: str = "", pax=None) -> Raw:
    info = tarfile.TarInfo(name)
    info.type = type
    info.size = len(data)
    info.linkname = linkname
    info.mode = 0o644
    info.mtime = MTIME
    if pax:
        info.pax_headers = dict(pax)
    return Raw(info, data)


def gz(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=6, mtime=0)


def no_end(tar: bytes) -> bytes:
    """A layer's tar without its two end-of-archive blocks."""
    assert tar.endswith(bytes(1024))
    return tar[:-1024]


class BombLayer(BlobLayer):
    """A small tar followed by ``zeros`` bytes of zeros, gzipped: a bomb after the end."""

    def __init__(self, head: bytes, zeros: int):
        comp = zlib.compressobj(9, zlib.DEFLATED, 31)
        digest = hashlib.sha256(head)
        parts = [comp.compress(head)]
        chunk = bytes(1 << 20)
        for _ in range(zeros // len(chunk)):
            parts.append(comp.compress(chunk))
            digest.update(chunk)
        parts.append(comp.flush())
        super().__init__(b"".join(parts), tar=b"")
        self.__dict__["diff_id"] = "sha256:" + digest.hexdigest()


# --- outcome checks for successful pulls ----------------------------------------------

@dataclass
class Outcome:
    ok: bool
    error: str | None
    machine: Path
    ctx: Ctx
    backend: str
    image: Image

    @property
    def stacked(self) -> bool:
        return self.backend in ("dir", "btrfs")

    def layer(self, index: int) -> Path:
        return layer_dir(self.ctx.root, chain_ids(self.image)[index])


def inside(o: Outcome, *parts: str) -> Path:
    return o.machine.joinpath(*parts)


def check_absolute(o: Outcome) -> None:
    assert inside(o, o.ctx.abs_rel, "abs").read_bytes() == b"inside"


def check_abs_lower_existing(o: Outcome) -> None:
    # Like a chroot: etc -> /SENTINEL resolves to LAYER/SENTINEL; diff layers get a real etc/.
    if o.stacked:
        assert os.readlink(inside(o, "etc")) == str(o.ctx.sent)
        assert inside(o, o.ctx.abs_rel, "file").read_bytes() == b"pwned?"
    else:
        assert inside(o, "etc", "file").read_bytes() == b"pwned?"


def check_hardlink_inside(o: Outcome) -> None:
    link, target = inside(o, "h"), inside(o, o.ctx.abs_rel, "file")
    assert link.read_bytes() == b"inside"
    assert os.lstat(link).st_ino == os.lstat(target).st_ino
    link.write_bytes(b"written through the machine")      # the sentinel check follows


def check_dotdot_whiteouts(o: Outcome) -> None:
    assert inside(o, "keep").read_bytes() == b"k"
    assert inside(o, "d", "keep").read_bytes() == b"k"


def check_whiteout_not_through_symlink(o: Outcome) -> None:
    assert inside(o, o.ctx.abs_rel, "file").read_bytes() == b"inside"
    if o.stacked:
        assert os.path.islink(inside(o, "s"))


def check_symlink_target_kept(o: Outcome) -> None:
    """A whiteout of a symlink the same layer adds hides only the lower entry, not its target."""
    assert inside(o, o.ctx.abs_rel, "file").read_bytes() == b"inside"


def check_symlink_over_dir(o: Outcome) -> None:
    assert os.lstat(inside(o, "f")).st_mode & 0o7777 == 0o644
    lower = o.layer(0) / "f"
    st = os.lstat(lower)
    assert st.st_mode & 0o7777 == 0o644, f"lower layer file changed to {oct(st.st_mode)}"
    assert st.st_mtime_ns == MTIME * 10**9


def check_devices(o: Outcome) -> None:
    disk = inside(o, "dev", "disk")
    assert stat.S_ISREG(os.lstat(disk).st_mode) and disk.read_bytes() == b"PWNED-1"
    assert stat.S_ISREG(os.lstat(inside(o, "dev", "null")).st_mode)
    if AS_ROOT and o.ctx.loop:
        node = os.lstat(o.layer(0) / "dev" / "disk")
        assert stat.S_ISBLK(node.st_mode)
        assert (os.major(node.st_rdev), os.minor(node.st_rdev)) == o.ctx.loop
        alias = os.lstat(inside(o, "dev", "alias"))
        assert stat.S_ISCHR(alias.st_mode) and alias.st_rdev == os.makedev(1, 3)


def check_forged_overlay_xattrs(o: Outcome) -> None:
    assert inside(o, "d", "lower").read_bytes() == b"l"
    assert inside(o, "d", "upper").read_bytes() == b"u"
    assert not os.path.exists(inside(o, "b", "secret"))
    for layer in visible_layers(o.ctx.root):
        for name in ("d", "b"):
            path = layer / name
            if path.is_dir():
                forged = [x for x in os.listxattr(path) if x.startswith("trusted.overlay.")]
                assert forged == [], f"{path}: {forged}"


def check_garbage_after_end(o: Outcome) -> None:
    assert inside(o, "kept").read_bytes() == b"kept"


# --- the cases ------------------------------------------------------------------------

@dataclass
class Case:
    layers: Callable[[Ctx], list]
    must: str | None = None           # "ok", "fail", or None: either, if nothing escapes
    pattern: str = ""                 # the error line, when it must fail
    check: Callable[[Outcome], None] | None = None
    backends: tuple = ("dir", "overlay", "btrfs")


def _lone_zero_block(ctx: Ctx) -> list:
    shown = Layer([File("shown", b"1")]).tar
    hidden = Layer([File("hidden", b"2")]).tar
    tar = no_end(shown) + bytes(512) + hidden
    return [BlobLayer(gz(tar), tar)]


def _garbage_after_end(ctx: Ctx) -> list:
    tar = Layer([File("kept", b"kept")]).tar + random.Random(5).randbytes(3000).replace(b"\0", b"x")
    return [BlobLayer(gz(tar), tar)]


def _truncated(compression: str) -> Callable[[Ctx], list]:
    def layers(ctx: Ctx) -> list:
        full = Layer([File("big", random.Random(1).randbytes(200_000))], compression)
        return [BlobLayer(full.blob[: len(full.blob) // 2], full.tar, compression)]
    return layers


def _corrupt_gzip(ctx: Ctx) -> list:
    full = Layer([File("big", random.Random(2).randbytes(200_000))])
    blob = bytearray(full.blob)
    blob[len(blob) // 2] ^= 0xFF
    return [BlobLayer(bytes(blob), full.tar)]


def _gzip_trailing_garbage(ctx: Ctx) -> list:
    full = Layer([File("kept", b"kept")])
    return [BlobLayer(full.blob + b"this is not a gzip member", full.tar)]


def _header_negative_size(ctx: Ctx) -> list:
    """A ustar size of -512 (checksum fixed up): read naively, it rewinds onto its own header."""
    tar = bytearray(Layer([File("a", b"x" * 100), File("c", b"z")]).tar)
    tar[124:136] = b"-0000001000\0"
    tar[148:156] = b" " * 8
    tar[148:156] = b"%06o\0 " % sum(tar[:512])
    return [BlobLayer(gz(bytes(tar)), bytes(tar))]


def _not_a_tar(ctx: Ctx) -> list:
    data = b"hello, I am not a tar archive\n" * 100
    return [BlobLayer(gz(data), data)]


def _devices(ctx: Ctx) -> list:
    major, minor = ctx.loop or (7, 0)
    return [Layer([Dir("dev"), Device("dev/disk", "b", major, minor), Device("dev/null", "c", 1, 3),
                   Hardlink("dev/alias", "dev/null"), Fifo("dev/fifo")]),
            Layer([Dir("dev"), File("dev/disk", b"PWNED-1"), File("dev/null", b"PWNED-2"),
                   File("dev/fifo", b"PWNED-3")])]


PARSER_ONLY = ("dir",)

CASES: dict[str, Case] = {
    # --- member paths
    "dotdot-member": Case(lambda c: [Layer([File("../" * 30 + c.abs_rel + "/dotdot", b"pwned")])]),
    "dotdot-into-image-root": Case(lambda c: [Layer([File("../escaped", b"pwned"),
                                                     Dir("../escaped-dir")])]),
    "dotdot-inner": Case(lambda c: [Layer([Dir("a"), File("a/../../escaped", b"pwned")])]),
    "dotdot-long-pax-dir": Case(lambda c: [Layer([
        Dir("x/" + "../" * 40 + c.abs_rel + "/newdir")])]),
    "absolute-member": Case(lambda c: [Layer([File(str(c.sent / "abs"), b"inside")])],
                            must="ok", check=check_absolute),
    # --- symlinks pointing out, in the same layer or a lower one
    "symlink-abs-same-layer": Case(lambda c: [Layer([
        Symlink("etc", str(c.sent)), File("etc/file", b"pwned"), File("etc/new", b"pwned")])]),
    "symlink-abs-lower-layer": Case(lambda c: [
        Layer([Symlink("etc", str(c.sent))]),
        Layer([File("etc/file", b"pwned"), File("etc/new", b"pwned"), Dir("etc/newdir")])]),
    "symlink-abs-lower-resolves-inside": Case(lambda c: [
        Layer([*dirs_for(c.abs_rel), Symlink("etc", str(c.sent))]),
        Layer([File("etc/file", b"pwned?")])], must="ok", check=check_abs_lower_existing),
    "symlink-rel-same-layer": Case(lambda c: [Layer([
        Symlink("up", c.rel), File("up/file", b"pwned"), File("up/new", b"pwned"),
        Symlink("up/sub/link", "/")])]),
    "symlink-rel-lower-layer": Case(lambda c: [
        Layer([Symlink("up", c.rel)]),
        Layer([File("up/file", b"pwned"), File("up/new", b"pwned"), File("up/sub/deep", b"x")])]),
    "symlink-dotdot3-lower-layer": Case(lambda c: [
        Layer([Symlink("etc", "../../..")]),
        Layer([File(f"etc/{c.from_up3()}/file", b"pwned"),
               File(f"etc/{c.from_up3()}/new", b"pwned")])]),
    "symlink-chain-out": Case(lambda c: [
        Layer([Symlink("a", "b"), Symlink("b", "c/../" + c.rel), Dir("c")]),
        Layer([File("a/new", b"pwned"), File("a/file", b"pwned")])]),
    "root-replaced-by-symlink": Case(lambda c: [Layer([Symlink(".", str(c.sent)),
                                                       File("file", b"pwned")])],
                                     must="fail", pattern=r"replace the layer root"),
    "root-replaced-by-symlink-slash": Case(lambda c: [Layer([Symlink("/", c.rel),
                                                             File("new", b"pwned")])],
                                           must="fail", pattern=r"replace the layer root"),
    "root-replaced-by-hardlink": Case(lambda c: [Layer([File("x", b"x"), Hardlink("./", "x")])],
                                      must="fail", pattern=r"replace the layer root"),
    # --- a directory's mode is set last: never through what replaced it
    "dir-then-symlink-to-lower-file": Case(lambda c: [
        Layer([File("f", b"base", mode=0o644)]),
        Layer([Dir("d", mode=0o6777), Symlink("d", "/f")])], must="ok",
        check=check_symlink_over_dir, backends=("dir", "btrfs")),
    "dir-then-symlink-out": Case(lambda c: [Layer([
        Dir("d", mode=0o777), Dir("e", mode=0o777), Symlink("d", c.rel + "/file"),
        Symlink("e", str(c.sent / "sub"))])]),
    # --- hardlinks
    "hardlink-abs-host-path": Case(lambda c: [Layer([Hardlink("h", str(c.sent / "file"))])],
                                   must="fail",
                                   pattern=r"member .h.: a hard link to .* does not have"),
    "hardlink-dotdot": Case(lambda c: [Layer([Hardlink("h", "../" * 30 + c.abs_rel + "/file")])],
                            must="fail", pattern=r"outside the layer"),
    "hardlink-via-abs-symlink-lower": Case(lambda c: [
        Layer([Symlink("s", str(c.sent))]), Layer([Hardlink("h", "s/file")])]),
    "hardlink-via-rel-symlink-lower": Case(lambda c: [
        Layer([Symlink("up", c.rel)]), Layer([Hardlink("h", "up/file"), File("h", b"pwned")])]),
    "hardlink-via-rel-symlink-same": Case(lambda c: [Layer([
        Symlink("up", c.rel), Hardlink("h", "up/file"), Hardlink("up/new", "h")])]),
    "hardlink-abs-resolves-inside": Case(lambda c: [Layer([
        *dirs_for(c.abs_rel), File(c.abs_rel + "/file", b"inside"),
        Hardlink("h", str(c.sent / "file"))])], must="ok", check=check_hardlink_inside),
    "hardlink-to-symlink-out": Case(lambda c: [Layer([
        Symlink("s", c.rel + "/file"), Hardlink("h", "s"), File("h", b"pwned"),
        Symlink("t", c.rel), Hardlink("u", "t"), File("u/new", b"pwned")])]),
    # --- whiteouts
    "whiteout-names-dotdot": Case(lambda c: [
        Layer([Dir("d"), File("d/keep", b"k"), File("keep", b"k")]),
        Layer([Whiteout(".."), Whiteout("d/.."), raw("d/.wh...", data=b"")])],
        must="ok", check=check_dotdot_whiteouts),
    "whiteout-climbs-out": Case(lambda c: [
        Layer([File("keep", b"k")]),
        Layer([Whiteout("../" * 30 + c.abs_rel + "/file"),
               Opaque("../" * 30 + c.abs_rel)])]),
    "whiteout-via-rel-symlink": Case(lambda c: [
        Layer([Symlink("up", c.rel)]),
        Layer([Whiteout("up/file"), Whiteout("up/sub"), Opaque("up/sub")])]),
    "opaque-via-rel-symlink": Case(lambda c: [Layer([Symlink("up", c.rel)]),
                                              Layer([Opaque("up")])]),
    "whiteout-via-abs-symlink-inside": Case(lambda c: [
        Layer([*dirs_for(c.abs_rel), File(c.abs_rel + "/file", b"inside"),
               Symlink("s", str(c.sent))]),
        Layer([Whiteout("s/file")])], must="ok", check=check_whiteout_not_through_symlink),
    "opaque-via-abs-symlink-inside": Case(lambda c: [
        Layer([*dirs_for(c.abs_rel), File(c.abs_rel + "/file", b"inside"),
               Symlink("s", str(c.sent))]),
        Layer([Opaque("s")])], must="ok", check=check_whiteout_not_through_symlink),
    "whiteout-of-symlink-added-same-layer": Case(lambda c: [
        Layer([*dirs_for(c.abs_rel), File(c.abs_rel + "/file", b"inside")]),
        Layer([Symlink("s", str(c.sent)), Whiteout("s")])], must="ok",
        check=check_symlink_target_kept),
    # --- device nodes: made inside (as root), never written through
    "device-nodes": Case(_devices, must="ok", check=check_devices),
    # --- xattrs only the extractor may write
    "forged-overlay-xattrs": Case(lambda c: [
        Layer([Dir("d"), File("d/lower", b"l"), Dir("a"), File("a/secret", b"s")]),
        Layer([Dir("d", xattrs={"trusted.overlay.opaque": b"y"}), File("d/upper", b"u"),
               Dir("b", xattrs={"trusted.overlay.redirect": b"/a"})])],
        must="ok", check=check_forged_overlay_xattrs),
    # --- broken tar and compressed streams (the parser is the same for every backend)
    "pax-negative-size": Case(lambda c: [Layer([
        File("a", b"x" * 1024), raw("b", data=b"y" * 512, pax={"size": "-1024"}),
        File("c", b"z")])], must="fail", pattern=r"member .b.: bad PAX size .-1024.",
        backends=PARSER_ONLY),
    "header-negative-size": Case(_header_negative_size, must="fail", pattern=r"bad size field",
                                 backends=PARSER_ONLY),
    "lone-zero-block-hides-members": Case(_lone_zero_block, must="fail",
                                          pattern=r"lone zero block", backends=PARSER_ONLY),
    "garbage-after-end": Case(_garbage_after_end, must="ok", check=check_garbage_after_end,
                              backends=PARSER_ONLY),
    "zero-bomb-after-end": Case(lambda c: [BombLayer(Layer([File("a", b"a")]).tar, 64 << 20)],
                                must="fail", pattern=r"MiB of data after the end of the tar",
                                backends=PARSER_ONLY),
    "truncated-gzip": Case(_truncated("gzip"), must="fail",
                           pattern=r"compressed stream ends early|truncated", backends=PARSER_ONLY),
    # zstd's reader ends quietly at a cut frame: the tar reader notices (and the DiffID would)
    "truncated-zstd": Case(_truncated("zstd"), must="fail",
                           pattern=r"compressed stream ends early|truncated|unexpected end of "
                                   r"archive",
                           backends=PARSER_ONLY),
    "corrupt-gzip": Case(_corrupt_gzip, must="fail", pattern=r"corrupt|CRC|invalid|incorrect",
                         backends=PARSER_ONLY),
    "gzip-trailing-garbage": Case(_gzip_trailing_garbage, backends=PARSER_ONLY),
    "not-a-tar": Case(_not_a_tar, must="fail", pattern=r"not a tar|checksum", backends=PARSER_ONLY),
}


# --- fixtures ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def loop_device(tmp_path_factory):
    """A loop device over a file: a device node in a layer must never write to it."""
    if not AS_ROOT:
        yield None
        return
    backing = tmp_path_factory.mktemp("loopdev") / "disk.img"
    content = random.Random(3).randbytes(1 << 20)
    backing.write_bytes(content)
    proc = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        yield None
        return
    device = proc.stdout.strip()
    try:
        rdev = os.stat(device).st_rdev
        yield (os.major(rdev), os.minor(rdev)), backing, content
    finally:
        subprocess.run(["losetup", "-d", device], capture_output=True)
    assert backing.read_bytes() == content, "a layer wrote through a device node"


def _case_image(name: str, ctx: Ctx) -> Image:
    return Image(CASES[name].layers(ctx))


def _assert_outcome(name: str, outcome: Outcome, err_line: str | None, sentinel_before: dict,
                    outside: dict[Path, set], root: Path, machines: set[str]) -> None:
    case = CASES[name]
    ctx = outcome.ctx
    assert fingerprint(ctx.sent) == sentinel_before, f"{name}: the sentinel outside changed"
    for place, before in outside.items():
        assert top_level(place) == before, f"{name}: something appeared in {place}"
    assert temp_entries(root) == [], temp_entries(root)
    check_layers_complete(root)
    stray = {n for n in top_level(root)
             if n != ".dkr" and not re.fullmatch(r"\.dkr-[0-9a-f]{64}", n)}
    beside = machines | {f"{m}.nspawn" for m in machines}      # (each machine's settings)
    assert stray <= beside, f"{name}: unexpected entries in the image root: {stray - beside}"
    if outcome.ok:
        assert case.must != "fail", f"{name}: expected a clean failure, the pull succeeded"
        if case.check:
            case.check(outcome)
    else:
        assert case.must != "ok", f"{name}: expected success, got: {err_line}"
        assert "Traceback" not in (err_line or "")
        assert not os.path.lexists(outcome.machine), f"{name}: a failed pull left its machine"
        if case.pattern:
            assert re.search(case.pattern, err_line), f"{name}: {err_line!r} !~ {case.pattern!r}"


# --- every backend: one batch per backend -------------------------------------------------

@dataclass
class BatchRun:
    root: Path
    ctxs: dict[str, Ctx]
    images: dict[str, Image]
    sentinels: dict[str, dict]
    outside: dict[Path, set]
    errors: dict[str, str]
    succeeded: set[str]


BACKENDS = ("dir", "overlay", "btrfs")


def _prepare(backend: str, mount: Path, base: Path, registry, loop) -> dict:
    root = mount / "machines"
    names = [n for n, c in CASES.items() if backend in c.backends]
    ctxs, imgs, lines = {}, {}, []
    for name in names:
        ctx = Ctx(make_sentinel(base / "sentinel" / name), root, loop)
        ctxs[name], imgs[name] = ctx, _case_image(name, ctx)
        lines.append(f"{registry.host}/hostile-{backend}/{name} {name}")
    batch_file = base / "batch.txt"
    batch_file.write_text("\n".join(lines) + "\n")
    return dict(root=root, names=names, ctxs=ctxs, imgs=imgs, batch_file=batch_file,
                pushes=[(f"hostile-{backend}/{name}", imgs[name]) for name in names],
                sentinels={name: fingerprint(ctx.sent) for name, ctx in ctxs.items()},
                outside={mount: top_level(mount) | {"machines"}, base: top_level(base)})


def _push_all(registry, pushes: list) -> None:
    """Push many images at once: one registry client (connection) per thread."""
    local = threading.local()

    def push(item):
        if not hasattr(local, "registry"):
            local.registry = copy.copy(registry)
            local.registry._client = None
        images.push_image(local.registry, item[0], "latest", item[1])
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(push, pushes))


def _collect(backend: str, prep: dict, proc: DkrProcess, registry) -> BatchRun:
    rc, err = proc.finish(timeout=600)
    assert "Traceback" not in err, err
    names = prep["names"]
    errors = {}
    for line in error_lines(err):
        for name in names:
            if line.startswith(f"dkr: error: {registry.host}/hostile-{backend}/{name}: "):
                assert name not in errors, f"two error lines for {name}:\n{err}"
                errors[name] = line
                break
        else:
            raise AssertionError(f"error line for no image: {line}\n{err}")
    succeeded = {e["local"] for e in proc.events if e["event"] == "done"}
    assert succeeded.isdisjoint(errors) and succeeded | set(errors) == set(names), err
    assert (rc == 0) == (not errors), err
    return BatchRun(prep["root"], prep["ctxs"], prep["imgs"], prep["sentinels"], prep["outside"],
                    errors, succeeded)


@pytest.fixture(scope="module")
def batches(registry, tmp_path_factory, loop_device):
    """Every case, per backend, pulled by one ``dkr pull --batch`` (each image on its own).

    The three backends' batches run side by side, in three dkr processes on
    three image roots: the cases are the same, the time is shared.
    """
    loop = loop_device[0] if loop_device else None
    results: dict[str, BatchRun | str] = {}
    with ExitStack() as stack:
        running = {}
        for backend in BACKENDS:
            try:
                mount = stack.enter_context(backend_mount(backend))
            except pytest.skip.Exception as e:
                results[backend] = str(e)          # skipped (a CI run fails in need())
                continue
            base = tmp_path_factory.mktemp(f"hostile-{backend}")
            if mount is None:
                mount = base / "fs"
                mount.mkdir()
            running[backend] = _prepare(backend, mount, base, registry, loop)
        _push_all(registry, [item for prep in running.values() for item in prep["pushes"]])
        for backend, prep in running.items():
            proc = DkrProcess("pull", "--insecure", "--image-root", prep["root"], "--backend",
                              backend, "--retries", "0", "--json", "--batch", prep["batch_file"])
            stack.callback(proc.stop)
            running[backend] = (prep, proc)
        for backend, (prep, proc) in running.items():
            results[backend] = _collect(backend, prep, proc, registry)
        yield results


@pytest.mark.parametrize("name, backend", [(n, b) for n, c in CASES.items() for b in c.backends],
                         ids=[f"{n}-{b}" for n, c in CASES.items() for b in c.backends])
def test_hostile(batches, backend, name):
    result = batches[backend]
    if isinstance(result, str):
        need(result)
    ok = name in result.succeeded
    outcome = Outcome(ok, result.errors.get(name), result.root / name, result.ctxs[name],
                      backend, result.images[name])
    _assert_outcome(name, outcome, result.errors.get(name), result.sentinels[name],
                    result.outside, result.root, result.succeeded)


# --- single pulls: the exact CLI behaviour for a few cases -------------------------------------

@pytest.mark.parametrize("name", ["symlink-rel-lower-layer", "hardlink-dotdot",
                                  "hardlink-abs-resolves-inside", "dir-then-symlink-to-lower-file"])
def test_hostile_single_pull(registry, tmp_path, name):
    root = tmp_path / "machines"
    ctx = Ctx(make_sentinel(tmp_path / "sentinel"), root, None)
    image = _case_image(name, ctx)
    images.push_image(registry, f"hostile-single/{name}", "latest", image)
    sentinel_before = fingerprint(ctx.sent)
    outside = {tmp_path: top_level(tmp_path) | {"machines"}}
    run = pull(registry, f"hostile-single/{name}", root, "--backend", "dir", "--retries", "0",
               local="m")
    errors = error_lines(run.err)
    assert "Traceback" not in run.err, run.err
    assert len(errors) == (0 if run.rc == 0 else 1), f"want one error line on failure:\n{run.err}"
    outcome = Outcome(run.rc == 0, errors[0] if errors else None, root / "m", ctx, "dir", image)
    _assert_outcome(name, outcome, errors[0] if errors else None, sentinel_before, outside, root,
                    {"m"} if run.rc == 0 else set())


# --- the poisoning the finish_dirs fix closes, shown on the layer a later image reuses ----------

def test_hostile_layer_cannot_change_a_shared_lower_layer(registry, tmp_path):
    """Layer 2 of image A sets a mode "on a directory" that a symlink to a lower file replaced.

    The dir backend shares file inodes between a layer and its parent (hardlinks):
    the mode must not land on the shared inode, or image B, built later on the
    same base layer, would get a setuid file it never asked for.
    """
    root = tmp_path / "machines"
    base = Layer([Dir("usr"), File("usr/tool", b"#!/bin/sh\n", mode=0o755)])
    images.push_image(registry, "poison/a", "latest", Image([
        base, Layer([Dir("d", mode=0o6777), Symlink("d", "/usr/tool")])]))
    images.push_image(registry, "poison/b", "latest", Image([
        base, Layer([File("b", b"b")])]))
    for repo in ("poison/a", "poison/b"):
        run = pull(registry, repo, root, "--backend", "dir")
        assert run.rc == 0, run.err
    for machine in ("a", "b"):
        mode = os.lstat(root / machine / "usr" / "tool").st_mode & 0o7777
        assert mode == 0o755, f"{machine}: usr/tool has mode {oct(mode)}"
