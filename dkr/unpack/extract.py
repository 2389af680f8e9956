"""The confined extractor: one child process per layer.

dkr starts it (isolated: see dkr.forkserver) ahead of need and sends
the job as one JSON line on stdin (``root``, ``format`` and, for a v2 blob,
``spool``, ``size`` and ``prefix``); ``--root DIR --format F`` runs a job
directly. It reads the layer blob (gzip, zstd or plain tar, sniffed from its
first bytes): the first ``prefix`` bytes from the spool file, the rest from
stdin, which the download writes into;
inflates it once, hashes the tar stream (the DiffID) on the same pass on a
second thread, and extracts it into DIR after ``chroot(DIR)``: the kernel, not path
checks, keeps every member, symlink and hardlink inside the layer root, so
a parser bug cannot reach the host. Without root it first enters a user
namespace to be allowed the chroot. It ends by printing one JSON line:
``{"diff_id": ..., "tar_bytes": ..., "entries": ...}`` or ``{"error": ...}``.

A spool job may come before its tree exists (a btrfs snapshot of the parent
can take a tenth of a second, mostly waiting for the disk): without ``root``
the child starts inflating what is spooled at once, up to ``READ_AHEAD_CHUNKS``
ahead, and takes the tree and the prefix from a second line, ``{"root": DIR,
"prefix": N}``. Only then do the blob's bytes follow on stdin.

A stacked layer whose parent is not complete yet is extracted in two jobs
(see ``dkr.staging``): ``{"stage": DIR, ...}`` inflates, hashes and writes
the blob's members into DIR, and later ``{"root": ..., "replay": DIR}``
applies them to the layer tree, confined like a direct extraction.
"""

from __future__ import annotations

if __name__ == "__main__":                # a job started by hand: see dkr.startup
    from dkr.startup import loading_modules
    loading_modules()

import argparse
import dataclasses
import errno
import io
import json
import os
import signal
import socket
import stat
import sys
from types import MappingProxyType
import threading
import time
import zlib
from pathlib import Path

from dkr.errors import DkrError, out_of_space
from dkr.hookspecs import OPAQUE_XATTR, LayerMember
from dkr.libc import libc, os_error
from dkr.startup import modules_loaded
from dkr.treeops import remove_tree, write_all
from dkr.unpack import _tarcore, staging, tarstream
from dkr.unpack.tarstream import DIRECTORY, HARDLINK, REGULAR, SYMLINK, Member, TarError, quoted, member_label

try:
    from isal import igzip as _gzip
except ImportError:          # pragma: no cover - isal is a dependency; zlib still works
    import gzip as _gzip
import zstandard

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# overlayfs reads its own xattrs (opaque, redirect, metacopy, origin …) from
# lower layers; only the extractor may write them, never the image.
OVERLAY_XATTR_PREFIX = "trusted.overlay."
CLONE_NEWUSER = 0x10000000
PR_SET_PDEATHSIG = 1
# Where rootless container storage (containers/storage, fuse-overlayfs) keeps the
# owner, mode and type a file should have had: "UID:GID:MODE:TYPE".
OVERRIDE_STAT_XATTR = "user.containers.override_stat"
_STAT_KINDS = {tarstream.DIRECTORY: "dir", tarstream.FIFO: "pipe", tarstream.REGULAR: "file"}
# Inflated chunks (1 MiB each) a job started before its tree may hold: most of
# a typical layer, so its inflating is done by the time the tree is. Once
# the tree is there, a job holds what a direct one does: extractors run side
# by side (one per core on overlay), and their memory must not grow with it.
READ_AHEAD_CHUNKS = 16
CHUNKS_AHEAD = 4


class ExtractError(Exception):
    pass


