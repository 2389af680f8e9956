"""Loading plugins and finding storage backends."""

from __future__ import annotations

import functools
from pathlib import Path

import pluggy

from . import hookspecs
from .errors import DkrError
from .hookspecs import StorageBackend


@functools.cache
def manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("dkr")
    pm.add_hookspecs(hookspecs)
    pm.load_setuptools_entrypoints("dkr")
    return pm


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
