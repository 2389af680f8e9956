"""Loading plugins and finding storage backends."""

from __future__ import annotations

import functools
import importlib
import json
import os
import sys
import types
from pathlib import Path

import pluggy

from dkr import hookspecs
from dkr.errors import DkrError
from dkr.hookspecs import StorageBackend

# Set by dkr for its extractor children: the plugin modules it found, as JSON
# [[name, module], ...], so that each child imports them instead of scanning
# every installed distribution's entry points again.
MODULES_ENV = "DKR_PLUGIN_MODULES"


@functools.cache
def manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("dkr")
    pm.add_hookspecs(hookspecs)
    handed_down = os.environ.get(MODULES_ENV)
    if handed_down:
        for name, module in json.loads(handed_down):
            pm.register(_load(name, module), name)
        return pm
    for name, target in entry_points("dkr"):
        if pm.get_plugin(name) is None and not pm.is_blocked(name):
            pm.register(_load(name, target), name)
    return pm


def entry_points(group: str) -> list[tuple[str, str]]:
    """``(name, "module[:attribute]")`` of every installed distribution's entry
    points in ``group``, in ``sys.path`` order.

    This reads the ``entry_points.txt`` files itself, as importlib.metadata
    would find them (``*.dist-info`` and ``*.egg-info`` directories): loading
    importlib.metadata and parsing every distribution's metadata cost each
    ``dkr`` command ~25 ms before its first request.
    """
    found = []
    for entry in sys.path:
        try:
            names = sorted(os.listdir(entry or "."))
        except OSError:               # gone, or a zip file
            continue
        for name in names:
            if name.endswith((".dist-info", ".egg-info")):
                found += _group_in(os.path.join(entry or ".", name, "entry_points.txt"), group)
    return found


def _group_in(path: str, group: str) -> list[tuple[str, str]]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    section, found = None, []
    for line in lines:
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
        elif section == group and "=" in line and not line.startswith(("#", ";")):
            name, _, target = line.partition("=")
            found.append((name.strip(), target.split("[", 1)[0].strip()))
    return found


def _load(name: str, target: str) -> object:
    """The object an entry point names; a plugin that fails to load is the user's
    to fix (or remove), so it gets an error line, not a traceback."""
    module, _, attribute = target.partition(":")
    try:
        plugin = importlib.import_module(module.strip())
        for part in filter(None, attribute.strip().split(".")):
            plugin = getattr(plugin, part)
    except Exception as e:  # noqa: BLE001 - whatever a broken plugin raises
        raise DkrError(f"plugin {name!r} ({target}) cannot be loaded: "
                       f"{type(e).__name__}: {e}") from None
    return plugin


def modules_for_children() -> dict[str, str]:
    """Environment for a child process that should load the same plugins, quickly."""
    pairs = [(name, plugin.__name__) for name, plugin in manager().list_name_plugin()
             if isinstance(plugin, types.ModuleType)]
    if len(pairs) != len(manager().list_name_plugin()):
        return {}                     # an entry point names an object: let the child scan
    return {MODULES_ENV: json.dumps(pairs)}


def backends() -> dict[str, StorageBackend]:
    """Every storage backend by name: ``dkr_storage_backends`` is asked once per
    process (again only if plugins are registered or unregistered meanwhile)."""
    pm = manager()
    registered = [(name, id(plugin)) for name, plugin in pm.list_name_plugin()]
    if _backends_of.get("plugins") != registered:
        found: dict[str, StorageBackend] = {}
        for provided in pm.hook.dkr_storage_backends():
            for backend in provided:
                if backend.name in found:
                    raise DkrError(f"two plugins provide a storage backend named {backend.name!r}")
                found[backend.name] = backend
        _backends_of.update(plugins=registered, backends=found)
    return dict(_backends_of["backends"])


_backends_of: dict = {}


def choose_backend(name: str, image_root: Path) -> tuple[StorageBackend, str]:
    """The backend to use and a sentence saying why it was chosen."""
    available = backends()
    if name != "auto":
        backend = available.get(name)
        if backend is None:
            raise DkrError(f"unknown backend {name!r} (have: {', '.join(sorted(available))})")
        reason = backend.unusable_reason(image_root)
        if reason:
            raise DkrError(f"backend {name} cannot be used on {image_root}: {reason}")
        return backend, f"backend {name} (as requested)"
    refused = []
    candidates = sorted((b for b in available.values() if b.auto_priority >= 0),
                        key=lambda b: -b.auto_priority)
    for backend in candidates:
        reason = backend.unusable_reason(image_root)
        if reason is None:
            order = ", ".join(b.name for b in candidates)
            why = "; ".join(refused) if refused else f"the first usable of {order}"
            return backend, f"backend {backend.name} (auto: {why})"
        refused.append(f"not {backend.name}: {reason}")
    raise DkrError(f"no storage backend can be used on {image_root}: {'; '.join(refused)}")


def backend_on_disk(path: Path, image_root: Path,
                    default: StorageBackend | None = None) -> StorageBackend:
    """The backend to take down and remove an entry that no record names a backend of:
    the one whose plugin says it made it (``dkr_tree_owner``), else ``default``, else
    the one ``--backend auto`` picks for the image root."""
    owner = manager().hook.dkr_tree_owner(image_root=image_root, path=path)
    found = backends().get(owner or "") or default
    if found is not None:
        return found
    return choose_backend("auto", image_root)[0]
