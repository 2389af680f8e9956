"""The ``erofs`` backend: every layer one EROFS image file, a machine an overlay of them.

The model of containerd's EROFS snapshotter and of composefs. A layer is
extracted into a plain directory (as for any ``diff`` backend: whiteouts
become overlayfs markers), ``seal_layer`` packs it into an image with
``mkfs.erofs``, and ``commit_layer`` renames that image to the layer's
final name, ``IMAGE_ROOT/.dkr-KEY``: a file, not a tree. A machine
``IMAGE_ROOT/LOCAL`` is an empty directory with an overlay mounted on it,
whose lower dirs are its layers' images, each loop-mounted read-only, and
whose upper and work dirs are its own. Each machine keeps its mounts and dirs
under ``IMAGE_ROOT/.dkr/erofs/machines/LOCAL/<id>/``; ``<id>`` is kept in an
xattr on the machine's directory, so that the two trees of a ``--force``
swap each find their own.

It uses nothing of dkr but ``dkr.hookspecs`` and ``dkr.pluginkit``, and
commits through ``DirectoryEntries`` only what is a directory or a rename.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import subprocess
from pathlib import Path
from typing import Sequence

from dkr.hookspecs import OPAQUE_XATTR, hookimpl
from dkr.pluginkit import (OVERLAYFS_SUPER_MAGIC, DirectoryEntries, DkrError, mount_type,
                           mounts_below, remove_tree, statfs_magic, tied)

NAME = "erofs"
ID_XATTR = "trusted.dkr.erofs"
SOURCE = "dkr-erofs"            # the overlay's source in the mount table: how we know ours
EROFS_MAGIC = 0xE0F5E1E2        # at byte 1024 of an image, little-endian


def _run(argv: list[str], what: str, cwd: Path | None = None) -> None:
    # tied: a mkfs that outlived a killed dkr would go on writing an image the next run removes
    proc = subprocess.run(tied(argv), capture_output=True, text=True, cwd=cwd)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise DkrError(f"erofs: {what}: {lines[-1] if lines else f'exit {proc.returncode}'}")


def _state(image_root: Path) -> Path:
    return image_root / ".dkr" / NAME


def _image_tmp(image_root: Path, key: str) -> Path:
    """Where a sealed layer's image waits for its commit (under the layer's lock)."""
    return _state(image_root) / "sealed" / f"{key}.erofs"


def _machine_id(path: Path) -> str | None:
    try:
        return os.getxattr(path, ID_XATTR, follow_symlinks=False).decode()
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.ENOENT, errno.ENOTDIR):
            return None
        raise


def _our_overlay_on(path: Path) -> bool:
    """Is an overlay of ours mounted right on ``path``?"""
    target = os.fsencode(os.path.realpath(path))
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            tail = fields[fields.index(b"-") + 1:]
            if fields[4] == target and tail[:2] == [b"overlay", SOURCE.encode()]:
                return True
    return False


def _is_image(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(1024)
            return int.from_bytes(f.read(4), "little") == EROFS_MAGIC
    except OSError:
        return False


class ErofsBackend(DirectoryEntries):
    name = NAME
    layer_format = "diff"
    auto_priority = -1                    # only on request: --backend erofs

    def unusable_reason(self, image_root: Path) -> str | None:
        if shutil.which("mkfs.erofs") is None:
            return "mkfs.erofs is not installed (Debian: erofs-utils)"
        if os.geteuid() != 0:
            return "loop and overlay mounts need root"
        try:
            if statfs_magic(image_root) == OVERLAYFS_SUPER_MAGIC:
                return f"{image_root} is itself on overlayfs"
        except OSError as e:
            return str(e)
        return None

    # --- layers: a directory to extract into, then an image -------------------------
    def create_layer(self, image_root: Path, key: str, path: Path, parent: Path | None) -> None:
        path.mkdir(mode=0o755)            # a diff layer does not start from its parent

    def seal_layer(self, image_root: Path, key: str, path: Path) -> None:
        image = _image_tmp(image_root, key)
        image.parent.mkdir(parents=True, exist_ok=True)
        image.unlink(missing_ok=True)     # a killed run's, under the same lock
        # --preserve-mtime: the files keep the image's times, not the time of packing.
        _run(["mkfs.erofs", "--quiet", "--preserve-mtime", str(image), str(path)],
             f"packing layer {key[:12]}")

    def commit_layer(self, image_root: Path, key: str, path: Path, final: Path) -> None:
        os.rename(_image_tmp(image_root, key), final)     # the layer is there, whole
        remove_tree(path)                                  # its files are in the image now

    def remove_layer(self, image_root: Path, key: str, path: Path) -> None:
        remove_tree(path)                 # the extraction tree, or a withdrawn image
        _image_tmp(image_root, key).unlink(missing_ok=True)

    # --- machines: an overlay of loop-mounted images -----------------------------------------
    def machine_dir(self, image_root: Path, local: str, machine_id: str) -> Path:
        return _state(image_root) / "machines" / local / machine_id

    def create_machine(self, image_root: Path, local: str, path: Path,
                       layers: Sequence[Path]) -> None:
        machine_id = secrets.token_hex(8)
        path.mkdir(mode=0o755)
        # The id goes on the directory first: a crash never leaves state that no machine names.
        os.setxattr(path, ID_XATTR, machine_id.encode())
        state = self.machine_dir(image_root, local, machine_id)
        for sub in ("upper", "work", "lower"):
            (state / sub).mkdir(parents=True, mode=0o755)
        if layers:
            # The merged root shows the upper root's owner and mode: make them the image's.
            probe = state / "lower" / "probe"
            probe.mkdir()
            _run(["mount", "-t", "erofs", "-o", "ro,loop", str(layers[-1]), str(probe)],
                 f"mounting layer {layers[-1].name}")
            try:
                st = os.stat(probe)
            finally:
                _run(["umount", str(probe)], "unmounting a layer")
                probe.rmdir()
            os.chown(state / "upper", st.st_uid, st.st_gid)
            os.chmod(state / "upper", st.st_mode & 0o7777)

    def activate_machine(self, image_root: Path, local: str, path: Path,
                         layers: Sequence[Path]) -> None:
        if _our_overlay_on(path):
            return
        if mount_type(path) is not None:
            raise DkrError(f"{path} has a {mount_type(path)} file system mounted on it")
        state = self._existing_state(image_root, local, path)
        lowers = []
        for index, layer in enumerate(layers):
            if not layer.is_file():
                raise DkrError(f"machine {local} needs layer {layer.name}, which is missing")
            point = state / "lower" / str(index)
            point.mkdir(exist_ok=True)
            if mount_type(point) is None:
                _run(["mount", "-t", "erofs", "-o", "ro,loop", str(layer), str(point)],
                     f"mounting layer {layer.name}")
            lowers.append(point)
        # overlayfs honours an opaque mark below a layer's root only: a marked root hides all below.
        for index in range(len(lowers) - 1, 0, -1):
            try:
                if os.getxattr(lowers[index], OPAQUE_XATTR) == b"y":
                    lowers = lowers[index:]
                    break
            except OSError:
                pass
        if not lowers:
            (state / "empty").mkdir(exist_ok=True)
            lowers = [state / "empty"]
        # Names relative to the state dir keep the option string short.
        lower_names = ":".join(os.path.relpath(p, state) for p in reversed(lowers))
        options = f"lowerdir={lower_names},upperdir=upper,workdir=work"
        _run(["mount", "-t", "overlay", SOURCE, "-o", options, str(path.absolute())],
             f"mounting machine {local}", cwd=state)

    def deactivate_machine(self, image_root: Path, local: str, path: Path) -> None:
        if _our_overlay_on(path):
            proc = subprocess.run(tied(["umount", str(path)]), capture_output=True, text=True)
            if proc.returncode != 0:
                if "busy" in proc.stderr:
                    raise DkrError(f"machine {local} is busy (something runs in it or has "
                                   "files open there); stop that first")
                raise DkrError(f"erofs: cannot unmount machine {local}: {proc.stderr.strip()}")
        elif mount_type(path) is not None:
            raise DkrError(f"{path} has a {mount_type(path)} file system mounted on it")
        machine_id = _machine_id(path) if path.is_dir() else None
        if machine_id is None:
            return
        lower = self.machine_dir(image_root, local, machine_id) / "lower"
        for point in mounts_below(lower):
            if point != lower:
                _run(["umount", str(point)], f"unmounting a layer of machine {local}")

    def remove_machine(self, image_root: Path, local: str, path: Path) -> None:
        if not os.path.lexists(path):
            return
        self.deactivate_machine(image_root, local, path)
        machine_id = _machine_id(path) if path.is_dir() and not path.is_symlink() else None
        if machine_id is not None:
            state = self.machine_dir(image_root, local, machine_id)
            remove_tree(state)
            try:
                state.parent.rmdir()      # that was the last tree of this LOCAL
            except OSError:
                pass
        remove_tree(path)

    def _existing_state(self, image_root: Path, local: str, path: Path) -> Path:
        machine_id = _machine_id(path)
        if machine_id is None:
            raise DkrError(f"{path} was not made by the erofs backend (no {ID_XATTR})")
        state = self.machine_dir(image_root, local, machine_id)
        if not (state / "upper").is_dir():
            raise DkrError(f"the upper directory of machine {local} is missing ({state})")
        return state


@hookimpl
def dkr_storage_backends():
    return [ErofsBackend()]


@hookimpl(tryfirst=True)        # before the overlay plugin, which claims any overlay mount
def dkr_tree_owner(image_root: Path, path: Path) -> str | None:
    try:
        if path.is_file() and _is_image(path):
            return NAME
        if _our_overlay_on(path) or (path.is_dir() and _machine_id(path) is not None):
            return NAME
    except OSError:
        pass
    return None
