"""What a failed pull's last error adds for the user: what to do next.

The engine's errors say what failed; a full disk and a broken download also
need to say where the space went and what the next pull does with what was
downloaded so far. Both depend on the whole image (its layers, the image root),
which only the pull knows, so they are added here, once, at the end.
"""

from __future__ import annotations

import os
from pathlib import Path

from dkr.errors import DiskFull, DkrError, error_kind, os_error, reworded
from dkr.registry.reference import digest_hex
from dkr.registry.v2 import LayerPlan
from dkr.store.layout import ImageRoot


def explained(error: DkrError | OSError, root: ImageRoot, layers: list[LayerPlan],
              spool_dir: Path) -> DkrError:
    """``error``, the end of a pull of ``layers`` into ``root``, with what to do about it."""
    if error_kind(error) == "disk-full":
        return _disk_full(root, layers)
    if isinstance(error, OSError):
        return os_error(error)
    if error.kind == "network":
        kept = sum(_size(spool_dir / digest_hex(layer.digest)) for layer in layers)
        if kept:
            return reworded(error, f"{error}; the {_human(kept)} downloaded so far are kept: "
                                   "the next pull resumes from there")
    return error


def _disk_full(root: ImageRoot, layers: list[LayerPlan]) -> DkrError:
    # A layer is downloaded and then unpacked: the tree takes at least as much room
    # as the compressed blob (usually two to four times), so twice is "at least".
    missing = sum(layer.size for layer in layers
                  if not root.layer_path(digest_hex(layer.chain_id)).exists())
    try:
        stats = os.statvfs(root.path)
        free = f"{_human(stats.f_bavail * stats.f_frsize)} free"
    except OSError:
        free = "free space unknown"
    return DiskFull(f"no space left in the image root {root.path} ({free} now): this pull needs about "
                    f"{_human(2 * missing)} ({_human(missing)} of layers to download, and "
                    "room to unpack them). Free some space (dkr gc removes what no machine "
                    "uses) or pull into another --image-root")


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
