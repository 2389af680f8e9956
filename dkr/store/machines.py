"""What a machine name holds already, and what a pull may do with it.

machinectl (systemd's image discovery) lists ``IMAGE_ROOT/NAME`` (a
directory or btrfs subvolume), ``NAME.raw`` (a disk image) and, since
systemd 254, ``NAME.v`` and ``NAME.raw.v`` (versioned images) all as the
image NAME: for dkr they are one name space. A tree at ``IMAGE_ROOT/LOCAL``
is dkr's only if it has a machine record; anything else a person or another
tool made, and dkr never replaces it.

A re-pull of what a machine already holds (the same image digest, made by
the same backend) changes nothing; another image replaces it only with
``--force``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from dkr.errors import DkrError
from dkr.fsinfo import is_mount_point
from dkr.store.imagelock import local_lock_path
from dkr.store.layout import ImageRoot

# Other names under which machinectl lists an image NAME (see the docstring).
OTHER_IMAGE_SUFFIXES = (".raw", ".v", ".raw.v")



class MachineExists(DkrError):
    """LOCAL is taken: by another image (--force replaces it) or a tree dkr did not make."""

    kind = "exists"


def image_digest(record: dict) -> str | None:
    """What identifies the image a record's machine was made from: the v2 manifest
    digest, or the v1 image id."""
    return record.get("manifest_digest") or record.get("image_id")


def record_path(root: ImageRoot, local: str) -> Path:
    return root.meta / "machines" / f"{local}.json"


def refuse_foreign(root: ImageRoot, local: str) -> None:
    """A DkrError if ``local`` names an image that dkr did not make."""
    for suffix in OTHER_IMAGE_SUFFIXES:
        other = root.path / f"{local}{suffix}"
        if os.path.lexists(other):
            raise MachineExists(f"{other} already exists, and machinectl lists it as image "
                           f"{local!r}: dkr did not make it and will not put a second image "
                           "under that name; choose another LOCAL")
    machine = root.machine_path(local)
    if os.path.lexists(machine) and not os.path.lexists(record_path(root, local)):
        raise MachineExists(f"{machine} exists, but dkr did not make it (it has no record in "
                       f"{record_path(root, local).parent}): dkr never replaces or removes "
                       "it, also not with --force; move it away or choose another LOCAL")


@dataclass
class Held:
    """The machine a name holds: its record (None if it cannot be read) and digest."""
    record: dict | None
    digest: str | None
    backend: str | None


def held(root: ImageRoot, local: str) -> Held | None:
    """The dkr machine at ``IMAGE_ROOT/LOCAL``, or None if there is none. (Call
    ``refuse_foreign`` first: a tree without a record is not dkr's.)"""
    if not os.path.lexists(root.machine_path(local)):
        return None
    try:
        record = root.machine_info(local)
    except DkrError:
        record = None             # unreadable: only --force (or remove) replaces it
    if record is None:
        return Held(None, None, None)
    return Held(record, image_digest(record), record.get("backend"))


def up_to_date(root: ImageRoot, local: str, digest: str, backend: str, force: bool) -> bool:
    """Whether machine ``local`` already holds image ``digest`` made by ``backend``.

    False where the pull is to make or replace it. Without ``force`` a machine
    that holds another image is a DkrError naming both.
    """
    refuse_foreign(root, local)
    found = held(root, local)
    if found is None:
        return False
    same = (found.digest == digest and found.backend == backend
            and "swap" not in (found.record or {}))
    if force:
        return False
    if same:
        return True
    if found.record is None:
        holds = "an image its unreadable record cannot name"
    elif found.digest == digest:
        holds = f"{digest} made by backend {found.backend}"
    else:
        holds = found.digest or "an image its record does not name"
    wanted = digest if found.digest != digest else f"{digest} made by backend {backend}"
    raise MachineExists(f"machine {local!r} in {root.path} holds {holds}, this pull gives "
                   f"{wanted}: --force replaces the machine and discards changes made in it")


# --- is it usable as it stands? ----------------------------------------------------------

def state(root: ImageRoot, local: str, record: dict | DkrError) -> str:
    """What ``dkr list`` says of a machine: "ready", "in use" (systemd holds its
    image lock: nspawn runs it), or why it is not usable as it stands."""
    if isinstance(record, DkrError):
        return "record unreadable"
    machine = root.machine_path(local)
    if not os.path.lexists(machine):
        return "tree missing"
    if "swap" in record or record.get("swap_pending"):
        return "being replaced"
    if not is_mount_point(machine) and _empty_dir(machine):
        # (an overlay machine's directory is empty until it is mounted; no image
        # makes an empty machine)
        return "not mounted" if record.get("backend") == "overlay" else "empty"
    return "in use" if _lock_held(local_lock_path(machine)) else "ready"


def _empty_dir(path: Path) -> bool:
    try:
        with os.scandir(path) as entries:
            return next(entries, None) is None
    except NotADirectoryError:
        return False
    except OSError:
        return False


def _lock_held(path: Path) -> bool:
    """Does anyone hold a lock on ``path``? (Read from /proc/locks: taking the lock
    to see would, for a moment, keep nspawn from starting.)"""
    try:
        st = os.stat(path)
        with open("/proc/locks") as f:
            locks = f.read()
    except OSError:
        return False
    name = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    return any(len(fields) > 5 and fields[5] == name
               for fields in (line.split() for line in locks.splitlines()))