class SpooledThenPiped(io.RawIOBase):
    """A blob whose first ``prefix`` bytes are in its spool file and the rest come
    through stdin (the download writes them into the pipe); ``size`` is the
    blob's size from its descriptor, so its end is known without the parent.

    ``prefix`` may be unknown at first (a job started before its tree): then
    the file is read as far as it goes, and at its end ``known`` is waited
    for, which ``set_prefix`` sets once the second line has told it (stdin is
    not ours to read until then: it carries that line).
    """

    def __init__(self, path: str, size: int, prefix: int | None):
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.size = size
        self.prefix = prefix
        self.known = threading.Event()
        if prefix is not None:
            self.known.set()
        self.pos = 0
        self.waited = 0.0             # seconds spent waiting for the download

    def set_prefix(self, prefix: int) -> None:
        self.prefix = prefix
        self.known.set()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.pos >= self.size:
            return 0
        want = memoryview(buffer)[: self.size - self.pos]
        while True:
            prefix = self.prefix           # (set by the main thread meanwhile, maybe)
            if prefix is not None and self.pos >= prefix:
                break
            n = os.readv(self.fd, [want if prefix is None else want[: prefix - self.pos]])
            if n:
                self.pos += n
                return n
            if prefix is not None:
                raise ExtractError("the spool file is shorter than the download said")
            self._wait(self.known.wait)
        n = self._wait(lambda: os.readv(0, [want]))
        if not n:
            raise ExtractError("the layer download stopped before the end of the blob")
        self.pos += n
        return n

    def _wait(self, wait):
        began = time.monotonic()
        try:
            return wait()
        finally:
            self.waited += time.monotonic() - began


def open_decompressed(raw: io.BufferedReader):
    """Sniff the compression from the magic bytes; media types are only hints."""
    head = raw.peek(4)[:4]
    if head.startswith(GZIP_MAGIC):
        return _gzip.GzipFile(fileobj=raw, mode="rb")
    if head.startswith(ZSTD_MAGIC):
        return zstandard.ZstdDecompressor().stream_reader(raw, read_size=tarstream.CHUNK,
                                                          read_across_frames=True)
    return raw


def normalize(path: bytes) -> bytes:
    """Member path relative to the layer root; ``..`` may not climb above it."""
    if path[:1] not in (b"", b".", b"/") and b"/." not in path and b"//" not in path:
        return path.rstrip(b"/")      # no empty, "." or ".." part: nothing to resolve
    parts: list[bytes] = []
    for part in path.split(b"/"):
        if part in (b"", b"."):
            continue
        if part == b"..":
            if not parts:
                raise ExtractError(f"{member_label(path)}: points outside the layer")
            parts.pop()
            continue
        parts.append(part)
    return b"/".join(parts) or b"."


def _parent(path: bytes) -> bytes:
    return path.rpartition(b"/")[0] or b"."


