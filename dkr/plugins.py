"""Loading plugins and finding storage backends."""

from __future__ import annotations

import functools
import importlib
import json
import os
import types
from pathlib import Path

import pluggy

from . import hookspecs
from .errors import DkrError
from .hookspecs import StorageBackend


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
            pm.register(importlib.import_module(module), name)
    else:
        pm.load_setuptools_entrypoints("dkr")
    return pm


def modules_for_children() -> dict[str, str]:
    """Environment for a child process that should load the same plugins, quickly."""
    pairs = [(name, plugin.__name__) for name, plugin in manager().list_name_plugin()
             if isinstance(plugin, types.ModuleType)]
    if len(pairs) != len(manager().list_name_plugin()):
        return {}                     # an entry point names an object: let the child scan
    return {MODULES_ENV: json.dumps(pairs)}


def backends() -> dict[str, StorageBackend]:
    found: dict[str, StorageBackend] = {}
    for provided in manager().hook.dkr_storage_backends():
        for backend in provided:
            if backend.name in found:
                raise DkrError(f"two plugins provide a storage backend named {backend.name!r}")
            found[backend.name] = backend
    return found


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
