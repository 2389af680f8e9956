"""containers-registries.d(5): where a registry's image signatures are kept.

Every ``*.yaml`` file of the directories is read and merged, as containers/image
does: one ``default-docker`` entry and per-scope ``docker`` entries, the most
specific scope that says something winning. A scope (or ``default-docker``)
given in two files is an error, not a choice between them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from dkr.registry.policy import Named, PolicyError, policy_identity, policy_namespaces

SYSTEM_DIR = Path("/etc/containers/registries.d")
DIRS_ENV = "DKR_REGISTRIES_D"        # the default --registries.d
# Where containers/image looks for root when no entry names a lookaside store.
BUILTIN_LOOKASIDE = "file:///var/lib/containers/sigstore"
MAX_FILE_BYTES = 4 * 1024 * 1024


def default_dirs(explicit: str | os.PathLike | None = None) -> list[Path]:
    """The directory to read: the one named, else the user's if it exists (it then
    stands for the system's, as in containers/image), else the system's."""
    if explicit:
        return [Path(explicit)]
    if os.environ.get(DIRS_ENV):
        return [Path(os.environ[DIRS_ENV])]
    home = os.environ.get("HOME")
    if home and Path(home, ".config/containers/registries.d").exists():
        return [Path(home, ".config/containers/registries.d")]
    return [SYSTEM_DIR]


def builtin_lookaside() -> str:
    """Where signatures are looked for when no entry names a lookaside store."""
    if os.geteuid() != 0 and os.environ.get("HOME"):
        return Path(os.environ["HOME"], ".local/share/containers/sigstore").as_uri()
    return BUILTIN_LOOKASIDE


@dataclass
class _Entry:
    source: str                    # file and key, for messages
    lookaside: str | None = None
    use_sigstore_attachments: bool | None = None


class RegistriesD:
    def __init__(self, default: _Entry | None, docker: dict[str, _Entry]):
        self.default = default
        self.docker = docker

    def _entries(self, ref: Named) -> list[_Entry]:
        found = [self.docker[s] for s in [policy_identity(ref), *policy_namespaces(ref)]
                 if s in self.docker]
        return found + ([self.default] if self.default else [])

    def lookaside(self, ref: Named) -> str:
        """The base URL of ``ref``'s simple signatures (http, https or file)."""
        for entry in self._entries(ref):
            if entry.lookaside:
                return entry.lookaside
        return builtin_lookaside()

    def use_sigstore_attachments(self, ref: Named) -> bool:
        for entry in self._entries(ref):
            if entry.use_sigstore_attachments is not None:
                return entry.use_sigstore_attachments
        return False


def load_registries_d(dirs: list[Path]) -> RegistriesD:
    default: _Entry | None = None
    docker: dict[str, _Entry] = {}
    for directory in dirs:
        try:
            names = sorted(n for n in os.listdir(directory) if n.endswith(".yaml"))
        except FileNotFoundError:
            continue
        except OSError as e:
            raise PolicyError(f"registries.d {directory}: cannot be read: "
                              f"{e.strerror or e}") from None
        for name in names:
            path = directory / name
            if not path.is_file():
                continue
            import yaml          # (only where there is a file: it costs each start-up)
            try:
                with open(path, "rb") as f:
                    text = f.read(MAX_FILE_BYTES + 1)
                if len(text) > MAX_FILE_BYTES:
                    raise PolicyError(f"registries.d file {path}: larger than "
                                      f"{MAX_FILE_BYTES} bytes")
                doc = yaml.safe_load(text)
            except OSError as e:
                raise PolicyError(f"registries.d file {path}: cannot be read: "
                                  f"{e.strerror or e}") from None
            except yaml.YAMLError as e:
                problem = " ".join(str(e).split())
                raise PolicyError(f"registries.d file {path}: not valid YAML ({problem})") \
                    from None
            if doc is None:
                continue
            if not isinstance(doc, dict):
                raise PolicyError(f"registries.d file {path}: not a mapping")
            if doc.get("default-docker") is not None:
                if default is not None:
                    raise PolicyError(f"registries.d: default-docker is given both in "
                                      f"{default.source} and in {path}")
                default = _entry(doc["default-docker"], str(path), "default-docker")
            scopes = doc.get("docker") or {}
            if not isinstance(scopes, dict):
                raise PolicyError(f"registries.d file {path}: docker is not a mapping")
            for scope, value in scopes.items():
                scope = str(scope)
                if scope in docker:
                    raise PolicyError(f"registries.d: docker scope {scope!r} is given both "
                                      f"in {docker[scope].source} and in {path}")
                docker[scope] = _entry(value, str(path), f"docker[{scope!r}]")
    return RegistriesD(default, docker)


def _entry(value: object, source: str, key: str) -> _Entry:
    where = f"registries.d file {source}: {key}"
    if value is None:
        return _Entry(source)
    if not isinstance(value, dict):
        raise PolicyError(f"{where} is not a mapping")
    # lookaside is the newer name of sigstore; a file that gives both means lookaside.
    base = value.get("lookaside") or value.get("sigstore")
    if base is not None:
        if not isinstance(base, str) or base.split(":", 1)[0] not in ("http", "https", "file") \
                or "://" not in base:
            raise PolicyError(f"{where}: lookaside {base!r} is not an http, https or file URL")
        base = base.rstrip("/")
    attachments = value.get("use-sigstore-attachments")
    if attachments is not None and not isinstance(attachments, bool):
        raise PolicyError(f"{where}: use-sigstore-attachments is not true or false")
    return _Entry(source, base or None, attachments)
