"""The ``overlay`` backend: diff layers, a machine is an overlay mount.

Each layer is its own directory holding only what the layer adds; the
extractor keeps whiteouts as overlayfs markers (a 0/0 character device, an
``trusted.overlay.opaque=y`` directory), so the kernel hides lower files
exactly as the image says. A machine ``IMAGE_ROOT/LOCAL`` is an empty
directory with an overlay mounted on it: the layer chain as lower dirs (top
first) and an upper/work pair of its own under
``IMAGE_ROOT/.dkr/overlay/LOCAL/<id>/``. ``<id>`` is recorded in an xattr on
the mount point itself, so that when ``--force`` swaps a new machine
directory in for an old one, each directory keeps finding its own upper
dir. After a reboot ``dkr mount LOCAL`` mounts it again.

Mounting uses the new mount API where the kernel has it: one ``lowerdir+``
per layer, so no option string to outgrow, each dir passed as an O_PATH
descriptor (Linux 6.13+) or by name relative to the image root (6.8+). Older
kernels get ``mount(2)``, whose options must fit in one page: with names
relative to the image root that is about fifty layers, and a taller image
gets a clear error. Any kernel stacks at most 500 lower dirs.
"""

from __future__ import annotations

import ctypes
import errno
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from dkr.hookspecs import OPAQUE_XATTR, hookimpl
from dkr.pluginkit import (AT_FDCWD, OVERLAYFS_SUPER_MAGIC, DirectoryEntries, DkrError, libc,
                           mount_type, os_error, remove_tree, statfs_magic)

STATE_XATTR = "trusted.dkr.overlay"
MAX_STACK = 500                 # OVL_MAX_STACK: lower layers one mount can take

# Linux's generic syscall numbers (the same on every architecture but alpha).
SYS_MOVE_MOUNT, SYS_FSOPEN, SYS_FSCONFIG, SYS_FSMOUNT = 429, 430, 431, 432
FSOPEN_CLOEXEC = FSMOUNT_CLOEXEC = 1
FSCONFIG_SET_STRING, FSCONFIG_SET_FD, FSCONFIG_CMD_CREATE = 1, 5, 6
MOVE_MOUNT_F_EMPTY_PATH = 0x4


def _check(result: int, what: str) -> int:
    if result < 0:
        raise os_error(what)
    return result


def _kernel_has_overlay() -> bool:
    with open("/proc/filesystems") as f:
        if any(line.split()[-1] == "overlay" for line in f if line.strip()):
            return True
    # A module not loaded yet is loaded by the first mount.
    modules = Path("/lib/modules", os.uname().release, "kernel/fs/overlayfs")
    return any(modules.glob("overlay.ko*"))


# --- mount table ---------------------------------------------------------------

# --- mounting --------------------------------------------------------------------

def _fs_context_log(fd: int) -> str:
    """The kernel's own words about a failed fsconfig (``e overlay: …`` lines)."""
    lines = []
    while True:
        try:
            msg = os.read(fd, 1024)
        except OSError:
            break
        if not msg:
            break
        lines.append(msg.decode(errors="replace").split(" ", 1)[-1])
    return "; ".join(lines)


def _fsconfig(fd: int, cmd: int, key: str | None, value, aux: int, what: str) -> None:
    result = libc.syscall(ctypes.c_long(SYS_FSCONFIG), ctypes.c_int(fd), ctypes.c_uint(cmd),
                           key.encode() if key else None, value, ctypes.c_int(aux))
    if result < 0:
        err = ctypes.get_errno()
        why = _fs_context_log(fd) or os.strerror(err)
        raise OSError(err, f"{what}: {why}")


class _Unsupported(Exception):
    """This kernel lacks the way of mounting just tried."""


@contextmanager
def _directory(path: Path) -> Iterator[None]:
    """Work in ``path`` for a moment: relative names keep mount options short."""
    cwd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.chdir(path)
        yield
    finally:
        os.fchdir(cwd)
        os.close(cwd)


def _set_dir_by_fd(fd: int, key: str, path: Path, what: str) -> None:
    dirfd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _fsconfig(fd, FSCONFIG_SET_FD, key, None, dirfd, what)
    finally:
        os.close(dirfd)


def _set_dir_by_name(fd: int, key: str, path: Path, what: str) -> None:
    # fsconfig takes at most 255 bytes of string: names relative to the image root fit.
    _fsconfig(fd, FSCONFIG_SET_STRING, key, os.fsencode(os.path.relpath(path)), 0, what)


