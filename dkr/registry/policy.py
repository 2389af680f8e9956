"""containers-policy.json(5): which images a host accepts, read as containers/image reads it.

The file is the host administrator's: it is read from the same places podman
and skopeo read it, and a file that cannot be understood refuses every pull
(with what is wrong and where), never falls back to accepting. Only the
``docker`` transport's scopes apply to dkr; other transports are checked for
form only, so that a policy shared with podman is accepted as podman accepts it.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from dkr.errors import DkrError
from dkr.registry.reference import DOCKER_HUB, DOCKER_HUB_ALIASES, Reference

SYSTEM_POLICY = Path("/etc/containers/policy.json")
POLICY_ENV = "DKR_SIGNATURE_POLICY"     # the default --signature-policy
MAX_POLICY_BYTES = 4 * 1024 * 1024


class PolicyError(DkrError):
    """A pull the host's trust policy does not allow, or a policy that cannot be used."""

    kind = "policy"


def user_policy_path() -> Path | None:
    home = os.environ.get("HOME")
    return Path(home, ".config/containers/policy.json") if home else None


def policy_path(explicit: str | os.PathLike | None = None) -> Path:
    """The policy file: the one named, else the user's if it exists, else the system's."""
    if explicit:
        return Path(explicit)
    if os.environ.get(POLICY_ENV):
        return Path(os.environ[POLICY_ENV])
    user = user_policy_path()
    if user is not None and user.exists():
        return user
    return SYSTEM_POLICY


# --- docker references as the policy sees them ------------------------------------------------

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_HOST = r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*|\[[0-9A-Fa-f:.]+\])(?::[0-9]+)?"
_HOST_RE = re.compile(_HOST)
_PATH_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG_RE = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST_RE = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]{32,}")


class Named(NamedTuple):
    """A docker reference in its full form: ``host/path[:tag][@digest]``."""

    name: str               # host/path, Docker Hub spelled docker.io/library/...
    tag: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        return self.name + (f":{self.tag}" if self.tag else "") + \
            (f"@{self.digest}" if self.digest else "")

    @property
    def name_only(self) -> bool:
        return self.tag is None and self.digest is None

    @property
    def host(self) -> str:
        return self.name.split("/", 1)[0]

    @property
    def path(self) -> str:
        return self.name.split("/", 1)[1]


def parse_named(text: object, *, normalize: bool = True) -> Named | None:
    """``text`` as a docker reference, or None. ``normalize``: Docker Hub's short forms
    (``busybox``, ``user/repo``) are allowed and expanded, as docker's
    ParseNormalizedNamed does; without it the reference must be written out in full."""
    if not isinstance(text, str) or not text or len(text) > 4096:
        return None
    rest, digest = text, None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not _DIGEST_RE.fullmatch(digest):
            return None
    tag = None
    colon, slash = rest.rfind(":"), rest.rfind("/")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1:]
        if not _TAG_RE.fullmatch(tag):
            return None
    first, sep, remainder = rest.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        host, path = first, remainder
        if not _HOST_RE.fullmatch(host):
            return None
    elif normalize:
        host, path = DOCKER_HUB, rest
    else:
        return None
    if normalize and host in DOCKER_HUB_ALIASES:
        host = DOCKER_HUB
    if host == DOCKER_HUB and "/" not in path:
        if not normalize:
            return None
        path = f"library/{path}"
    if not _PATH_RE.fullmatch(path) or len(host) + 1 + len(path) > 255:
        return None
    return Named(f"{host}/{path}", tag, digest)


def intended_reference(ref: Reference) -> Named:
    """The reference the user pulled, as the policy sees it."""
    host = DOCKER_HUB if ref.host in DOCKER_HUB_ALIASES else ref.host
    return Named(f"{host}/{ref.name}", ref.tag if not ref.digest else None, ref.digest)


def policy_identity(ref: Named) -> str:
    return str(ref)


def policy_namespaces(ref: Named) -> list[str]:
    """The scopes that may hold ``ref``, most specific first (after the full reference):
    the repository, each enclosing namespace, the host, then ``*.`` wildcards of
    the host's parent domains."""
    parts = ref.name.split("/")
    scopes = ["/".join(parts[:n]) for n in range(len(parts), 0, -1)]
    host = parts[0]
    if not host.startswith("["):
        host = host.split(":", 1)[0]
        while "." in host:
            host = host.split(".", 1)[1]
            scopes.append(f"*.{host}")
    return scopes