class Extractor:
    """Applies members to the tree rooted at the current directory."""

    def __init__(self, layer_format: str, classify, as_root: bool):
        self.layer_format = layer_format
        self.classify = classify
        self.as_root = as_root
        self.added: set[bytes] = set()           # every path this layer wrote
        self.deletes: list[bytes] = []
        self.opaques: list[bytes] = []
        self.dirs: list[tuple[bytes, Member]] = []
        self.known_dirs: set[bytes] = {b"."}
        self.entries = 0
        self.skipped_devices = 0
        self.recorded_owners = 0
        self.skipped_xattrs = 0
        self._handlers = {REGULAR: self._file, DIRECTORY: self._dir, SYMLINK: self._symlink,
                          HARDLINK: self._hardlink}

    # --- members -------------------------------------------------------------
    def apply(self, member: Member, reader: tarstream.TarReader) -> None:
        path = normalize(member.path)
        whiteout = self.classify.resolve(LayerMember(
            path.decode("utf-8", "surrogateescape"), member.kind, member.mode & 0o7777,
            member.uid, member.gid, member.size,
            member.linkname.decode("utf-8", "surrogateescape"), member.devmajor,
            member.devminor, MappingProxyType(member.xattrs)))
        if whiteout is not None:
            target = whiteout.target.encode("utf-8", "surrogateescape")
            if target:
                (self.opaques if whiteout.kind == "opaque" else self.deletes).append(target or b".")
            elif whiteout.kind == "opaque":
                self.opaques.append(b".")
            if not whiteout.keep_member:
                return
            if OPAQUE_XATTR in member.xattrs:       # (how to mark it is the layer format's)
                member = dataclasses.replace(member, xattrs={
                    k: v for k, v in member.xattrs.items() if k != OPAQUE_XATTR})
        if path == b"." and member.kind != DIRECTORY:
            raise ExtractError(f"{member_label(member.path)}: would replace the layer root")
        self.entries += 1
        self.added.add(path)
        self._handlers.get(member.kind, self._special)(path, member, reader)

    def create_plain_files(self, buffer: bytes, pos: int) -> int:
        """A TarReader fast path: plain regular files, created in C (see dkr/unpack/_tarcore.c)."""
        pos, created = _tarcore.create_plain_files(buffer, pos, self.classify, self.added)
        self.entries += created
        return pos

    def _make_parents(self, path: bytes) -> None:
        parent = _parent(path)
        if parent in self.known_dirs:
            return
        # makedirs gives intermediate directories 0o777 & ~umask, and our umask is 0.
        umask = os.umask(0o022)
        try:
            os.makedirs(parent, 0o755, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise ExtractError(f"{member_label(path)}: cannot be created, a parent is not "
                               "a directory") from None
        finally:
            os.umask(umask)
        self.known_dirs.add(parent)

    def _clear(self, path: bytes, keep_dir: bool = False) -> bool:
        """Remove what is at ``path`` so a member can take its place.

        Returns True when an existing directory was kept (a dir member over a dir).
        """
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            self._make_parents(path)
            return False
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return True
            remove_tree(path)
            self.known_dirs = {d for d in self.known_dirs if not _is_below(d, path)}
            # Their mode and mtime are set last; a symlink may take their place now.
            self.dirs = [(d, m) for d, m in self.dirs if not _is_below(d, path)]
        else:
            os.unlink(path)
        return False

    def _create(self, path: bytes, make) -> None:
        """Run ``make(path)``; on a collision clear the way once and retry."""
        try:
            return make(path)
        except (FileExistsError, FileNotFoundError):
            self._clear(path)
            return make(path)

    def _file(self, path: bytes, m: Member, reader) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        # As root the file is born with its final mode, and usually its owner (0:0):
        # then an fstat replaces the chown and chmod, the two costliest calls here.
        mode = m.mode if self.as_root else 0o600
        fd = self._create(path, lambda p: os.open(p, flags, mode))
        try:
            reader.copy_body(fd)
            if self.as_root:
                self._settle_owner_and_mode(fd, m)
            else:
                self._own(fd, m, follow=True)
                self._chmod_readable(fd, m, 0o400, "file")
            self._xattrs(fd, m)
            os.utime(fd, ns=(m.mtime_ns, m.mtime_ns))
        finally:
            os.close(fd)

    @staticmethod
    def _settle_owner_and_mode(fd: int, m: Member) -> None:
        """Owner and mode as the member says, touching only what differs.

        (A set-group-ID directory hands its group down; a chown clears set-ID bits.)
        """
        st = os.fstat(fd)
        if st.st_uid != m.uid or st.st_gid != m.gid:
            os.fchown(fd, m.uid, m.gid)
            os.chmod(fd, m.mode)
        elif stat.S_IMODE(st.st_mode) != m.mode:
            os.chmod(fd, m.mode)

    def _dir(self, path: bytes, m: Member, reader) -> None:
        if not self._clear(path, keep_dir=True):
            os.mkdir(path, 0o700)
        self.known_dirs.add(path)
        self._own(path, m, follow=False)
        self._xattrs(path, m)
        self.dirs.append((path, m))       # mode and mtime last: children change them

    def _symlink(self, path: bytes, m: Member, reader) -> None:
        self._create(path, lambda p: os.symlink(m.linkname, p))
        self._own(path, m, follow=False)
        self._xattrs(path, m, symlink=True)
        os.utime(path, ns=(m.mtime_ns, m.mtime_ns), follow_symlinks=False)

    def _hardlink(self, path: bytes, m: Member, reader) -> None:
        target = normalize(m.linkname)
        if target == path:
            return
        try:
            self._create(path, lambda p: os.link(target, p, follow_symlinks=False))
        except FileNotFoundError:
            raise ExtractError(f"{member_label(m.path)}: a hard link to {quoted(m.linkname)}, "
                               "which the layer does not have") from None

    def _special(self, path: bytes, m: Member, reader) -> None:
        kinds = {tarstream.CHAR: stat.S_IFCHR, tarstream.BLOCKDEV: stat.S_IFBLK,
                 tarstream.FIFO: stat.S_IFIFO}
        if m.kind != tarstream.FIFO and not self.as_root:
            self._device_stand_in(path, m)
            return
        rdev = os.makedev(m.devmajor, m.devminor)
        self._create(path, lambda p: os.mknod(p, kinds[m.kind] | 0o600, rdev))
        self._own(path, m, follow=False)
        os.chmod(path, m.mode)
        self._xattrs(path, m)
        os.utime(path, ns=(m.mtime_ns, m.mtime_ns))

    # --- metadata --------------------------------------------------------------
    def _device_stand_in(self, path: bytes, m: Member) -> None:
        """Without root no device node can be made: an empty file that says what it was."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = self._create(path, lambda p: os.open(p, flags, 0o600))
        try:
            kind = "char" if m.kind == tarstream.CHAR else "block"
            self._record_stat(fd, m, f"{kind}-{m.devmajor}-{m.devminor}")
            os.chmod(fd, m.mode | 0o400)      # readable by its owner: see _chmod_readable
            os.utime(fd, ns=(m.mtime_ns, m.mtime_ns))
        finally:
            os.close(fd)
        self.skipped_devices += 1

    def _record_stat(self, target, m: Member, kind: str) -> None:
        """What could not be applied goes where rootless container tools look for it."""
        value = f"{m.uid}:{m.gid}:{m.mode:04o}:{kind}".encode()
        os.setxattr(target, OVERRIDE_STAT_XATTR, value)
        self.recorded_owners += 1

    def _own(self, target, m: Member, follow: bool) -> None:
        if not self.as_root:
            # Our user namespace maps only ourselves (as 0): other owners are recorded.
            # A symlink cannot carry user.* xattrs; its owner matters to nobody.
            if (m.uid or m.gid) and m.kind != SYMLINK:
                self._record_stat(target, m, _STAT_KINDS.get(m.kind, "file"))
            return
        if isinstance(target, int):
            os.fchown(target, m.uid, m.gid)
        else:
            os.chown(target, m.uid, m.gid, follow_symlinks=follow)

    def _xattrs(self, target, m: Member, symlink: bool = False) -> None:
        for name, value in m.xattrs.items():
            if symlink and name.startswith("user."):
                continue          # the kernel refuses user.* on symlinks
            if name.startswith(OVERLAY_XATTR_PREFIX):
                continue
            try:
                os.setxattr(target, name, value, follow_symlinks=not symlink)
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise
                self.skipped_xattrs += 1    # not allowed here (e.g. without root)

    def finish_dirs(self) -> None:
        # Through a descriptor opened without following symlinks: a later member
        # may have put a symlink (to a file hardlinked with a lower layer) there.
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        for path, m in reversed(self.dirs):
            try:
                fd = os.open(path, flags)
            except (NotADirectoryError, FileNotFoundError):
                continue
            except OSError as e:
                if e.errno == errno.ELOOP:
                    continue
                raise
            try:
                self._chmod_readable(fd, m, 0o500, "dir")
                os.utime(fd, ns=(m.mtime_ns, m.mtime_ns))
            finally:
                os.close(fd)

    def _chmod_readable(self, fd: int, m: Member, needed: int, kind: str) -> None:
        """The member's mode. Without root, the user who pulls must still be able
        to read the entry (copying a layer into a machine is done as that user,
        outside our namespace): missing owner bits are added on disk, and the
        true mode goes into the override xattr with the owner."""
        if self.as_root or m.mode & needed == needed:
            os.chmod(fd, m.mode)
            return
        os.chmod(fd, m.mode | needed)
        if not (m.uid or m.gid):          # else _own recorded it, mode and all
            self._record_stat(fd, m, kind)

    # --- whiteouts ---------------------------------------------------------------
    def resolve_whiteouts(self) -> None:
        if self.layer_format == "diff":
            self._mark_whiteouts()
        else:
            self._apply_whiteouts()

    def _apply_whiteouts(self) -> None:
        """Stacked layers hold their parents' files: whiteouts delete them."""
        ancestors = self._ancestors_of_added()
        for target in self.deletes:
            if target in self.added or target in ancestors:
                self._prune(target, ancestors)   # same layer re-adds it: hide only the lower part
            elif _no_symlink_on_the_way(target):
                remove_tree(target)
        for directory in self.opaques:
            self._prune(directory, ancestors)

    def _prune(self, directory: bytes, ancestors: set[bytes]) -> None:
        """Delete whatever below ``directory`` this layer did not write."""
        if not _real_directory(directory):
            return
        try:
            names = os.listdir(directory)
        except (NotADirectoryError, FileNotFoundError):
            return
        for name in names:
            child = name if directory == b"." else directory + b"/" + name
            if child in self.added or child in ancestors:
                if os.path.isdir(child) and not os.path.islink(child):
                    self._prune(child, ancestors)
            else:
                remove_tree(child)

    def _ancestors_of_added(self) -> set[bytes]:
        ancestors: set[bytes] = set()
        for path in self.added:
            while path != b".":
                path = _parent(path)
                if path in ancestors:
                    break
                ancestors.add(path)
        return ancestors

    def _mark_whiteouts(self) -> None:
        """Diff layers keep whiteouts as overlay markers for the lower layers."""
        ancestors = self._ancestors_of_added()
        for target in self.deletes:
            if not _no_symlink_on_the_way(target):
                continue
            if target in self.added or target in ancestors:
                # The layer brings its own TARGET: a directory must still hide the lower one's entries.
                if os.path.isdir(target) and not os.path.islink(target):
                    self._set_opaque(target)
                continue
            self._make_parents(target)
            self._create(target, lambda p: os.mknod(p, stat.S_IFCHR | 0o000, os.makedev(0, 0)))
        for directory in self.opaques:
            if not _no_symlink_on_the_way(directory):
                continue
            if directory != b"." and not os.path.lexists(directory):
                self._make_parents(directory)
                os.mkdir(directory, 0o755)
            if _real_directory(directory):
                self._set_opaque(directory)

    def _set_opaque(self, directory: bytes) -> None:
        os.setxattr(directory, OPAQUE_XATTR, b"y", follow_symlinks=False)


def _is_below(path: bytes, top: bytes) -> bool:
    return path == top or path.startswith(top + b"/")


def _real_directory(path: bytes) -> bool:
    """A directory reached without following any symlink (itself or a parent)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and _no_symlink_on_the_way(path)


def _no_symlink_on_the_way(path: bytes) -> bool:
    """A whiteout applies to a lower path, never to what a symlink points at."""
    prefix = b""
    for part in path.split(b"/")[:-1]:
        prefix = prefix + b"/" + part if prefix else part
        if os.path.islink(prefix):
            return False
    return True


def _enter_root(root: str, as_root: bool) -> None:
    if not as_root:
        _enter_user_namespace()
    _chroot(root)


def _chroot(root: str) -> None:
    os.chdir(root)
    os.chroot(".")
    os.chdir("/")


def _enter_user_namespace() -> None:
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(CLONE_NEWUSER) != 0:
        raise ExtractError("cannot confine the extractor without root: "
                           f"{os_error('unshare').strerror}")
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"0 {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"0 {gid} 1")


class _Resolver:
    """The whiteout hook as plain functions: firstresult, in pluggy's call order.

    It runs once per member; going through pluggy's machinery each time cost
    more than creating the file. Called with a path and the numbers of a plain
    regular file, it is the C fast path's question (see _tarcore.c).
    """

    def __init__(self, hook):
        impls = [impl for impl in reversed(hook.get_hookimpls())
                 if not (impl.hookwrapper or getattr(impl, "wrapper", False))]
        self.hook = hook if len(impls) != len(hook.get_hookimpls()) else None   # wrappers need pluggy
        self.functions = [impl.function for impl in impls]

    def resolve(self, member: LayerMember):
        if self.hook is not None:
            return self.hook(member=member)
        for function in self.functions:
            result = function(member=member)
            if result is not None:
                return result
        return None

    def __call__(self, path: str, mode: int = 0o644, uid: int = 0, gid: int = 0, size: int = 0):
        return self.resolve(LayerMember(path, "file", mode & 0o7777, uid, gid, size))


def _load_classifier() -> _Resolver:
    from dkr.plugins import manager
    return _Resolver(manager().hook.dkr_whiteout_resolve)


def _open_input(spool: str | None, size: int | None,
                prefix: int | None) -> io.BufferedReader:
    """The blob: stdin alone (v1), or the spool file's first ``prefix`` bytes and then stdin."""
    if spool is None:
        raw = io.FileIO(0, "rb", closefd=False)
    else:
        raw = SpooledThenPiped(spool, size, prefix)
    return io.BufferedReader(raw, buffer_size=tarstream.CHUNK)


def _tar_reader(stdin: io.BufferedReader, max_bytes: int | None,
                depth: int = CHUNKS_AHEAD) -> tarstream.TarReader:
    # Its read-ahead thread starts here: after any unshare(), which a threaded process may not do.
    return tarstream.TarReader(tarstream.ReadAhead(lambda: open_decompressed(stdin), depth),
                               max_bytes=max_bytes)


def _busy_since(began: float, raw: io.RawIOBase) -> float:
    """Seconds of work: without the time spent waiting for download bytes (which,
    measured around each wait, may add up to a hair more than the whole)."""
    return max(0.0, time.monotonic() - began - getattr(raw, "waited", 0.0))


def _checked(reader: tarstream.TarReader) -> dict:
    return {"diff_id": "sha256:" + reader.hash.hexdigest(), "tar_bytes": reader.total}


def _applied(extractor: Extractor) -> dict:
    return {"entries": extractor.entries, "skipped_devices": extractor.skipped_devices,
            "recorded_owners": extractor.recorded_owners,
            "skipped_xattrs": extractor.skipped_xattrs}


def _apply_all(extractor: Extractor, members, source) -> None:
    for member in members:
        extractor.apply(member, source)


def run(root: str, layer_format: str, max_bytes: int | None, spool: str | None = None,
        size: int | None = None, prefix: int | None = None, classify=None) -> dict:
    """Extract a blob into ``root`` directly."""
    began = time.monotonic()
    as_root = os.geteuid() == 0
    classify = classify or _load_classifier()   # plugins load before the chroot hides them
    stdin = _open_input(spool, size, prefix)    # opened before the chroot hides it, too
    _enter_root(root, as_root)
    reader = _tar_reader(stdin, max_bytes)
    return _extract(reader, layer_format, classify, as_root, began, stdin.raw)


def run_ahead(layer_format: str, max_bytes: int | None, spool: str, size: int,
              classify=None) -> dict | None:
    """Inflate what is spooled of a blob before its tree exists; the next line on
    stdin names the tree and how much of the blob the spool file holds."""
    as_root = os.geteuid() == 0
    classify = classify or _load_classifier()
    if not as_root:
        _enter_user_namespace()                 # before the read-ahead thread starts
    stdin = _open_input(spool, size, None)      # stdin carries the next line until then
    reader = _tar_reader(stdin, max_bytes, READ_AHEAD_CHUNKS)
    spec = _read_command()
    if spec is None:
        return None                             # not needed after all
    began = time.monotonic()                    # the work is counted from the tree's arrival:
    waited = stdin.raw.waited                   # waits for bytes before it are not in that time
    stdin.raw.set_prefix(spec["prefix"])
    reader.stream.keep_ahead(CHUNKS_AHEAD)
    _chroot(spec["root"])
    return _extract(reader, layer_format, classify, as_root, began - waited, stdin.raw)


def _extract(reader: tarstream.TarReader, layer_format: str, classify, as_root: bool,
             began: float, raw: io.RawIOBase) -> dict:
    """Apply every member to the tree we are chrooted into; the report."""
    os.umask(0)
    extractor = Extractor(layer_format, classify, as_root)
    if as_root:                   # without root, owners and modes take the long way
        reader.fast_path = extractor.create_plain_files
    with WritebackWhileStarved(raw):
        _apply_all(extractor, reader, reader)
        reader.drain()
    extractor.resolve_whiteouts()
    extractor.finish_dirs()
    return {**_checked(reader), **_applied(extractor), "busy_seconds": _busy_since(began, raw)}


class WritebackWhileStarved(threading.Thread):
    """Writes the tree's data to disk while the extractor mostly waits for the network.

    A layer is made read-only (btrfs) or snapshotted only once its data is on
    disk, and the kernel starts writing dirty pages back only after 30 s or
    at gigabytes: without this, the last layer of a pull over a real link
    would still have all its data to write after its last byte arrived.
    When its bytes come in faster than the link brings them (loopback) the
    extractor never starves, and nothing is written early: it would compete
    with the extraction for the disk.
    """

    INTERVAL = 0.5         # seconds between two looks
    STARVED = 0.3          # share of that time spent waiting for bytes

    def __init__(self, raw: io.RawIOBase):
        super().__init__(daemon=True)
        self.raw = raw
        self.over = threading.Event()

    def __enter__(self) -> "WritebackWhileStarved":
        if hasattr(self.raw, "waited"):
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.over.set()

    def run(self) -> None:
        root = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)   # (the layer's tree)
        try:
            waited = self.raw.waited
            while not self.over.wait(self.INTERVAL):
                starved, waited = self.raw.waited - waited, self.raw.waited
                if starved >= self.STARVED * self.INTERVAL:
                    libc.syncfs(root)      # (a failure only leaves it to the kernel, as before)
        finally:
            os.close(root)


