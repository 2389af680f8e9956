"""Small file-tree operations shared by the engine and the backends."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def write_all(fd: int, view: memoryview) -> None:
    """All of ``view`` to ``fd`` (a write to a file or pipe may take only part)."""
    while view:
        view = view[os.write(fd, view):]


def _make_writable_and_retry(func, path, exc_info) -> None:
    # Without root, a read-only directory cannot lose its entries: open it up, try again.
    parent = os.path.dirname(path)
    for p in (parent, path):
        try:
            st = os.lstat(p)
            if stat.S_ISDIR(st.st_mode):
                os.chmod(p, st.st_mode | stat.S_IRWXU)
        except OSError:
            pass
    func(path)


def remove_tree(path: Path | str) -> None:
    """Remove a file or directory tree; a missing path is not an error."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        import shutil                 # here: with bz2 and lzma it costs every start ~5 ms
        shutil.rmtree(path, onerror=_make_writable_and_retry)
    else:
        os.unlink(path)


def tree_size(path: Path | str) -> int:
    """Bytes used by the files below ``path``, each inode counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in filenames + dirnames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            key = (st.st_dev, st.st_ino)
            if key not in seen:
                seen.add(key)
                total += st.st_blocks * 512
    return total
