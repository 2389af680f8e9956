"""containers-registries.conf(5), version 2: where an image is pulled from.

Read as containers/image reads it, so that the files podman, skopeo, buildah
and CRI-O already use work unchanged for dkr:

- ``--registries-conf FILE`` or ``$CONTAINERS_REGISTRIES_CONF`` name the one
  file to read; otherwise ``$HOME/.config/containers/registries.conf`` if it
  exists, else ``/etc/containers/registries.conf``, each followed by the
  ``*.conf`` drop-ins of ``registries.conf.d`` beside it (in name order; for
  the system file the system's, then the user's drop-in directory).
- A drop-in replaces a ``[[registry]]`` of the same prefix, replaces
  ``unqualified-search-registries`` and ``short-name-mode`` where it sets
  them, and adds to (or overrides single entries of) ``[aliases]``.
- The version 1 tables (``[registries.search]``, ``.insecure``, ``.block``)
  are converted as containers/image converts them.

A reference's ``[[registry]]`` is the one with the longest matching prefix
(``*.example.com`` matches the hosts below example.com). Its pull sources are
its mirrors that the reference's kind allows (``mirror-by-digest-only``,
``pull-from-mirror``), in order, then the registry itself, each with the
matched prefix rewritten to its ``location``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import NamedTuple

from dkr.errors import ConfigError, DkrError, UsageError
from dkr.registry.reference import DOCKER_HUB, Reference, host_is_valid, parse_reference

SYSTEM_FILE = Path("/etc/containers/registries.conf")
USER_FILE = Path(".config/containers/registries.conf")     # below $HOME
# Where podman records the choices users made at its short-name prompt.
ALIAS_CACHE = Path("containers/short-name-aliases.conf")    # below /var/cache, ~/.cache
MAX_FILE = 1024 * 1024
SHORT_NAME_MODES = ("enforcing", "permissive", "disabled")
PULL_FROM_MIRROR = ("all", "digest-only", "tag-only")
# (compiled where a file has search registries, not on every start)
_DOMAIN = (r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.?)+(?::[0-9]+)?"
           r"|\[[0-9A-Fa-f:.]+\](?::[0-9]+)?")


class Endpoint(NamedTuple):
    location: str            # host[:port][/namespace], no scheme
    insecure: bool = False
    pull_from_mirror: str = ""


class RegistryEntry(NamedTuple):
    """One ``[[registry]]`` table. (NamedTuples, not dataclasses: those cost every
    start of dkr milliseconds to define.)"""

    prefix: str
    endpoint: Endpoint
    mirrors: list[Endpoint]
    blocked: bool = False
    mirror_by_digest_only: bool = False
    origin: str = ""


class PullSource(NamedTuple):
    """One place to fetch an image from: a mirror or the registry itself."""

    reference: Reference     # the image as this source names it (prefix rewritten)
    insecure: bool
    mirror: bool

    @property
    def label(self) -> str:
        return f"{self.reference.host} ({'mirror' if self.mirror else 'registry'})"


class RegistriesConf:
    """The merged configuration of all files read."""

    def __init__(self):
        self.registries: list[RegistryEntry] = []
        self.search: list[str] | None = None
        self.search_origin = ""
        self.aliases: dict[str, tuple[str, str]] = {}      # name: (value, origin)
        self.short_name_mode = ""
        self.files: list[str] = []
        self.alias_cache: Path | None = None
        self.recorded: dict[str, tuple[str, str]] = {}     # the alias cache's, first
        self._chosen: dict[str, str] = {}                   # prompted this run: text: value

    # --- lookup --------------------------------------------------------------------
    def find(self, name: str) -> RegistryEntry | None:
        """The entry whose prefix matches ``name`` (host/repository) longest."""
        best, length = None, 0
        for entry in self.registries:
            if _match(name, entry.prefix) >= 0 and len(entry.prefix) > length:
                best, length = entry, len(entry.prefix)
        return best

    def sources(self, ref: Reference) -> list[PullSource]:
        """Where to fetch ``ref`` from, in order: the mirrors, the registry last.
        A blocked registry is refused here, before anything is fetched."""
        full = f"{ref.host}/{ref.name}"
        entry = self.find(full)
        if entry is None:
            return [PullSource(ref, False, False)]
        if entry.blocked:
            raise DkrError(f"registry {entry.prefix} is blocked in {entry.origin}: "
                           f"not pulling {ref}", kind="policy")
        digested = ref.digest is not None
        endpoints: list[tuple[Endpoint, bool]] = []
        for mirror in entry.mirrors:
            if entry.mirror_by_digest_only or mirror.pull_from_mirror == "digest-only":
                if not digested:
                    continue
            elif mirror.pull_from_mirror == "tag-only" and digested:
                continue
            endpoints.append((mirror, True))
        endpoints.append((entry.endpoint, False))
        return [PullSource(_rewrite(ref, entry, endpoint), endpoint.insecure, is_mirror)
                for endpoint, is_mirror in endpoints]

    def insecure(self, host: str) -> bool:
        """Whether registries.conf marks ``host`` insecure, as a registry or a mirror."""
        entry = self.find(host)
        if entry is not None and entry.endpoint.insecure:
            return True
        return any(endpoint.insecure and endpoint.location.split("/", 1)[0] == host
                   for e in self.registries for endpoint in (e.endpoint, *e.mirrors))

    # --- short names ----------------------------------------------------------------
    def candidates(self, text: str, *, terminal: bool, choose=None) -> list[Reference]:
        """The references a user's ``text`` stands for, to try in order, as podman
        resolves short names. ``choose(candidates)`` asks the user on a terminal."""
        parsed = parse_reference(text)          # (says what is wrong with a bad one)
        if not is_short_name(text):
            return [parsed]
        repo, suffix = _split_short(text)
        for aliases in (self.recorded, self.aliases):
            if repo in aliases:
                value, _ = aliases[repo]
                if not value:                  # (an alias removed in the cache)
                    break
                return [parse_reference(value + suffix)]
        if not self.search:
            if not self.files:
                # No configuration at all: Docker's rule, as dkr always did.
                return [parsed]
            where = self.search_origin or ", ".join(self.files)
            raise UsageError(f"short name {text!r} did not resolve to an alias and no "
                           f"unqualified-search registries are defined in {where}")
        found = [parse_reference(f"{registry}/{text}") for registry in self.search]
        mode = self.short_name_mode or "permissive"
        if mode == "disabled" or len(found) == 1:
            return found
        if not terminal or choose is None:
            if mode == "permissive":
                return found
            raise UsageError(f"short name {text!r} is ambiguous and short-name-mode is enforcing "
                           "(there is no terminal to ask on): use one of "
                           f"{', '.join(str(r) for r in found)}")
        chosen = choose(found)
        self._chosen[text] = f"{chosen.host}/{chosen.name}"
        return [chosen]

    def record(self, text: str) -> None:
        """After a pull: keep what the user chose for ``text`` at the prompt where podman
        keeps it, so that neither asks again. Failing to is worth a warning only."""
        value = self._chosen.pop(text, None)
        if value is None or self.alias_cache is None:
            return
        import logging
        path = self.alias_cache
        try:
            try:
                old = path.read_text()
            except FileNotFoundError:
                old = ""
            if "[aliases]" not in old:
                old += "\n[aliases]\n" if old.strip() else "[aliases]\n"
            repo = _split_short(text)[0]
            head, _, tail = old.partition("[aliases]\n")
            text_out = f"{head}[aliases]\n  {_toml_string(repo)} = {_toml_string(value)}\n{tail}"
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text(text_out)
            os.replace(tmp, path)
        except OSError as e:
            logging.getLogger("dkr.registry").warning(
                "Could not record the alias %s = %s in %s: %s", repo, value, path, e.strerror)


def _toml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def alias_cache_path(home: Path | None = None) -> Path | None:
    """Where podman records short-name choices; None for a user with no home (a uid
    with no passwd entry and no $HOME, as in CI containers): then there is none."""
    if os.geteuid() == 0:
        return Path("/var/cache") / ALIAS_CACHE
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / ALIAS_CACHE
    if home is None:
        try:
            home = Path(os.environ.get("HOME") or Path.home())
        except RuntimeError:
            return None
    return home / ".cache" / ALIAS_CACHE


def is_short_name(text: str) -> bool:
    """Whether ``text`` names no registry: its first component is no host."""
    first, sep, _ = text.partition("/")
    if not sep:
        return True
    first = first.split("@", 1)[0]
    return not ("." in first or ":" in first or first == "localhost" or first.startswith("["))


def _split_short(text: str) -> tuple[str, str]:
    """A short name's repository and what followed it (``:tag``, ``@digest``)."""
    rest, at, digest = text.partition("@")
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        return rest[:colon], rest[colon:] + at + digest
    return rest, at + digest


