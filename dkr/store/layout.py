"""The image root on disk: where layers, machines, metadata and locks live.

    IMAGE_ROOT/.dkr-<key>                  a finished, read-only layer
    IMAGE_ROOT/.dkr-<key>.tmp-<rand>       a layer being written
    IMAGE_ROOT/.dkr-local-<LOCAL>.tmp-<rand>  a machine being made
    IMAGE_ROOT/LOCAL                       a machine
    IMAGE_ROOT/.dkr/layers/<key>.json      what a layer is (digests, parent, backend)
    IMAGE_ROOT/.dkr/machines/<LOCAL>.json  where a machine came from
    IMAGE_ROOT/.dkr/blobs/sha256/<hex>     manifests and configs, as fetched
    IMAGE_ROOT/.dkr/locks/                 flock(2) files

Anything becomes visible only in one final step (a rename() of records and
blobs here; the backend's commit of a layer or machine, which is a rename()
for dkr's own backends), so a crash leaves at most ``.tmp-`` entries. Every temporary entry belongs to one lock, which
its writer holds from before it creates the entry until the entry is
renamed into place or removed:

    .dkr-<key>.tmp-<rand>, .dkr/layers/.<key>.json.tmp-<rand>   layer-<key>.lock
    .dkr-local-<LOCAL>.tmp-<rand>, .dkr/machines/.<LOCAL>.json.tmp-<rand>
                                                                machine-<LOCAL>.lock
    .dkr/blobs/sha256/.<hex>.tmp-<rand>                         blob-<hex>.lock
    .dkr/partial/<hex>[.<pid>]        the spool file's own flock (kept for resume)

So whoever takes that lock knows that no live process writes the lock's
temporary entries, and removes them (the next pull of that layer, machine or
blob, and gc); the temporary entries of another lock are never its to touch.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from dkr.errors import DkrError
from dkr.fsinfo import mounts_below
from dkr.registry.reference import digest_hex

log = logging.getLogger("dkr.store")

LAYER_PREFIX = ".dkr-"
MACHINE_TMP_PREFIX = ".dkr-local-"


def remove_layer_entry(backend, image_root: Path, key: str, path: Path) -> None:
    """Remove layer ``key``'s entry at ``path`` with its backend's ``remove_layer``
    (not while anything is mounted in it: see remove_machine_entry)."""
    refuse_mounts_in(path)
    backend.remove_layer(image_root, key, path)


def remove_machine_entry(backend, image_root: Path, local: str, path: Path) -> None:
    """Remove a tree of machine ``local`` (taken down already) with its backend's
    ``remove_machine``.

    Not while anything is mounted in it (a bind mount of the host's /dev, of a
    data directory): removing a tree goes on into its mounts, and what is
    mounted there is not the machine's to lose.
    """
    refuse_mounts_in(path)
    backend.remove_machine(image_root, local, path)


def refuse_mounts_in(path: Path) -> None:
    """A DkrError, naming the mount, if anything is mounted at or below ``path``."""
    inside = mounts_below(path)
    if inside:
        raise DkrError(f"{path} has a file system mounted in it ({inside[0]}): "
                       "unmount it first")


TMP_SUFFIX_LENGTH = 8      # hex digits after ".tmp-"


def _tmp_suffix() -> str:
    return secrets.token_hex(TMP_SUFFIX_LENGTH // 2)


def _is_tmp_suffix(text: str) -> bool:
    return len(text) == TMP_SUFFIX_LENGTH and all(c in "0123456789abcdef" for c in text)


def temp_name(name: str) -> str:
    """The name a record or blob ``name`` is written under before its rename."""
    return f".{name}.tmp-{_tmp_suffix()}"


def temps_of(directory: Path, name: str) -> list[Path]:
    """The temporary entries of record or blob ``name`` in ``directory``."""
    start = f".{name}.tmp-"
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(directory / entry for entry in names
                  if entry.startswith(start) and _is_tmp_suffix(entry[len(start):]))


def remove_temps(directory: Path, name: str) -> list[Path]:
    """Remove what killed writers left of record or blob ``name``; the caller holds
    its lock (see the module's docstring). Returns what was removed."""
    gone = []
    for tmp in temps_of(directory, name):
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            continue
        gone.append(tmp)
    return gone


def _text(value) -> bool:
    return isinstance(value, str)


def text_list(value) -> bool:
    """A list of strings (a record's layers)."""
    return isinstance(value, list) and all(map(_text, value))


def _digest(value) -> bool:
    return isinstance(value, str) and ":" in value


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


_LAYER_FIELDS = {"backend": _text, "tar_bytes": _count}
_MACHINE_FIELDS = {
    "local": _text, "backend": _text, "reference": _text, "created": _text,
    "manifest_digest": _digest, "config_digest": _digest, "index_digest": _digest,
    "layers": text_list,
    # While a --force pull swaps trees: the other tree's layers, and the journal (dkr.store.swap).
    "swap_layers": text_list,
    "swap": lambda value: isinstance(value, dict),
    "swap_pending": lambda value: value is True,      # written by dkr before the journal
}


class ImageRoot:
    def __init__(self, path: Path | str):
        # Absolute: backends may change directory (an overlay mount does) and
        # must still find every layer.
        self.path = Path(os.path.abspath(path))
        self.meta = self.path / ".dkr"

    def prepare(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            for sub in ("layers", "machines", "blobs/sha256", "locks"):
                (self.meta / sub).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DkrError(f"cannot use image root {self.path}: {e.strerror}") from None
        if not os.access(self.path, os.W_OK):
            raise DkrError(f"image root {self.path} is not writable")

    # --- names -------------------------------------------------------------
    def layer_path(self, key: str) -> Path:
        """``key``: a v2 chain id's hex, or a v1 image id."""
        return self.path / f"{LAYER_PREFIX}{key}"

    def layer_tmp(self, key: str) -> Path:
        return self.path / f"{LAYER_PREFIX}{key}.tmp-{_tmp_suffix()}"

    def machine_path(self, local: str) -> Path:
        return self.path / local

    def machine_tmp(self, local: str) -> Path:
        return self.path / f"{MACHINE_TMP_PREFIX}{local}.tmp-{_tmp_suffix()}"

    def leftovers(self, prefix: str) -> list[Path]:
        """Temp entries a crashed run left for one layer or machine."""
        # Not Path.glob: it compiles a pattern per prefix, ~1 ms each, per layer.
        # Exactly the random part after ".tmp-": machine "web.tmp-1" has temp
        # entries that start with those of machine "web".
        start = f"{prefix}.tmp-"
        return sorted(self.path / name for name in os.listdir(self.path)
                      if name.startswith(start) and _is_tmp_suffix(name[len(start):]))

    # --- metadata ----------------------------------------------------------
    def write_json(self, relative: str, value: object) -> None:
        self.write_bytes(relative, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())

    def write_bytes(self, relative: str, data: bytes) -> None:
        """Replace ``.dkr/relative`` with ``data`` at once, durably."""
        target = self.meta / relative
        tmp = target.with_name(temp_name(target.name))
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, target)
        except BaseException:
            try:
                os.unlink(tmp)          # a full disk, say: leave no half record behind
            except FileNotFoundError:
                pass
            raise

    def read_json(self, relative: str) -> dict | None:
        try:
            with open(self.meta / relative) as f:
                value = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise DkrError(f"unreadable metadata {self.meta / relative}: {e}") from None
        if not isinstance(value, dict):
            raise DkrError(f"unreadable metadata {self.meta / relative}: not a JSON object")
        return value

    def save_blob(self, digest: str, data: bytes) -> None:
        """Store a manifest or config blob, under its lock (which also lets this
        remove what a killed writer left of it)."""
        path = self.meta / "blobs" / "sha256" / digest_hex(digest)
        with self.locked(f"blob-{path.name}"):
            remove_temps(path.parent, path.name)
            if not path.exists():
                self.write_bytes(f"blobs/sha256/{path.name}", data)

    @contextmanager
    def locked(self, name: str) -> Iterator[None]:
        """Hold ``.dkr/locks/<name>.lock`` (waiting for it): only for locks held for
        a moment, never while waiting for another."""
        fd = os.open(self.meta / "locks" / f"{name}.lock",
                     os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def read_blob(self, digest: str) -> bytes | None:
        try:
            return (self.meta / "blobs" / "sha256" / digest_hex(digest)).read_bytes()
        except FileNotFoundError:
            return None

    def layer_info(self, key: str) -> dict | None:
        return self._record(f"layers/{key}.json", _LAYER_FIELDS)

    def machine_info(self, local: str) -> dict | None:
        return self._record(f"machines/{local}.json", _MACHINE_FIELDS)

    def _record(self, relative: str, fields: dict) -> dict | None:
        """A layer's or machine's record, without fields of a type the commands cannot
        use (a hand-edited record): those are left out, and the log says so."""
        info = self.read_json(relative)
        for name, fits in fields.items():
            if info is not None and name in info and not fits(info[name]):
                log.warning("%s: ignoring its %s %s.", self.meta / relative, name,
                            json.dumps(info.pop(name))[:60])
        return info

    def machine_layers(self, info: dict) -> list[Path]:
        """The layers a machine record names, base first."""
        return [self.layer_path(key) for key in info.get("layers", [])]

    def machine_records(self) -> list[tuple[str, dict | DkrError]]:
        """Every machine that has a record, and the record, or why it cannot be read."""
        found = []
        for path in sorted((self.meta / "machines").glob("*.json")):
            try:
                info = self._record(f"machines/{path.name}", _MACHINE_FIELDS)
            except DkrError as e:
                found.append((path.stem, e))
                continue
            if info is not None:
                found.append((path.stem, info))
        return found

    def machines(self) -> list[dict]:
        found = []
        for _, info in self.machine_records():
            if isinstance(info, DkrError):   # one broken record must not hide the others
                log.warning("%s; skipped.", info)
            elif info:
                found.append(info)
        return found