def run_stage(directory: str, max_bytes: int | None, spool: str | None = None,
              size: int | None = None, prefix: int | None = None) -> dict:
    """Pass 1 of a staged layer (see dkr.staging): no tree is touched."""
    began = time.monotonic()
    stdin = _open_input(spool, size, prefix)
    reader = _tar_reader(stdin, max_bytes)
    staging.stage(reader, Path(directory))
    return {**_checked(reader), "busy_seconds": _busy_since(began, stdin.raw)}


def run_replay(root: str, layer_format: str, directory: str, classify=None) -> dict:
    """Pass 2 of a staged layer: apply what pass 1 wrote to the tree at ``root``."""
    began = time.monotonic()
    as_root = os.geteuid() == 0
    classify = classify or _load_classifier()
    staged = staging.StagedLayer(Path(directory))
    try:
        _enter_root(root, as_root)
        os.umask(0)
        extractor = Extractor(layer_format, classify, as_root)
        _apply_all(extractor, staged, staged)
        extractor.resolve_whiteouts()
        extractor.finish_dirs()
    finally:
        staged.close()
    return {**_applied(extractor), "busy_seconds": time.monotonic() - began}


def _die_with_parent(parent: int) -> None:
    """An extractor outliving a killed dkr would go on writing into a tree that the
    next run is about to clean up: the kernel kills us when our parent dies."""
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:      # it died before we asked
        os._exit(1)


