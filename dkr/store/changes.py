"""Was a machine changed since dkr made it? (What ``pull --force`` would discard.)

Per backend, the cheapest test that can tell:

- overlay: everything written in the machine lands in its upper dir, which
  starts empty: any entry there is a change (a deletion is a whiteout
  there), and the entries are the changes.
- btrfs: a snapshot's ``ctransid`` (the transaction of its last change)
  is not above its ``otransid`` (the transaction that made it) until
  something is written in it (read after a sync: it is updated when the
  transaction commits). Then, as the exchange of a --force swap also
  counts as a change of the root, the files are looked at as on dir.
- dir (and any other): files changed, made, moved or removed after the
  machine was made have a newer ctime (a removal, its directory's), as has
  anything copied up or written: every entry's ctime is compared with the
  time the record says the tree was made. That reads every inode's stat,
  (some ten thousand a second on a cold cache), and cannot see a change made
  in the same instant as the copy, or one whose ctime was set back (only
  possible by changing the clock).

What counts is the tree below the root: the root directory itself is
renamed into place after it was made, which sets its ctime.
"""

from __future__ import annotations

import calendar
import os
import time
from pathlib import Path

SAMPLE = 3          # changed paths named in a warning


def made_at(record: dict) -> float | None:
    """When the machine's tree was made, from its record (the precise ``made``,
    or an older record's ``created``, to the second and so taken as its end)."""
    made = record.get("made")
    if isinstance(made, (int, float)) and not isinstance(made, bool):
        return float(made)
    created = record.get("created")
    if isinstance(created, str):
        try:
            return calendar.timegm(time.strptime(created, "%Y-%m-%dT%H:%M:%SZ")) + 1
        except (ValueError, OverflowError):
            return None
    return None


def changed_paths(root_path: Path, local: str, record: dict) -> list[str] | None:
    """Up to SAMPLE + 1 paths (relative to the machine) changed since it was made;
    [] for none; None where that cannot be told."""
    machine = root_path / local
    backend = record.get("backend")
    if backend == "overlay":
        upper = _only_upper(root_path, local)
        if upper is not None:
            return _walk(upper, None)
    unchanged = _btrfs_unchanged(machine) if backend == "btrfs" else None
    if unchanged:
        return []
    since = made_at(record)
    if since is None:
        return None
    # A directory counts for what was added to or removed from it: named only if
    # nothing in it is.
    found = _walk(machine, since)
    found = [path for path in found if not any(other.startswith(path + "/") for other in found)]
    return found


def describe(paths: list[str]) -> str:
    shown = ", ".join(paths[:SAMPLE])
    return shown + (", …" if len(paths) > SAMPLE else "")


def _only_upper(root_path: Path, local: str) -> Path | None:
    """The upper dir of overlay machine LOCAL, if it has exactly one (a --force swap
    under way has two, and which is whose is then not told here)."""
    try:
        states = os.listdir(root_path / ".dkr" / "overlay" / local)
    except OSError:
        return None
    if len(states) != 1:
        return None
    upper = root_path / ".dkr" / "overlay" / local / states[0] / "upper"
    return upper if upper.is_dir() else None


def _btrfs_unchanged(machine: Path) -> bool | None:
    try:
        import btrfsutil
        btrfsutil.sync(machine)
        info = btrfsutil.subvolume_info(machine)
    except Exception:           # noqa: BLE001 - no btrfsutil, not a subvolume: walk
        return None
    return info.ctransid <= info.otransid


def _walk(top: Path, since: float | None) -> list[str]:
    """Entries below ``top`` (changed after ``since``, if given): at most SAMPLE + 1."""
    found: list[str] = []
    since_ns = None if since is None else int(since * 1e9)
    stack = [top]
    while stack and len(found) <= SAMPLE:
        directory = stack.pop()
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            continue
        if since_ns is None and not entries and directory != top:
            found.append(os.path.relpath(directory, top))       # a new, empty directory
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            # (an upper dir holds the directories of what was copied up: those
            # are no change of their own)
            if since_ns is None and not entry.is_dir(follow_symlinks=False) \
                    or since_ns is not None and st.st_ctime_ns > since_ns:
                found.append(os.path.relpath(entry.path, top))
                if len(found) > SAMPLE:
                    break
            if entry.is_dir(follow_symlinks=False) and not os.path.ismount(entry.path):
                stack.append(Path(entry.path))
    return found