# --- signedIdentity ----------------------------------------------------------------------------

IDENTITY_TYPES = ("matchExact", "matchRepoDigestOrExact", "matchRepository",
                  "exactReference", "exactRepository", "remapIdentity")


@dataclass(frozen=True)
class Identity:
    type: str = "matchRepoDigestOrExact"
    reference: Named | None = None       # exactReference, exactRepository
    prefix: str = ""                     # remapIdentity
    signed_prefix: str = ""

    def describe(self) -> str:
        if self.type == "exactReference":
            return f"exactReference {self.reference}"
        if self.type == "exactRepository":
            return f"exactRepository {self.reference.name}"
        if self.type == "remapIdentity":
            return f"remapIdentity {self.prefix} -> {self.signed_prefix}"
        return self.type

    def matches(self, intended: Named, signed_text: str) -> bool:
        """Whether a signature that claims ``signed_text`` may stand for ``intended``."""
        signed = parse_named(signed_text)
        if signed is None:
            return False
        if self.type == "matchExact":
            return not intended.name_only and not signed.name_only and signed == intended
        if self.type == "matchRepoDigestOrExact":
            return _repo_digest_or_exact(intended, signed)
        if self.type == "matchRepository":
            return signed.name == intended.name
        if self.type == "exactReference":
            return not signed.name_only and signed == self.reference
        if self.type == "exactRepository":
            return signed.name == self.reference.name
        if self.type == "remapIdentity":
            remapped = self._remap(intended)
            return remapped is not None and _repo_digest_or_exact(remapped, signed)
        return False

    def _remap(self, ref: Named) -> Named | None:
        name = ref.name
        if not (name == self.prefix or name.startswith(self.prefix + "/")):
            return ref
        return parse_named(self.signed_prefix + str(ref)[len(self.prefix):], normalize=False)


def _repo_digest_or_exact(intended: Named, signed: Named) -> bool:
    if signed.name_only:
        return False
    if intended.tag is not None:
        return signed == intended
    if intended.digest is not None:
        # The signature's digest is checked against the manifest elsewhere; a
        # digest the user pinned is checked against the same manifest.
        return signed.name == intended.name
    return False


# --- requirements ------------------------------------------------------------------------------

@dataclass
class Requirement:
    type: str
    where: str                             # e.g. default[0], for messages
    key_type: str = ""
    key_paths: list[str] = field(default_factory=list)
    key_datas: list[bytes] = field(default_factory=list)
    identity: Identity = field(default_factory=Identity)

    def describe(self) -> str:
        if self.type in ("signedBy", "sigstoreSigned"):
            keys = ", ".join(self.key_paths) or f"{len(self.key_datas)} key(s) in keyData"
            return f"{self.type} ({keys}; signedIdentity {self.identity.describe()})"
        return self.type


_SIGNED_BY_KEYS = {"type", "keyType", "keyPath", "keyPaths", "keyData", "signedIdentity"}
_SIGSTORE_KEYS = {"type", "keyPath", "keyPaths", "keyData", "keyDatas", "fulcio",
                  "rekorPublicKeyPath", "rekorPublicKeyPaths", "rekorPublicKeyData",
                  "rekorPublicKeyDatas", "pki", "signedIdentity"}
_KEY_TYPES = ("GPGKeys", "signedByGPGKeys", "X509Certificates", "signedByX509CAs")


class Policy:
    def __init__(self, path: Path, default: list[Requirement],
                 docker: dict[str, list[Requirement]]):
        self.path = path
        self.default = default
        self.docker = docker

    def requirements_for(self, ref: Named) -> tuple[str, list[Requirement]]:
        """The winning scope's name (for messages) and its requirements."""
        for scope in [policy_identity(ref), *policy_namespaces(ref)]:
            if scope in self.docker:
                return f'transports.docker["{scope}"]', self.docker[scope]
        if "" in self.docker:
            return 'transports.docker[""]', self.docker[""]
        return "default", self.default


class _Bad(Exception):
    pass


