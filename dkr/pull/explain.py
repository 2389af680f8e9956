"""What a failed pull's last error adds for the user: what to do next.

The engine's errors say what failed; a full disk and a broken download also
need to say where the space went and what the next pull does with what was
downloaded so far. Both depend on the whole image (its layers, the image root),
which only the pull knows, so they are added here, once, at the end.
"""

from __future__ import annotations

import os
from pathlib import Path

from dkr.errors import DiskFull, DkrError, os_error, reworded
from dkr.registry.reference import digest_hex
from dkr.registry.v2 import LayerPlan
from dkr.store.layout import ImageRoot


def free_space(path: Path) -> int | None:
    """What an unprivileged writer may still use of ``path``'s file system."""
    try:
        stats = os.statvfs(path)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


def explained(error: DkrError | OSError, root: ImageRoot, layers: list[LayerPlan],
              spool_dir: Path, free_before: int | None) -> DkrError:
    """``error``, the end of a pull of ``layers`` into ``root``, with what to do about it.
    ``free_before``: the root's free space when the pull began."""
    if isinstance(error, OSError):
        error = os_error(error)
    if error.kind == "disk-full":
        return _disk_full(error, root, layers, free_before)
    if error.kind == "network":
        kept = sum(_size(spool_dir / digest_hex(layer.digest)) for layer in layers)
        if kept:
            return reworded(error, f"{error}; the {_human(kept)} downloaded so far are kept: "
                                   "the next pull resumes from there")
        # (What streamed into an extractor is not on disk; --spool-all keeps it all.)
        return reworded(error, f"{error}; the next pull starts this download again "
                               "(--spool-all would have kept every byte for a resume)")
    return error


def _disk_full(error: DkrError, root: ImageRoot, layers: list[LayerPlan],
               free_before: int | None) -> DkrError:
    # What the layers unpack to is known only once they are unpacked: the pull needs
    # more than it had, and at least what it still downloads (kept until unpacked).
    missing = sum(layer.size for layer in layers
                  if not root.layer_path(digest_hex(layer.chain_id)).exists())
    free_now = free_space(root.path)
    need = f"more than the {_human(free_before)} free when it began" \
        if free_before is not None else "more room"
    return DiskFull(f"{error}. The image root {root.path} has "
                    f"{_human(free_now) if free_now is not None else 'an unknown amount'} "
                    "free now: "
                    f"this pull needs {need} ({_human(missing)} of layers to download, "
                    "and what they unpack to); free some space (dkr gc removes what no "
                    "machine uses) or pull into another --image-root")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _human(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"
