"""Loop-mounted file systems for tests: a real btrfs, ext4 or xfs in a file.

    with loopfs.btrfs("256M") as root:      # root: the mount point, a Path
        ...

Each context manager makes a sparse image file in a fresh temporary
directory, formats it, attaches it to a loop device, mounts it and yields
the mount point. Leaving the block unmounts everything below the mount
point (a failed test may leave overlay mounts in it), then the file system
itself, detaches the loop device and deletes the directory.

This needs root, the file system in the kernel and its ``mkfs`` tool;
`unavailable_reason()` says what is missing, and every failure to set up
raises `LoopFsError` with the failing command's message, so a test can
decide between skipping and failing (CI must fail).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from dkr.fsinfo import mounts_below

__all__ = ["LoopFsError", "unavailable_reason", "loop_fs", "btrfs", "ext4", "xfs",
           "mounts_below", "unmount_below"]

MKFS = {
    "btrfs": ["mkfs.btrfs", "-q", "-f"],
    "ext4": ["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1"],
    "xfs": ["mkfs.xfs", "-q", "-f"],
}


class LoopFsError(RuntimeError):
    pass


def _kernel_has(fstype: str) -> bool:
    with open("/proc/filesystems") as f:
        if any(line.split()[-1] == fstype for line in f if line.strip()):
            return True
    # Not loaded yet is fine when the module is there: mount(2) loads it.
    modules = Path("/lib/modules", os.uname().release)
    return any(modules.glob(f"kernel/fs/{fstype}/{fstype}.ko*"))


def unavailable_reason(fstype: str = "btrfs") -> str | None:
    """Why a loop-mounted ``fstype`` cannot be made here, or None."""
    if fstype not in MKFS:
        return f"no recipe for a {fstype} file system"
    if os.geteuid() != 0:
        return "loop mounts need root"
    for tool in (MKFS[fstype][0], "losetup", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not _kernel_has(fstype):
        return f"the kernel has no {fstype} support"
    if not os.path.exists("/dev/loop-control"):
        return "no /dev/loop-control (loop devices unavailable)"
    return None


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise LoopFsError(f"{' '.join(cmd)} failed: {detail[-1] if detail else proc.returncode}")
    return proc.stdout


def unmount_below(top: Path, include_top: bool = False) -> None:
    """Unmount everything mounted below ``top`` (and ``top`` itself if asked)."""
    top = Path(os.path.realpath(top))
    for point in mounts_below(top):
        if point != top or include_top:
            _run(["umount", str(point)])


@contextmanager
def loop_fs(fstype: str, size: str = "256M", directory: str | None = None,
            mkfs_args: tuple[str, ...] = ()) -> Iterator[Path]:
    """A fresh ``fstype`` of ``size`` (truncate(1) syntax) mounted in a temp dir."""
    reason = unavailable_reason(fstype)
    if reason:
        raise LoopFsError(reason)
    workdir = Path(tempfile.mkdtemp(prefix=f"dkr-{fstype}-", dir=directory))
    image, mountpoint = workdir / "fs.img", workdir / "mnt"
    device = None
    mounted = False
    try:
        _run(["truncate", "-s", size, str(image)])
        _run([*MKFS[fstype], *mkfs_args, str(image)])
        device = _run(["losetup", "--find", "--show", str(image)]).strip()
        mountpoint.mkdir()
        _run(["mount", "-t", fstype, device, str(mountpoint)])
        mounted = True
        yield mountpoint
    finally:
        try:
            if mounted:
                try:
                    unmount_below(mountpoint, include_top=True)
                except LoopFsError:
                    # Something still busy: detach the whole tree so nothing
                    # below is deleted through the mount point.
                    _run(["umount", "--lazy", str(mountpoint)])
        finally:
            if device:
                subprocess.run(["losetup", "-d", device], capture_output=True)
            shutil.rmtree(workdir, ignore_errors=True)


def btrfs(size: str = "256M", directory: str | None = None) -> Iterator[Path]:
    return loop_fs("btrfs", size, directory)


def ext4(size: str = "128M", directory: str | None = None) -> Iterator[Path]:
    return loop_fs("ext4", size, directory)


def xfs(size: str = "320M", directory: str | None = None) -> Iterator[Path]:
    # mkfs.xfs refuses file systems below 300 MB
    return loop_fs("xfs", size, directory)