def _read_command() -> dict | None:
    """``--serve``: one JSON line on stdin says what to extract; nothing means "not needed".

    Read byte by byte, so that what follows the line (the blob, or a second
    line) stays in the pipe for the reader that comes next.
    """
    line = bytearray()
    while not line.endswith(b"\n"):
        byte = os.read(0, 1)
        if not byte:
            return None
        line += byte
    return json.loads(line)


def _serve(classify=None) -> dict | None:
    # Everything slow (imports, plugin loading) is done before the parent needs us.
    classify = classify or _load_classifier()
    spec = _read_command()
    if spec is None:
        return None
    if "replay" in spec:
        return run_replay(spec["root"], spec["format"], spec["replay"], classify)
    if "seal" in spec:
        return run_seal(spec["backend"], spec["image_root"], spec["key"], spec["seal"])
    spool = spec.get("spool")
    if spool and "root" not in spec and "stage" not in spec:
        return run_ahead(spec["format"], spec.get("max_bytes"), spool, spec["size"], classify)
    source = dict(max_bytes=spec.get("max_bytes"), spool=spool, size=spec.get("size"),
                  prefix=spec.get("prefix"))
    if "stage" in spec:
        return run_stage(spec["stage"], **source)
    return run(spec["root"], spec["format"], classify=classify, **source)