def _match(ref: str, prefix: str) -> int:
    """The length of ``ref`` that ``prefix`` matches, or -1 (containers/image's rule)."""
    if prefix.startswith("*."):
        index = ref.find(prefix[1:])
        if index < 0 or "/" in ref[:index]:
            return -1
        index += len(prefix) - 1
        return index if index == len(ref) or ref[index] in ":/@" else -1
    if ref == prefix:
        return len(prefix)
    if ref.startswith(prefix) and ref[len(prefix)] in ":/@":
        return len(prefix)
    return -1


def _rewrite(ref: Reference, entry: RegistryEntry, endpoint: Endpoint) -> Reference:
    if not endpoint.location:            # a wildcard prefix's own registry
        return ref
    full = str(ref)
    length = _match(full, entry.prefix)
    text = endpoint.location + full[length:]
    try:
        rewritten = parse_reference(text)
    except DkrError as e:
        raise ConfigError(f"{entry.origin}: rewriting {ref} for {endpoint.location}: {e}") from None
    if rewritten.host == DOCKER_HUB and not text.startswith(("docker.io/", "index.docker.io/")):
        raise ConfigError(f"{entry.origin}: location {endpoint.location!r} names no registry host")
    return rewritten


# --- loading ----------------------------------------------------------------------------
def config_files(named: str | None = None, home: Path | None = None) -> list[Path]:
    """The files to read, in order (those that do not exist are passed over)."""
    named = named or os.environ.get("CONTAINERS_REGISTRIES_CONF")
    if named:
        return [Path(named)]
    if home is None:
        home = Path(os.environ["HOME"]) if os.environ.get("HOME") else None
    user_file = home / USER_FILE if home else None
    if user_file is not None and user_file.is_file():
        return [user_file, *_drop_ins(user_file.with_suffix(".conf.d"))]
    dirs = [SYSTEM_FILE.with_suffix(".conf.d")]
    if user_file is not None:
        dirs.append(user_file.with_suffix(".conf.d"))
    return [SYSTEM_FILE] + [f for d in dirs for f in _drop_ins(d)]