def mount_new_api(target: Path, lowers: Sequence[Path], upper: Path, work: Path,
                  by_fd: bool) -> None:
    """fsopen/fsconfig/fsmount: one ``lowerdir+`` per layer, so no page-size limit.

    ``by_fd`` passes each directory as an O_PATH descriptor (Linux 6.13+), else
    by name (``lowerdir+`` strings, Linux 6.8+). Raises _Unsupported when the
    kernel cannot do it that way.
    """
    fd = libc.syscall(ctypes.c_long(SYS_FSOPEN), b"overlay", ctypes.c_uint(FSOPEN_CLOEXEC))
    if fd < 0 and ctypes.get_errno() == errno.ENOSYS:
        raise _Unsupported()
    _check(fd, "fsopen overlay")
    set_dir = _set_dir_by_fd if by_fd else _set_dir_by_name
    try:
        for index, lower in enumerate(lowers):
            try:
                set_dir(fd, "lowerdir+", lower, f"lower dir {lower.name}")
            except OSError as e:
                # An old kernel refuses the parameter itself, before looking at any layer.
                if index == 0 and e.errno == errno.EINVAL:
                    raise _Unsupported() from None
                raise
        set_dir(fd, "upperdir", upper, "upper dir")
        set_dir(fd, "workdir", work, "work dir")
        _fsconfig(fd, FSCONFIG_CMD_CREATE, None, None, 0, "creating the overlay")
        mnt = _check(libc.syscall(ctypes.c_long(SYS_FSMOUNT), ctypes.c_int(fd),
                                   ctypes.c_uint(FSMOUNT_CLOEXEC), ctypes.c_uint(0)), "fsmount")
        try:
            _check(libc.syscall(ctypes.c_long(SYS_MOVE_MOUNT), ctypes.c_int(mnt), b"",
                                 ctypes.c_int(AT_FDCWD), os.fsencode(os.path.abspath(target)),
                                 ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH)), "move_mount")
        finally:
            os.close(mnt)
    finally:
        os.close(fd)


def mount_old_api(target: Path, lowers: Sequence[Path], upper: Path, work: Path) -> None:
    """mount(2): all options in one page, so names relative to the image root."""
    rel = [os.path.relpath(p, target.parent) for p in (*lowers, upper, work)]
    options = f"lowerdir={':'.join(rel[:-2])},upperdir={rel[-2]},workdir={rel[-1]}"
    limit = os.sysconf("SC_PAGE_SIZE") - 1
    if len(options) > limit:
        fit = len(lowers) * limit // len(options)
        raise DkrError(f"the image has {len(lowers)} layers, more than this kernel's overlay "
                       f"mount can stack (about {fit}; Linux 6.8 and later take up to {MAX_STACK})")
    with _directory(target.parent):
        _check(libc.mount(b"overlay", os.fsencode(target.name), b"overlay", ctypes.c_ulong(0),
                           options.encode()), "mount overlay")


def mount_overlay(target: Path, lowers: Sequence[Path], upper: Path, work: Path) -> None:
    """Mount the overlay on ``target`` the best way this kernel offers."""
    target = Path(os.path.abspath(target))
    with _directory(target.parent):
        for by_fd in (True, False):
            try:
                return mount_new_api(target, lowers, upper, work, by_fd)
            except _Unsupported:
                continue
    mount_old_api(target, lowers, upper, work)


def unmount(target: Path) -> None:
    _check(libc.umount2(os.fsencode(target), ctypes.c_int(0)), f"unmount {target}")


# --- the backend -------------------------------------------------------------------

def _shown(layers: Sequence[Path]) -> Sequence[Path]:
    """The layers (base first) that a merged view shows.

    overlayfs honours an opaque mark below a layer's root only; a layer whose
    root is marked (its tar had a top-level ``.wh..wh..opq``) hides all below it.
    """
    for index in range(len(layers) - 1, 0, -1):
        try:
            if os.getxattr(layers[index], OPAQUE_XATTR) == b"y":
                return layers[index:]
        except OSError:
            pass
    return layers


def _check_stack(layers: Sequence[Path]) -> None:
    if len(layers) > MAX_STACK:
        raise DkrError(f"the image has {len(layers)} layers; an overlay mount stacks "
                       f"at most {MAX_STACK} (use --backend btrfs or dir)")


def _state_id(path: Path) -> str | None:
    try:
        return os.getxattr(path, STATE_XATTR, follow_symlinks=False).decode()
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.ENOENT):
            return None
        raise DkrError(f"overlay: cannot read {STATE_XATTR} of {path}: {e.strerror}") from None