def run_seal(backend_name: str, image_root: str, key: str, path: str) -> dict:
    """The backend's ``seal_layer``, here rather than in dkr: btrfsutil holds
    Python's GIL while btrfs commits a read-only flag (and flushes the
    layer), which would stop dkr's event loop, and every download with it."""
    from dkr.plugins import backends
    backend = backends().get(backend_name)
    if backend is None:
        return {"error": f"no storage backend named {backend_name!r} here", "unknown": True}
    backend.seal_layer(Path(image_root), key, Path(path))
    return {"sealed": path}


def _fork_server(dkr_pid: int | None, classify) -> None:
    """``--fork-server``: load everything once, then fork one extractor per request.

    Starting Python and loading the decompressors and plugins costs ~0.15 s
    of CPU; a fork costs a few milliseconds. Stdin is a SOCK_SEQPACKET socket
    to dkr: each request carries two descriptors, the job's stdin and stdout,
    and is answered with the child's pid and a pidfd (which lets dkr wait for
    and kill a process that is not its own child). EOF ends the server.

    The server has a process group of its own (a Ctrl-C while it starts up
    is dkr's to handle); each child joins dkr's, as a child of dkr's would:
    a kill of dkr's group then also takes whatever a backend's
    ``seal_layer`` started, not only the helper that called it.
    """
    server = socket.socket(fileno=0)
    me = os.getpid()
    dkr_group = os.getpgid(dkr_pid) if dkr_pid else None
    while True:
        _reap(os.WNOHANG)
        try:
            _, fds, _, _ = socket.recv_fds(server, 16, 2)
        except ConnectionError:
            fds = []
        if len(fds) != 2:
            # Waited for, so that their CPU time adds up in ours, and in dkr's.
            _reap(0)
            os._exit(0)               # nothing to flush; dkr waits for this exit
        pid = os.fork()
        if pid == 0:
            server.close()
            os.dup2(fds[0], 0)
            os.dup2(fds[1], 1)
            for fd in fds:
                os.close(fd)
            _die_with_parent(me)
            if dkr_group is not None:
                _join_group(dkr_group)
            os._exit(_report(lambda: _serve(classify)))
        for fd in fds:
            os.close(fd)
        pidfd = os.pidfd_open(pid)
        try:
            socket.send_fds(server, [str(pid).encode()], [pidfd])
        except OSError:               # dkr is gone (or going): so is the child it asked for
            os.kill(pid, signal.SIGKILL)
            _reap(0)
            return
        finally:
            os.close(pidfd)


