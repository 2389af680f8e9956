"""Machine management commands: list, inspect, remove, gc, mount, umount.

They work on what a pull leaves in the image root (see ``dkr.store``): the
machine records in ``.dkr/machines/``, the layers ``.dkr-<key>`` and their
records, the manifest and config blobs. Every change happens under the same
flock(2) the engine takes (``machine-LOCAL.lock``, ``layer-<key>.lock``), so
a command never tears down what a pull is building; a lock that is held
makes the command refuse (or, for gc, pass over that entry) instead of wait.
Each user error is one DkrError, raised before anything changes wherever that
can be checked up front.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable, Iterator

from dkr.errors import DkrError, UsageError, one_line
from dkr.fsinfo import is_mount_point
from dkr.hookspecs import StorageBackend
from dkr.plugins import backend_on_disk, backends
from dkr.registry.reference import validate_existing_machine_name
from dkr.store.layout import LAYER_PREFIX, MACHINE_TMP_PREFIX, TMP_SUFFIX_LENGTH, ImageRoot, refuse_mounts_in, remove_layer_entry, remove_machine_entry, text_list, remove_temps
from dkr.store.locks import AsyncFlock
from dkr.treeops import tree_size
from dkr.store.swap import recover, recover_if_idle
from dkr.store import machines, nspawn
from dkr.store.imagelock import ImageInUse, ImageLock

log = logging.getLogger("dkr.manage")

LAYER_RE = re.compile(re.escape(LAYER_PREFIX) + r"((?:v1-)?[0-9a-f]{1,128})")
_TMP = rf"\.tmp-[0-9a-f]{{{TMP_SUFFIX_LENGTH}}}"
LAYER_TMP_RE = re.compile(re.escape(LAYER_PREFIX) + r"((?:v1-)?[0-9a-f]{1,128})" + _TMP)
MACHINE_TMP_RE = re.compile(re.escape(MACHINE_TMP_PREFIX) + r"(.+)" + _TMP)
DIGEST_RE = re.compile(r"sha256:([0-9a-f]{64})")
NSPAWN_TMP_RE = re.compile(r"\.#(.+)\.nspawn" + _TMP)      # (see dkr.store.nspawn)
# A record or blob being written: .NAME.tmp-<rand> (see dkr.store)
RECORD_TMP_RE = re.compile(r"\.(.+)" + _TMP)


def add_commands(sub, common) -> None:
    """Register the management subcommands on the ``dkr`` argument parser."""
    p = sub.add_parser("list", help="list the machines dkr made")
    common(p)
    p.add_argument("--json", action="store_true", help="print a JSON array")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("inspect", help="print a machine's record, manifest and config as JSON")
    common(p)
    p.add_argument("local", metavar="LOCAL")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("remove", aliases=["rm"], help="remove machines (their layers stay; see gc)")
    common(p)
    p.add_argument("locals", metavar="LOCAL", nargs="+")
    p.set_defaults(func=cmd_remove)

    p = sub.add_parser("gc", help="remove layers and metadata no machine needs, and leftovers")
    common(p)
    p.add_argument("--dry-run", "-n", action="store_true", help="only list what would go")
    p.set_defaults(func=cmd_gc)

    p = sub.add_parser("mount", help="mount machines that need it (overlay, after a reboot)")
    common(p)
    p.add_argument("locals", metavar="LOCAL", nargs="*")
    p.add_argument("--all", action="store_true", help="every machine dkr made")
    p.set_defaults(func=cmd_mount)

    p = sub.add_parser("umount", help="take a machine's mount down")
    common(p)
    p.add_argument("locals", metavar="LOCAL", nargs="*")
    p.add_argument("--all", action="store_true", help="every machine dkr made")
    p.set_defaults(func=cmd_umount)


# --- shared pieces -------------------------------------------------------------------

def _machine(root: ImageRoot, local: str) -> dict:
    """The record of machine ``local``; a DkrError when dkr knows no such machine."""
    validate_existing_machine_name(local)
    info = root.machine_info(local) if root.meta.is_dir() else None
    if info is None:
        machines.refuse_foreign(root, local)      # (a tree of someone else's: say so)
        raise DkrError(f"no machine {local!r} in {root.path}")
    return info


def _backend(name: str | None, what: str) -> StorageBackend:
    found = backends().get(name or "")
    if found is None:
        raise DkrError(f"{what} was made by backend {name!r}, which is not installed")
    return found


@contextmanager
def _flock(root: ImageRoot, name: str, busy: str) -> Iterator[None]:
    """Hold ``.dkr/locks/<name>.lock``, or raise DkrError(busy) when someone else does."""
    with ExitStack() as stack:
        if not _try_flock_into(root, name, stack):
            raise DkrError(busy)
        yield


def _try_flock_into(root: ImageRoot, name: str, stack: ExitStack) -> bool:
    """Take the lock ``name`` without waiting; on success ``stack`` releases it."""
    locks = root.meta / "locks"
    lock = AsyncFlock(locks / f"{name}.lock", name)
    try:
        locks.mkdir(parents=True, exist_ok=True)
        if not lock.try_acquire():
            return False
    except OSError as e:
        raise DkrError(f"cannot lock {locks / name}: {e.strerror}") from None
    stack.callback(lock.release)
    return True


def _machine_lock(root: ImageRoot, local: str, stack: ExitStack) -> None:
    if not _try_flock_into(root, f"machine-{local}", stack):
        raise DkrError(f"machine {local!r} is busy: another dkr process is working on it")


def _human(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def _image_size(root: ImageRoot, info: dict) -> int | None:
    """Unpacked size of the machine's image: its layers' tar bytes."""
    total = 0
    for key in info.get("layers", []):
        layer = _layer_record(root, key)
        if "tar_bytes" not in layer:
            return None
        total += layer["tar_bytes"]
    return total


def _layer_record(root: ImageRoot, key: str) -> dict:
    """What the layer's record says; an unreadable record says nothing (and the log
    says so): listing or collecting goes on without it."""
    try:
        return root.layer_info(key) or {}
    except DkrError as e:
        log.warning("%s; going on without it.", e)
        return {}


@contextmanager
def _wrap_os_error(what: str) -> Iterator[None]:
    """A backend step; an OSError from a plain-tree backend becomes a one-line error."""
    try:
        yield
    except OSError as e:
        raise DkrError(f"{what}: {e.strerror or e}") from None


# --- list and inspect -------------------------------------------------------------------

def _summary(root: ImageRoot, info: dict) -> dict:
    local = info.get("local", "?")
    machine = root.machine_path(local)
    present = os.path.lexists(machine)
    return {"local": local, "reference": info.get("reference"),
            # a v1 image has no manifest: its image id names it
            "digest": info.get("manifest_digest") or info.get("image_id"),
            "index_digest": info.get("index_digest"),
            "backend": info.get("backend"),
            "size": _image_size(root, info),
            # What `du -s` says of the machine: on btrfs, blocks it shares with its
            # layers and other machines count in full, as there.
            "disk_use": tree_size(machine) if present else None,
            "created": info.get("created"),
            "path": str(machine), "present": present}


def _ago(created: str | None, now: float) -> str:
    """A record's ISO 8601 UTC time as people say it: "3 minutes ago"."""
    import calendar
    try:
        then = calendar.timegm(time.strptime(created or "", "%Y-%m-%dT%H:%M:%SZ"))
    except ValueError:
        return created or "-"
    seconds = max(0, int(now - then))
    for unit, length in (("year", 365 * 86400), ("month", 30 * 86400), ("week", 7 * 86400),
                         ("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        count = seconds // length
        if count >= (2 if unit in ("month", "week") else 1):
            return f"{count} {unit}{'s' if count != 1 else ''} ago"
    return "just now"


def cmd_list(args) -> int:
    root = ImageRoot(args.image_root)
    if root.meta.is_dir():
        for local, info in root.machine_records():
            if isinstance(info, dict) and "swap" in info:     # left by a pull that was killed
                recover_if_idle(root, local)
    rows = []
    for local, info in (root.machine_records() if root.meta.is_dir() else []):
        if isinstance(info, dict):
            row = _summary(root, info)
        else:
            log.warning("%s; its machine is listed as unreadable.", info)
            row = {"local": local, "path": str(root.machine_path(local)), "error": str(info)}
        rows.append({**row, "state": machines.state(root, local, info)})
    rows.sort(key=lambda row: row["local"])
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    table = [("LOCAL", "REFERENCE", "DIGEST", "BACKEND", "SIZE", "CREATED", "STATE")]
    now = time.time()
    for row in rows:
        digest = (row.get("digest") or "-").split(":", 1)[-1][:12]
        table.append((row["local"], row.get("reference") or "-", digest,
                      row.get("backend") or "-", _human(row.get("disk_use")),
                      _ago(row.get("created"), now), row["state"]))
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    return 0


def _blob_json(root: ImageRoot, digest: str | None):
    if not digest:
        return None
    data = root.read_blob(digest)
    if data is None:
        return None
    try:
        return json.loads(data)
    except ValueError:
        raise DkrError(f"stored blob {digest} is not JSON") from None


def cmd_inspect(args) -> int:
    root = ImageRoot(args.image_root)
    info = _machine(root, args.local)
    out = {"machine": info,
           "manifest": _blob_json(root, info.get("manifest_digest")),
           "config": _blob_json(root, info.get("config_digest")),
           "nspawn": nspawn.read(root.path, args.local)}
    json.dump(out, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    return 0


# --- remove -------------------------------------------------------------------------------

def cmd_remove(args) -> int:
    root = ImageRoot(args.image_root)
    names = list(dict.fromkeys(args.locals))
    with ExitStack() as stack:
        # Every check first (names, records, backends, locks): an error leaves all in place.
        plan = [(local, *_machine_to_remove(root, local)) for local in names]
        for local in names:
            _machine_lock(root, local, stack)
        for local in names:       # systemd's locks: nothing runs in it, nothing starts
            stack.enter_context(ImageLock(root.machine_path(local), f"machine {local}", local))
        if any(_recover(root, local) for local in names):    # the record may say otherwise now
            plan = [(local, *_machine_to_remove(root, local)) for local in names]
        taken_down = _deactivate_all(root, plan)
        try:                  # (after the take-down: an overlay is mounted on its machine)
            for local, _, _ in plan:
                for tree in _trees_of(root, local):
                    refuse_mounts_in(tree)
        except DkrError:
            _reactivate(root, taken_down)
            raise
        for local, backend, _ in plan:
            _remove_machine(root, local, backend)
            log.info("Removed machine %s.", local)
    return 0


def _machine_to_remove(root: ImageRoot, local: str) -> tuple[StorageBackend, dict]:
    """A machine's backend and record. A record that cannot be read does not keep its
    machine (removing it is the way out): the backend is then told from the disk."""
    validate_existing_machine_name(local)
    try:
        info = _machine(root, local)
    except DkrError as e:
        if not (root.meta / "machines" / f"{local}.json").exists():
            raise                         # no such machine
        log.warning("%s; removing machine %s as found on disk.", e, local)
        return backend_on_disk(root.machine_path(local), root.path), {}
    return _backend(info.get("backend"), f"machine {local!r}"), info


def _deactivate_all(root: ImageRoot, plan: list) -> list:
    """Take every machine down, or none: a busy one puts the others back up.
    Returns those of ``plan`` that were up (mounted), to put back up if need be."""
    taken_down = []
    for local, backend, info in plan:
        was_up = is_mount_point(root.machine_path(local))
        try:
            with _wrap_os_error(f"cannot take machine {local} down"):
                backend.deactivate_machine(root.path, local, root.machine_path(local))
        except DkrError:
            _reactivate(root, taken_down)
            raise
        if was_up:
            taken_down.append((local, backend, info))
    return taken_down


def _reactivate(root: ImageRoot, taken_down: list) -> None:
    """Put machines that were taken down back up (a removal that cannot go on)."""
    for local, backend, info in reversed(taken_down):
        try:
            if info:          # (without a record, it was never ours to mount)
                backend.activate_machine(root.path, local, root.machine_path(local),
                                         root.machine_layers(info))
        except (DkrError, OSError) as e:
            log.warning("Could not mount %s again: %s", local, e)


def _trees_of(root: ImageRoot, local: str) -> list[Path]:
    """Machine ``local``'s tree and the temp trees crashed runs left of it."""
    machine = root.machine_path(local)
    return [*root.leftovers(f"{MACHINE_TMP_PREFIX}{local}"),
            *([machine] if os.path.lexists(machine) else [])]


def _remove_machine(root: ImageRoot, local: str, backend: StorageBackend) -> None:
    """Out of its name first, then deleted, as gc removes a layer: the tree goes to
    a temp name (a leftover that the next pull of LOCAL, a remove or gc deletes),
    then the record goes, then the tree's files. A kill leaves the whole machine,
    or a record with no tree (which names no machine; gc removes it), or a
    leftover; never a machine with files missing."""
    machine = root.machine_path(local)
    with _wrap_os_error(f"cannot remove machine {local}"):
        if os.path.lexists(machine):
            backend.withdraw(root.path, machine, root.machine_tmp(local))
        (root.meta / "machines" / f"{local}.json").unlink(missing_ok=True)
        remove_temps(root.meta / "machines", f"{local}.json")
        nspawn.remove(root.path, local)
        nspawn.remove_leftovers(root.path, local)
        for tree in _trees_of(root, local):
            remove_machine_entry(backend, root.path, local, tree)


# --- mount and umount -----------------------------------------------------------------------

def _selected(root: ImageRoot, args) -> list[tuple[str, dict | DkrError]]:
    """The machines named, or --all with the records that cannot be read too: --all
    must not pass over a machine in silence (a boot script would think it mounted)."""
    if args.all and args.locals:
        raise UsageError("give machine names or --all, not both")
    if args.all:
        return root.machine_records() if root.meta.is_dir() else []
    if not args.locals:
        raise UsageError("which machine? (give LOCAL or --all)")
    return [(local, _machine(root, local)) for local in dict.fromkeys(args.locals)]


def cmd_mount(args) -> int:
    root = ImageRoot(args.image_root)
    return _each_machine(root, args, _mount)


def _each_machine(root: ImageRoot, args, act) -> int:
    """``act(root, local, backend, info)`` on every chosen machine. One that fails
    does not stop the others: each failure is an error line, and the status 1."""
    chosen = _selected(root, args)
    failures = 0
    for local, info in chosen:
        try:
            if isinstance(info, DkrError):
                raise info
            act(root, local, _backend(info.get("backend"), f"machine {local!r}"), info)
        except DkrError as e:
            if len(chosen) == 1:
                raise
            print(one_line(f"dkr: error: {e}"), file=sys.stderr)
            failures += 1
    return 1 if failures else 0


def _recover(root: ImageRoot, local: str) -> bool:
    """Finish or take back a replacement of ``local`` that a killed pull left.
    True if there was one."""
    try:
        info = root.machine_info(local)
    except DkrError:
        return False
    if not info or "swap" not in info:
        return False
    with _wrap_os_error(f"machine {local}"):
        recover(root, local)
    return True


def _mount(root: ImageRoot, local: str, backend, info: dict) -> None:
    machine = root.machine_path(local)
    with ExitStack() as stack:
        _machine_lock(root, local, stack)
        if _recover(root, local):
            info = _machine(root, local)
            backend = _backend(info.get("backend"), f"machine {local!r}")
        if not machine.is_dir():
            raise DkrError(f"machine directory {machine} is missing")
        if info.get("swap_pending"):
            raise DkrError(f"machine {local} was being replaced by a pull that stopped, and "
                           "its record cannot say which image it holds: pull it again with "
                           "--force, or remove it")
        was = is_mount_point(machine)
        with _wrap_os_error(f"cannot mount machine {local}"):
            backend.activate_machine(root.path, local, machine, root.machine_layers(info))
        if was:
            log.info("Machine %s is already mounted.", local)
        elif is_mount_point(machine):
            log.info("Mounted machine %s.", local)
        else:
            log.info("Machine %s (backend %s) needs no mount.", local, backend.name)


def cmd_umount(args) -> int:
    root = ImageRoot(args.image_root)
    return _each_machine(root, args, _umount)


def _umount(root: ImageRoot, local: str, backend, info: dict) -> None:
    machine = root.machine_path(local)
    with ExitStack() as stack:
        _machine_lock(root, local, stack)
        was = is_mount_point(machine)
        with _wrap_os_error(f"cannot unmount machine {local}"):
            backend.deactivate_machine(root.path, local, machine)
        log.info("Unmounted machine %s." if was else "Machine %s is not mounted.", local)


# --- gc -------------------------------------------------------------------------------------

class _Collector:
    """Finds and removes what no machine needs, entry by entry under its lock."""

    def __init__(self, root: ImageRoot, dry_run: bool):
        self.root = root
        self.dry_run = dry_run
        self.freed = 0
        self.counts = {"layer": 0, "leftover": 0, "record": 0, "blob": 0,
                       "partial download": 0, "temporary file": 0, "settings file": 0}

    def layer_backend(self, key: str, path: Path) -> StorageBackend:
        """The backend its record names, else the one that says the entry is its own."""
        made_by = _layer_record(self.root, key).get("backend")
        return backends().get(made_by or "") or backend_on_disk(path, self.root.path)

    def needed_layers(self) -> set[str]:
        """Every layer a machine stands on; while a --force pull swaps a machine's
        trees (or crashed doing so), both trees' layers."""
        return {key for _, info in self.records()
                for key in info["layers"] + info.get("swap_layers", [])}

    def needed_blobs(self) -> set[str]:
        # Any digest a machine record mentions (manifest, config, whatever a protocol adds).
        return set(DIGEST_RE.findall(json.dumps([info for _, info in self.records()])))

    def records(self) -> list[tuple[str, dict]]:
        """Every machine and its record, each with its list of layers. A record gc
        cannot read stops it: that machine may need any layer (an overlay machine
        is mounted on them), and nothing says which."""
        found = []
        for path in sorted((self.root.meta / "machines").glob("*.json")):
            local = path.stem
            try:
                info = self.root.read_json(f"machines/{path.name}")
            except DkrError as e:
                problem = str(e)
            else:
                if info is None:
                    continue              # removed meanwhile
                if text_list(info.get("layers")) and text_list(info.get("swap_layers", [])):
                    found.append((local, info))
                    continue
                problem = f"{path} has no list of layers"
            raise DkrError(f"{problem}; gc cannot tell which layers machine {local!r} needs "
                           f"(mend the record, or 'dkr remove {local}')")
        return found

    def report(self, kind: str, name: str, size: int) -> None:
        self.counts[kind] += 1
        self.freed += size
        if self.dry_run:
            print(f"would remove {kind} {name} ({_human(size)})")
        else:
            log.info("Removed %s %s (%s).", kind, name, _human(size))

    # --- the sweeps --------------------------------------------------------------
    def run(self) -> None:
        if not self.dry_run:      # replacements killed half-way: then each tree is one machine's
            for local, info in self.root.machine_records():
                if isinstance(info, dict) and "swap" in info:
                    recover_if_idle(self.root, local)
        self.machines_gone()
        self.settings_gone()
        entries = sorted(os.listdir(self.root.path))
        needed = self.needed_layers()
        for name in entries:
            if (m := LAYER_RE.fullmatch(name)) and m.group(1) not in needed:
                self.layer(m.group(1))
        for name in entries:
            if m := LAYER_TMP_RE.fullmatch(name):
                self.leftover(name, f"layer-{m.group(1)}",
                              lambda path, key=m.group(1): self.layer_backend(key, path),
                              layer=m.group(1))
            elif m := MACHINE_TMP_RE.fullmatch(name):
                self.leftover(name, f"machine-{m.group(1)}",
                              lambda path: backend_on_disk(path, self.root.path),
                              machine=m.group(1))
            elif m := NSPAWN_TMP_RE.fullmatch(name):    # a machine's settings, half written
                with ExitStack() as stack:
                    if _try_flock_into(self.root, f"machine-{m.group(1)}", stack):
                        if not self.dry_run:
                            (self.root.path / name).unlink(missing_ok=True)
                        self.report("temporary file", name, 0)
        self.temporary_files()
        self.layer_records()
        self.blobs()
        self.partial_downloads()

    def machines_gone(self) -> None:
        """Records of machines whose tree is gone: a remove or a pull that was killed
        between taking the tree out of its name (or before putting it there) and
        removing the record. They name no machine; the layers stay unless unneeded."""
        for record in sorted((self.root.meta / "machines").glob("*.json")):
            machine = self.root.machine_path(record.stem)
            self._remove_orphan(f"machine-{record.stem}",
                                lambda: not os.path.lexists(machine) and record.exists(),
                                lambda: record.unlink(missing_ok=True),
                                "record", f"machines/{record.name}")

    def settings_gone(self) -> None:
        """LOCAL.nspawn files dkr wrote for a machine that is gone (tree and record: a
        pull or remove that was killed, or a tree taken away by hand)."""
        for path in sorted(self.root.path.glob("*.nspawn")):
            local = path.name.removesuffix(".nspawn")
            self._remove_orphan(f"machine-{local}", lambda: self._settings_orphaned(local),
                                lambda: nspawn.remove(self.root.path, local),
                                "settings file", path.name)

    def _settings_orphaned(self, local: str) -> bool:
        if os.path.lexists(self.root.machine_path(local)) or \
                (self.root.meta / "machines" / f"{local}.json").exists():
            return False
        return nspawn.is_ours(nspawn.read(self.root.path, local) or "")

    def _remove_orphan(self, lock: str, orphaned: Callable[[], bool],
                       remove: Callable[[], None], kind: str, name: str) -> None:
        """Remove what ``orphaned()`` says nothing has any more: under ``lock``, taken
        without waiting (a pull or remove at work on it keeps it), and asked again
        once it is held."""
        if not orphaned():
            return
        with ExitStack() as stack:
            if not _try_flock_into(self.root, lock, stack) or not orphaned():
                return
            if not self.dry_run:
                remove()
            self.report(kind, name, 0)

    def temporary_files(self) -> None:
        """Records and blobs that killed writers left half-written: each under the lock
        its writer holds while it writes (see dkr.store), so none of a live one."""
        for folder, lock in (("layers", lambda name: f"layer-{name.removesuffix('.json')}"),
                             ("machines", lambda name: f"machine-{name.removesuffix('.json')}"),
                             ("blobs/sha256", lambda name: f"blob-{name}")):
            directory = self.root.meta / folder
            if not directory.is_dir():
                continue
            for entry in sorted(os.listdir(directory)):
                if not (m := RECORD_TMP_RE.fullmatch(entry)):
                    continue
                with ExitStack() as stack:
                    if not _try_flock_into(self.root, lock(m.group(1)), stack):
                        continue              # being written right now
                    path = directory / entry
                    try:
                        size = path.stat().st_size
                    except FileNotFoundError:
                        continue
                    if not self.dry_run:
                        path.unlink(missing_ok=True)
                    self.report("temporary file", f"{folder}/{entry}", size)

    def layer(self, key: str) -> None:
        with ExitStack() as stack:
            # A pull holds keep-layer-KEY shared from before it looks for the layer
            # until its run ends; the build lock guards the layer's temp entries.
            if not (_try_flock_into(self.root, f"keep-layer-{key}", stack)
                    and _try_flock_into(self.root, f"layer-{key}", stack)):
                log.info("Layer %s is in use by a pull, keeping it.", key[:12])
                return
            path = self.root.layer_path(key)
            # A pull may have made a machine of it since the first look.
            if key in self.needed_layers() or not os.path.lexists(path):
                return
            try:            # (systemd-nspawn -D .dkr-KEY, say)
                stack.enter_context(ImageLock(path, f"layer {key[:12]}"))
            except ImageInUse as e:
                log.warning("%s; keeping it.", str(e).removesuffix(": stop it first"))
                return
            size = self._layer_size(key, path)
            if not self.dry_run:
                with _wrap_os_error(f"cannot remove layer {key[:12]}"):
                    # Out of the layer's name first: a removal that stops half-way
                    # (an error, a kill) leaves a leftover, never a layer with
                    # files missing that the next pull would take as it is.
                    backend, doomed = self.layer_backend(key, path), self.root.layer_tmp(key)
                    backend.withdraw(self.root.path, path, doomed)
                    remove_layer_entry(backend, self.root.path, key, doomed)
                    (self.root.meta / "layers" / f"{key}.json").unlink(missing_ok=True)
            self.report("layer", key[:12], size)

    def _in_a_swap(self, local: str, name: str) -> bool:
        """Is ``name`` a tree of a replacement that recovery could not end (it said why)?"""
        try:
            info = self.root.machine_info(local) or {}
        except DkrError:
            return False
        return isinstance(info.get("swap"), dict) and info["swap"].get("tree") == name

    def _layer_size(self, key: str, path: Path) -> int:
        # What the layer itself holds; a stacked layer's tree also counts its parents'.
        tar_bytes = _layer_record(self.root, key).get("tar_bytes")
        return tree_size(path) if tar_bytes is None else tar_bytes

    def leftover(self, name: str, lock: str, backend_of: Callable[[Path], StorageBackend],
                 machine: str | None = None, layer: str | None = None) -> None:
        with ExitStack() as stack:
            if not _try_flock_into(self.root, lock, stack):
                return                        # a pull is writing it right now
            path = self.root.path / name
            if not os.path.lexists(path) or (machine and self._in_a_swap(machine, name)):
                return
            size = tree_size(path)
            if not self.dry_run:
                with _wrap_os_error(f"cannot remove {name}"):
                    backend = backend_of(path)
                    if machine is not None:     # a new tree is up before its swap
                        backend.deactivate_machine(self.root.path, machine, path)
                        remove_machine_entry(backend, self.root.path, machine, path)
                    else:
                        remove_layer_entry(backend, self.root.path, layer, path)
            self.report("leftover", name, size)

    def layer_records(self) -> None:
        for record in sorted((self.root.meta / "layers").glob("*.json")):
            key = record.stem
            if not LAYER_RE.fullmatch(LAYER_PREFIX + key) or key in self.needed_layers():
                continue
            layer = self.root.layer_path(key)
            self._remove_orphan(f"layer-{key}",
                                lambda: not os.path.lexists(layer) and record.exists(),
                                lambda: record.unlink(missing_ok=True),
                                "record", f"layers/{record.name}")

    def blobs(self) -> None:
        needed = self.needed_blobs()
        for blob in sorted((self.root.meta / "blobs" / "sha256").glob("*")):
            if blob.name in needed or not re.fullmatch(r"[0-9a-f]{64}", blob.name):
                continue
            with ExitStack() as stack:
                # A pull holds keep-blob-HEX from before it stores the blob until
                # its run ends; one that ended has its machine's record name it.
                if not _try_flock_into(self.root, f"keep-blob-{blob.name}", stack) or \
                        blob.name in self.needed_blobs():
                    continue
                try:
                    size = blob.stat().st_size
                except FileNotFoundError:
                    continue
                if not self.dry_run:
                    blob.unlink(missing_ok=True)
                self.report("blob", blob.name[:12], size)


    def partial_downloads(self) -> None:
        """Spool files of interrupted downloads (a pull holds its own flock'ed)."""
        for spool in sorted((self.root.meta / "partial").glob("*")):
            try:
                fd = os.open(spool, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if not _same_file(fd, spool):
                    continue                  # deleted and made again meanwhile: not ours
            except OSError:
                continue                      # a download is writing it right now
            else:
                size = os.fstat(fd).st_size
                if not self.dry_run:
                    spool.unlink(missing_ok=True)
                self.report("partial download", spool.name[:12], size)
            finally:
                os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def cmd_gc(args) -> int:
    """Collect beside running pulls, each entry under its own locks:

    - a layer: ``keep-layer-KEY`` and ``layer-KEY``, both exclusive and never
      waited for. A pull holds ``keep-layer-KEY`` shared from before it looks
      whether KEY exists until its run ends (by then its machine's record names
      KEY), and ``layer-KEY`` while it builds KEY; gc looks at the records again
      once it holds both, so it never takes a layer a pull or a machine needs.
    - a manifest or config blob: ``keep-blob-HEX``, the same way.
    - a temporary entry: the lock its writer holds while writing (dkr.store).
    - a partial download: its own flock, which its download holds.
    - a machine record whose machine is gone: ``machine-LOCAL``.

    A pull waits for such a lock only while gc removes that one entry, and gc
    waits for none: no cycle. One gc at a time.
    """
    root = ImageRoot(args.image_root)
    if not root.meta.is_dir():
        log.info("Nothing to collect in %s.", root.path)
        return 0
    with _flock(root, "gc", f"{root.path} is busy: another dkr gc is running there"):
        collector = _Collector(root, args.dry_run)
        try:
            collector.run()
        except BrokenPipeError:
            raise                     # the reader of --dry-run's list went away
        except OSError as e:
            raise DkrError(f"gc in {root.path}: {e.strerror or e}") from None
    counts = ", ".join(f"{n} {kind}{'s' if n != 1 else ''}"
                       for kind, n in collector.counts.items() if n)
    verb = "Would free" if args.dry_run else "Freed"
    message = f"{verb} about {_human(collector.freed)} ({counts or 'nothing to remove'})."
    if args.dry_run:
        print(message)
    else:
        log.info("%s", message)
    return 0