class OverlayBackend(DirectoryEntries):
    name = "overlay"
    layer_format = "diff"
    auto_priority = 50

    def unusable_reason(self, image_root: Path) -> str | None:
        if not _kernel_has_overlay():
            return "the kernel has no overlay file system"
        if os.geteuid() != 0:
            return "overlay mounts need root"
        try:
            if statfs_magic(image_root) == OVERLAYFS_SUPER_MAGIC:
                return f"{image_root} is itself on overlayfs"
        except OSError as e:
            return str(e)
        return _trusted_xattrs_refused(image_root / ".dkr")

    # --- layers: plain directories --------------------------------------------
    def create_layer(self, image_root: Path, key: str, path: Path, parent: Path | None) -> None:
        try:
            path.mkdir(mode=0o755)      # a diff layer does not start from its parent
        except OSError as e:
            raise DkrError(f"overlay: cannot create layer {path}: {e.strerror}") from None

    def seal_layer(self, image_root: Path, key: str, path: Path) -> None:
        pass

    # --- machines ---------------------------------------------------------------------
    def state_dir(self, image_root: Path, local: str, state_id: str) -> Path:
        return image_root / ".dkr" / "overlay" / local / state_id

    def create_machine(self, image_root: Path, local: str, path: Path,
                       layers: Sequence[Path]) -> None:
        _check_stack(layers)
        import secrets    # here: every start of the extractors' server loads this module
        state_id = secrets.token_hex(8)
        try:
            path.mkdir(mode=0o755)
            # The id goes on the mount point first: a crash never leaves a state dir
            # that no machine directory names.
            os.setxattr(path, STATE_XATTR, state_id.encode())
            state = self.state_dir(image_root, local, state_id)
            (state / "work").mkdir(parents=True, mode=0o700)
            (state / "upper").mkdir(mode=0o755)
            if layers:
                _copy_root_attributes(layers[-1], state / "upper")
            else:
                (state / "empty").mkdir(mode=0o755)
        except OSError as e:
            raise DkrError(f"overlay: cannot prepare machine {path.name}: {e.strerror}") from None

    def activate_machine(self, image_root: Path, local: str, path: Path,
                         layers: Sequence[Path]) -> None:
        mounted = mount_type(path)
        if mounted == "overlay":
            return
        if mounted is not None:
            raise DkrError(f"{path} has a {mounted} file system mounted on it, not an overlay")
        state = self._state(image_root, local, path)
        _check_stack(layers)
        for layer in layers:
            if not layer.is_dir():
                raise DkrError(f"machine {path.name} needs layer {layer.name}, which is missing "
                               "(pull the image again with --force)")
        lowers = list(reversed(_shown(layers))) or [state / "empty"]
        try:
            mount_overlay(path, lowers, state / "upper", state / "work")
        except OSError as e:
            raise DkrError(f"cannot mount machine {path.name}: {e.strerror}") from None

    def deactivate_machine(self, image_root: Path, local: str, path: Path) -> None:
        mounted = mount_type(path)
        if mounted is None:
            return
        if mounted != "overlay":
            raise DkrError(f"{path} has a {mounted} file system mounted on it, not an overlay")
        try:
            unmount(path)
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise DkrError(f"machine {path.name} is busy (something runs in it or has "
                               "files open there); stop that first") from None
            raise DkrError(f"cannot unmount machine {path.name}: {e.strerror}") from None

    def remove(self, path: Path) -> None:
        """A layer: a plain directory."""
        try:
            remove_tree(path)
        except OSError as e:
            raise DkrError(f"overlay: cannot remove {path}: {e.strerror}") from None

    def remove_machine(self, image_root: Path, local: str, path: Path) -> None:
        if not os.path.lexists(path):
            return
        if mount_type(path) is not None:
            self.deactivate_machine(image_root, local, path)
        try:
            state_id = _state_id(path) if path.is_dir() and not path.is_symlink() else None
            if state_id is not None:
                state = self.state_dir(image_root, local, state_id)
                remove_tree(state)
                try:
                    state.parent.rmdir()        # that was the last state of this LOCAL
                except OSError:
                    pass
            remove_tree(path)
        except OSError as e:
            raise DkrError(f"overlay: cannot remove {path}: {e.strerror}") from None

    def _state(self, image_root: Path, local: str, path: Path) -> Path:
        state_id = _state_id(path)
        if state_id is None:
            raise DkrError(f"{path} was not made by the overlay backend (no {STATE_XATTR})")
        state = self.state_dir(image_root, local, state_id)
        if not (state / "upper").is_dir() or not (state / "work").is_dir():
            raise DkrError(f"the upper directory of machine {path.name} is missing ({state})")
        return state


def _trusted_xattrs_refused(directory: Path) -> str | None:
    """Upper dirs need trusted.* xattrs (whiteouts, opaque dirs): can this file system keep them?"""
    if not directory.is_dir():
        return None                 # nothing to try on yet; mounting will say
    probe = "trusted.dkr.probe"
    try:
        os.setxattr(directory, probe, b"1")
        os.removexattr(directory, probe)
    except OSError as e:
        return f"{directory.parent} cannot keep trusted.* xattrs ({e.strerror})"
    return None


def _copy_root_attributes(source: Path, target: Path) -> None:
    """The merged root shows the upper root's mode and owner: make them the image's."""
    st = os.stat(source)
    os.chown(target, st.st_uid, st.st_gid)
    os.chmod(target, st.st_mode & 0o7777)


@hookimpl
def dkr_storage_backends():
    return [OverlayBackend()]


@hookimpl
def dkr_tree_owner(image_root: Path, path: Path) -> str | None:
    """A machine of ours has an overlay mounted on it, or our id on its mount point."""
    try:
        if mount_type(path) == "overlay" or (path.is_dir() and not path.is_symlink()
                                             and _state_id(path) is not None):
            return OverlayBackend.name
    except (OSError, DkrError):
        pass
    return None