def _drop_ins(directory: Path) -> list[Path]:
    try:
        return sorted(p for p in directory.iterdir() if p.name.endswith(".conf") and
                      not p.is_dir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as e:
        raise ConfigError(f"cannot read {directory}: {e.strerror}") from None


def load(named: str | None = None, home: Path | None = None,
         alias_cache: Path | None = None) -> RegistriesConf:
    """The merged configuration. A file named explicitly must exist; the default
    ones may not. ``alias_cache``: podman's short-name-aliases.conf (default:
    where podman keeps it)."""
    conf = RegistriesConf()
    conf.alias_cache = alias_cache or alias_cache_path(home)
    document = conf.alias_cache and _read_toml(conf.alias_cache, missing_ok=True)
    for name, value in (document or {}).get("aliases", {}).items():
        conf.recorded[name] = (value and _alias(name, value, str(conf.alias_cache)),
                               str(conf.alias_cache))
    explicit = bool(named or os.environ.get("CONTAINERS_REGISTRIES_CONF"))
    for path in config_files(named, home):
        document = _read_toml(path, missing_ok=not explicit)
        if document is None:
            continue
        _merge(conf, parse_document(document, str(path)))
        conf.files.append(str(path))
    return conf


def _read_toml(path: Path, missing_ok: bool) -> dict | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if missing_ok:
            return None
        raise ConfigError(f"registries configuration {path} does not exist") from None
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    if len(data) > MAX_FILE:
        raise ConfigError(f"{path}: larger than {MAX_FILE // 1024} KiB")
    import tomllib                   # (only where there is a file to read)
    try:
        document = tomllib.loads(data.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    if not isinstance(document.get("aliases", {}), dict):
        raise ConfigError(f"{path}: [aliases] must be a table")
    return document


def _merge(conf: RegistriesConf, update: RegistriesConf) -> None:
    by_prefix = {entry.prefix: entry for entry in conf.registries}
    for entry in update.registries:
        by_prefix[entry.prefix] = entry
    conf.registries = [by_prefix[p] for p in sorted(by_prefix)]
    if update.search is not None:
        conf.search, conf.search_origin = update.search, update.search_origin
    if update.short_name_mode:
        conf.short_name_mode = update.short_name_mode
    conf.aliases.update(update.aliases)


def _fail(origin: str, message: str):
    raise ConfigError(f"{origin}: {message}")


def _string(value, origin: str, what: str) -> str:
    if not isinstance(value, str):
        _fail(origin, f"{what} must be a string")
    return value


def _bool(value, origin: str, what: str) -> bool:
    if not isinstance(value, bool):
        _fail(origin, f"{what} must be true or false")
    return value


def _location(value, origin: str, what: str) -> str:
    text = _string(value, origin, what).rstrip("/")
    if text.startswith(("http://", "https://")):
        _fail(origin, f"invalid {what} {value!r}: URI schemes are not supported")
    if text and not text.startswith("*.") and not host_is_valid(text.split("/", 1)[0]):
        _fail(origin, f"invalid {what} {value!r}: want HOST[:PORT][/NAMESPACE]")
    return text


def _string_list(value, origin: str, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        _fail(origin, f"{what} must be a list of strings")
    return value


def parse_document(doc: dict, origin: str) -> RegistriesConf:
    conf = RegistriesConf()
    v1 = doc.get("registries")
    if isinstance(v1, dict):
        if doc.get("registry") or doc.get("unqualified-search-registries") is not None:
            _fail(origin, "mixing the version 1 [registries.*] tables with version 2 "
                          "settings is not supported")
        doc = _from_v1(v1, origin)
    search = doc.get("unqualified-search-registries")
    if search is not None:
        conf.search = []
        for registry in _string_list(search, origin, "unqualified-search-registries"):
            registry = _location(registry, origin, "unqualified-search-registries entry")
            if not re.fullmatch(_DOMAIN, registry):
                _fail(origin, f"invalid unqualified-search-registries entry {registry!r}")
            conf.search.append(registry)
        conf.search_origin = origin
    mode = doc.get("short-name-mode", "")
    if mode:
        if mode not in SHORT_NAME_MODES:
            _fail(origin, f"short-name-mode must be one of {', '.join(SHORT_NAME_MODES)}, "
                          f"not {mode!r}")
        conf.short_name_mode = mode
    aliases = doc.get("aliases", {})
    if not isinstance(aliases, dict):
        _fail(origin, "[aliases] must be a table")
    for name, value in aliases.items():
        conf.aliases[name] = (_alias(name, value, origin), origin)
    entries = doc.get("registry", [])
    if not isinstance(entries, list):
        _fail(origin, "[[registry]] must be an array of tables")
    seen: dict[str, RegistryEntry] = {}
    for table in entries:
        entry = _entry(table, origin)
        key = entry.endpoint.location or entry.prefix
        other = seen.get(key)
        if other and (other.endpoint.insecure, other.blocked) != \
                (entry.endpoint.insecure, entry.blocked):
            _fail(origin, f"registry {key!r} is defined more than once with conflicting "
                          "'insecure' or 'blocked' settings")
        seen.setdefault(key, entry)
        # The first entry of a prefix wins, as in containers/image.
        if not any(e.prefix == entry.prefix for e in conf.registries):
            conf.registries.append(entry)
    conf.registries.sort(key=lambda e: e.prefix)
    return conf


def _alias(name, value, origin: str) -> str:
    if not is_short_name(name) or "@" in name or _split_short(name)[1]:
        _fail(origin, f"invalid short name {name!r} in [aliases]: no registry, tag or digest")
    value = _string(value, origin, f"alias {name!r}")
    if is_short_name(value) or "@" in value or _split_short(value)[1]:
        _fail(origin, f"invalid alias {name!r} = {value!r}: want REGISTRY/REPOSITORY, "
                      "without tag or digest")
    parse_reference(value)
    return value


def _entry(table, origin: str) -> RegistryEntry:
    if not isinstance(table, dict):
        _fail(origin, "[[registry]] must be a table")
    location = _location(table.get("location", ""), origin, "location")
    prefix = table.get("prefix", "")
    if prefix:
        prefix = _location(prefix, origin, "prefix")
        if prefix.startswith("*.") and any(c in prefix for c in "/@:"):
            _fail(origin, f"wildcard prefix {prefix!r} must look like *.example.com")
        if not prefix.startswith("*.") and not location:
            _fail(origin, f"[[registry]] with prefix {prefix!r} needs a location "
                          "(only a *.example.com prefix may go without)")
    elif not location:
        _fail(origin, "[[registry]] needs a location or a prefix")
    else:
        prefix = location
    if table.get("pull-from-mirror"):
        _fail(origin, f"pull-from-mirror must not be set for registry {prefix!r}, "
                      "only for its mirrors")
    digest_only = _bool(table.get("mirror-by-digest-only", False), origin,
                        "mirror-by-digest-only")
    mirrors = []
    for mirror in table.get("mirror", []):
        if not isinstance(mirror, dict):
            _fail(origin, f"[[registry.mirror]] of {prefix!r} must be a table")
        where = _location(mirror.get("location", ""), origin, "mirror location")
        if not where:
            _fail(origin, f"a mirror of {prefix!r} has no location")
        how = mirror.get("pull-from-mirror", "")
        if how and how not in PULL_FROM_MIRROR:
            _fail(origin, f"pull-from-mirror of mirror {where!r} must be one of "
                          f"{', '.join(PULL_FROM_MIRROR)}, not {how!r}")
        if how and digest_only:
            _fail(origin, f"registry {prefix!r} sets mirror-by-digest-only and mirror "
                          f"{where!r} pull-from-mirror: set one of them")
        mirrors.append(Endpoint(where, _bool(mirror.get("insecure", False), origin,
                                             "insecure"), how))
    return RegistryEntry(prefix, Endpoint(location, _bool(table.get("insecure", False), origin,
                                                         "insecure")),
                         mirrors, _bool(table.get("blocked", False), origin, "blocked"),
                         digest_only, origin)


def _from_v1(tables: dict, origin: str) -> dict:
    """Version 1 ``[registries.search|insecure|block]`` as the version 2 document."""
    def names(kind: str) -> list[str]:
        table = tables.get(kind, {})
        if not isinstance(table, dict):
            _fail(origin, f"[registries.{kind}] must be a table")
        return _string_list(table.get("registries", []), origin, f"registries.{kind}")

    doc: dict = {"registry": []}
    entries: dict[str, dict] = {}
    for kind in ("insecure", "block"):
        for name in names(kind):
            entry = entries.setdefault(name, {"location": name})
            entry["insecure" if kind == "insecure" else "blocked"] = True
    doc["registry"] = list(entries.values())
    if "search" in tables:
        doc["unqualified-search-registries"] = names("search")
    return doc