def _join_group(group: int) -> None:
    try:
        os.setpgid(0, group)
    except OSError:                   # dkr is gone: so are we, by the death signal
        pass


def _reap(options: int) -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, options)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _report(job) -> int:
    """Run ``job`` and print its result (or its error) as the one JSON line."""
    out = os.dup(1)                   # (what the job does with its stdout is not our report)
    try:
        result = job()
        if result is None:
            return 0
    except (ExtractError, TarError, DkrError) as e:
        result = {"error": str(e)}
    except (OSError, EOFError, zlib.error, zstandard.ZstdError) as e:
        result = {"error": _describe(e)}
        if isinstance(e, OSError) and out_of_space(e):
            result["kind"] = "disk-full"      # (the parent tells where and how much)
    except Exception as e:  # noqa: BLE001 - a decoder's own error types; report, never trace
        result = {"error": f"cannot read layer: {type(e).__name__}: {e}"}
    try:
        write_all(out, memoryview((json.dumps(result) + "\n").encode()))
    except OSError:
        # dkr is gone (killed: its death signal is on its way to us). Nobody reads
        # the report, and a traceback would land on the terminal dkr left.
        return 1
    finally:
        os.close(out)
    return 0 if "error" not in result else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dkr.unpack.extract")
    parser.add_argument("--serve", action="store_true",
                        help="start now, take the job as a JSON line on stdin")
    parser.add_argument("--fork-server", action="store_true",
                        help="fork a --serve child per request on the socket that is stdin")
    parser.add_argument("--parent", type=int, help="die with this process")
    parser.add_argument("--root")
    parser.add_argument("--format", choices=("stacked", "diff"))
    parser.add_argument("--max-bytes", type=int)
    args = parser.parse_args(argv)
    if not (args.serve or args.fork_server) and not (args.root and args.format):
        parser.error("--root and --format are required (or --serve)")
    if args.parent:
        _die_with_parent(args.parent)
    # The parent decides when to stop us (it kills us on Ctrl-C), so a terminal's
    # SIGINT to the whole process group must not leave a half-written member behind.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if args.fork_server:
        try:
            classify = _load_classifier()
        except DkrError:
            return 1                  # dkr loads the same plugins, and says what is wrong
        modules_loaded()              # (children then share these pages, untouched by it)
        _fork_server(args.parent, classify)
        return 0
    modules_loaded()
    if args.serve:
        return _report(_serve)
    return _report(lambda: run(args.root, args.format, args.max_bytes))


def _describe(e: Exception) -> str:
    if isinstance(e, OSError):
        where = f" ({os.fsdecode(e.filename)})" if e.filename else ""
        if e.errno == errno.ENOSPC:
            # (the member's name quoted: "(sys)" alone reads like the device's)
            return "no space left on device" + \
                (f" while writing {os.fsdecode(e.filename)!r}" if e.filename else "")
        return f"{e.strerror or e}{where}"
    if isinstance(e, EOFError):
        return "compressed stream ends early (truncated layer?)"
    return f"corrupt compressed stream: {e}"


if __name__ == "__main__":
    sys.exit(main())