def _no_duplicates(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise _Bad(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def load_policy(path: Path) -> Policy:
    """The policy in ``path``; a PolicyError naming the file and the problem otherwise."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_POLICY_BYTES + 1)
    except FileNotFoundError:
        raise PolicyError(f"trust policy {path} does not exist (a host without one "
                          "refuses every pull; --signature-policy FILE names another)") from None
    except OSError as e:
        raise PolicyError(f"trust policy {path}: cannot be read: {e.strerror or e}") from None
    if len(data) > MAX_POLICY_BYTES:
        raise PolicyError(f"trust policy {path}: larger than {MAX_POLICY_BYTES} bytes")
    try:
        try:
            doc = json.loads(data, object_pairs_hook=_no_duplicates)
        except (ValueError, UnicodeDecodeError) as e:
            raise _Bad(f"not valid JSON ({e})") from None
        return _parse_policy(path, doc)
    except _Bad as e:
        raise PolicyError(f"trust policy {path}: {e}") from None


def _parse_policy(path: Path, doc: object) -> Policy:
    if not isinstance(doc, dict):
        raise _Bad("not a JSON object")
    unknown = set(doc) - {"default", "transports"}
    if unknown:
        raise _Bad(f"unknown key {sorted(unknown)[0]!r}")
    if "default" not in doc:
        raise _Bad('no "default" requirements')
    default = _requirements(doc["default"], "default")
    docker: dict[str, list[Requirement]] = {}
    transports = doc.get("transports", {})
    if transports is None:
        transports = {}
    if not isinstance(transports, dict):
        raise _Bad('"transports" is not an object')
    for transport, scopes in transports.items():
        if scopes is None:
            continue
        if not isinstance(scopes, dict):
            raise _Bad(f'transports["{transport}"] is not an object')
        for scope, reqs in scopes.items():
            where = f'transports["{transport}"]["{scope}"]'
            _check_scope(transport, scope, where)
            parsed = _requirements(reqs, where)
            if transport == "docker":
                docker[scope] = parsed
    return Policy(path, default, docker)


# Transports whose scopes are file system paths (containers/image refuses others);
# the docker transport takes any string, and transports it does not know (ostree, in
# Debian's builds) are left alone.
_PATH_TRANSPORTS = ("dir", "oci", "oci-archive", "docker-archive", "sif")


def _check_scope(transport: str, scope: str, where: str) -> None:
    if not scope:
        return
    if transport in _PATH_TRANSPORTS:
        if not scope.startswith("/") or scope == "/":
            raise _Bad(f"{where}: a scope of the {transport} transport is an absolute path "
                       "other than /")
        if os.path.normpath(scope) != scope:
            raise _Bad(f"{where}: a scope of the {transport} transport is written "
                       f"{os.path.normpath(scope)}")
    elif transport == "containers-storage" and not (scope.startswith("[") and "]" in scope):
        raise _Bad(f"{where}: a containers-storage scope starts with [STORE]")


def _requirements(value: object, where: str) -> list[Requirement]:
    if not isinstance(value, list):
        raise _Bad(f"{where} is not a list of requirements")
    if not value:
        raise _Bad(f"{where} is an empty list of requirements")
    return [_requirement(item, f"{where}[{i}]") for i, item in enumerate(value)]


def _only(obj: dict, allowed: set[str], where: str) -> None:
    unknown = set(obj) - allowed
    if unknown:
        raise _Bad(f"{where}: unknown field {sorted(unknown)[0]!r}")


def _requirement(item: object, where: str) -> Requirement:
    if not isinstance(item, dict):
        raise _Bad(f"{where} is not an object")
    kind = item.get("type")
    if kind in ("insecureAcceptAnything", "reject"):
        _only(item, {"type"}, where)
        return Requirement(kind, where)
    if kind == "signedBy":
        _only(item, _SIGNED_BY_KEYS, where)
        key_type = item.get("keyType")
        if key_type not in _KEY_TYPES:
            raise _Bad(f"{where}: keyType {key_type!r} is not one of {', '.join(_KEY_TYPES)}")
        paths, datas = _keys(item, where, ("keyPath", "keyPaths", "keyData"))
        return Requirement(kind, where, key_type, paths, datas,
                           _identity(item.get("signedIdentity"), where))
    if kind == "sigstoreSigned":
        _only(item, _SIGSTORE_KEYS, where)
        for unsupported in ("fulcio", "pki", "rekorPublicKeyPath", "rekorPublicKeyPaths",
                            "rekorPublicKeyData", "rekorPublicKeyDatas"):
            if unsupported in item:
                raise _Bad(f"{where}: {unsupported} is not supported by dkr "
                           "(only keyPath, keyPaths, keyData, keyDatas)")
        paths, datas = _keys(item, where, ("keyPath", "keyPaths", "keyData", "keyDatas"))
        return Requirement(kind, where, "", paths, datas,
                           _identity(item.get("signedIdentity"), where))
    if kind == "signedBaseLayer":
        _only(item, {"type", "baseLayerIdentity"}, where)
        return Requirement(kind, where)
    if kind is None:
        raise _Bad(f"{where}: no requirement type")
    raise _Bad(f"{where}: unknown requirement type {kind!r}")


def _keys(item: dict, where: str, names: tuple[str, ...]) -> tuple[list[str], list[bytes]]:
    given = [n for n in names if n in item]
    if len(given) != 1:
        raise _Bad(f"{where}: exactly one of {', '.join(names)} must be given")
    name, value = given[0], item[given[0]]
    if name == "keyPath":
        if not isinstance(value, str) or not value:
            raise _Bad(f"{where}: keyPath is not a file name")
        return [value], []
    if name == "keyPaths":
        if not isinstance(value, list) or not value or \
                not all(isinstance(v, str) and v for v in value):
            raise _Bad(f"{where}: keyPaths is not a non-empty list of file names")
        return list(value), []
    values = [value] if name == "keyData" else value
    if not isinstance(values, list) or not values:
        raise _Bad(f"{where}: {name} is not a non-empty list")
    datas = []
    for v in values:
        if not isinstance(v, str):
            raise _Bad(f"{where}: {name} is not base64 text")
        try:
            datas.append(base64.b64decode(v, validate=True))
        except (binascii.Error, ValueError):
            raise _Bad(f"{where}: {name} is not valid base64") from None
    return [], datas


def _identity(value: object, where: str) -> Identity:
    where = f"{where}.signedIdentity"
    if value is None:
        return Identity()
    if not isinstance(value, dict):
        raise _Bad(f"{where} is not an object")
    kind = value.get("type")
    if kind in ("matchExact", "matchRepoDigestOrExact", "matchRepository"):
        _only(value, {"type"}, where)
        return Identity(kind)
    if kind == "exactReference":
        _only(value, {"type", "dockerReference"}, where)
        ref = parse_named(value.get("dockerReference"))
        if ref is None:
            raise _Bad(f"{where}: dockerReference {value.get('dockerReference')!r} is not "
                       "an image reference")
        if ref.name_only:
            raise _Bad(f"{where}: dockerReference {value['dockerReference']!r} has no tag "
                       "or digest")
        return Identity(kind, reference=ref)
    if kind == "exactRepository":
        _only(value, {"type", "dockerRepository"}, where)
        ref = parse_named(value.get("dockerRepository"))
        if ref is None:
            raise _Bad(f"{where}: dockerRepository {value.get('dockerRepository')!r} is "
                       "not a repository")
        return Identity(kind, reference=ref)
    if kind == "remapIdentity":
        _only(value, {"type", "prefix", "signedPrefix"}, where)
        prefix, signed = value.get("prefix"), value.get("signedPrefix")
        for name, v in (("prefix", prefix), ("signedPrefix", signed)):
            if not _valid_prefix(v):
                raise _Bad(f"{where}: {name} {v!r} is not host[:port][/namespace...] "
                           "written out in full")
        return Identity(kind, prefix=prefix, signed_prefix=signed)
    if kind is None:
        raise _Bad(f"{where}: no identity type")
    raise _Bad(f"{where}: unknown identity type {kind!r}")


def _valid_prefix(value: object) -> bool:
    if not isinstance(value, str) or not value:
        return False
    if _HOST_RE.fullmatch(value):
        return True
    ref = parse_named(value, normalize=False)
    return ref is not None and ref.name_only and str(ref) == value
