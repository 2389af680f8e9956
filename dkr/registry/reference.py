"""Names, tags, digests, v1 ids and machine names: parse and validate.

Everything a user or a server hands us that later becomes part of a URL or a
path passes through here first, so that a bad value fails early with a message
that says what was wrong.
"""

from __future__ import annotations

import re
from typing import NamedTuple
from urllib.parse import SplitResult, urlsplit

from dkr.errors import DkrError, UsageError


def split_url(url: str) -> SplitResult | None:
    """``url``'s parts, or None where urlsplit refuses it (an unclosed IPv6 bracket, say)."""
    try:
        return urlsplit(url)
    except ValueError:
        return None


DOCKER_HUB = "docker.io"
DOCKER_HUB_ALIASES = ("docker.io", "index.docker.io", "registry-1.docker.io")
DOCKER_HUB_ENDPOINT = "registry-1.docker.io"

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
# sha256 only: what registries use, and all dkr hashes with. (OCI also allows
# sha512; accepting it would only fail later, as content that does not match.)
_DIGEST_RE = re.compile(r"sha256:[a-f0-9]{64}")
_HOST_LABEL = r"(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9])"
_HOST_RE = re.compile(
    rf"(?:{_HOST_LABEL}(?:\.{_HOST_LABEL})*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{{1,5}})?"
)
_V1_ID_RE = re.compile(r"[a-f0-9]{1,128}")
# A new machine's name is a hostname, as systemd-nspawn --machine= and machinectl
# want it: dot-separated labels of letters, digits and '-', no label starting or
# ending with '-'. Older dkr also made labels with '_' or an outer '-': such
# machines are still listed, removed and mounted by their names.
_MACHINE_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_MACHINE_RE = re.compile(rf"{_MACHINE_LABEL}(?:\.{_MACHINE_LABEL})*")
_OLD_MACHINE_RE = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")
_NAME_MAX = 255
_MACHINE_MAX = 64


class Reference(NamedTuple):
    """A parsed image reference: where the image lives and which one it is.

    (The value types of a pull's start are NamedTuples, not frozen
    dataclasses: those cost ~2 ms each to define, on every start of dkr.)
    """

    host: str          # as the user wrote it (docker.io for Docker Hub)
    name: str          # repository path, e.g. library/debian
    tag: str | None    # None when pinned only by digest
    digest: str | None

    @property
    def endpoint(self) -> str:
        """The host:port that actually serves the v2 API."""
        return DOCKER_HUB_ENDPOINT if self.host in DOCKER_HUB_ALIASES else self.host

    @property
    def ref(self) -> str:
        """What goes after /manifests/: the digest if pinned, else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        s = f"{self.host}/{self.name}"
        if self.tag:
            s += f":{self.tag}"
        if self.digest:
            s += f"@{self.digest}"
        return s


def _looks_like_host(component: str) -> bool:
    return "." in component or ":" in component or component == "localhost" or component.startswith("[")


TRANSPORT_PREFIX = "docker://"      # as podman and skopeo name a registry's image


def without_transport(text: str) -> str:
    """``text`` without a leading ``docker://``."""
    return text[len(TRANSPORT_PREFIX):] if text.startswith(TRANSPORT_PREFIX) else text


def parse_reference(text: str) -> Reference:
    """Parse ``[docker://][HOST[:PORT]/]NAME[:TAG][@DIGEST]`` with Docker Hub defaults."""
    if not text or text != text.strip() or any(c.isspace() or ord(c) < 32 for c in text):
        raise UsageError(f"invalid reference {text!r}: empty or contains whitespace")
    rest, digest = without_transport(text), None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not _DIGEST_RE.fullmatch(digest):
            raise UsageError(f"invalid reference {text!r}: bad digest {digest!r} "
                           f"({_digest_hint(digest)})")
    host = DOCKER_HUB
    first, sep, remainder = rest.partition("/")
    if sep and _looks_like_host(first):
        if not host_is_valid(first):
            raise UsageError(f"invalid reference {text!r}: bad registry host {first!r}")
        host, rest = first, remainder
    tag = None
    last_slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > last_slash:
        rest, tag = rest[:colon], rest[colon + 1:]
        if not _TAG_RE.fullmatch(tag):
            raise UsageError(f"invalid reference {text!r}: bad tag {tag!r}")
    if host in DOCKER_HUB_ALIASES:
        host = DOCKER_HUB
        if "/" not in rest:
            rest = f"library/{rest}"
    if not rest or len(rest) > _NAME_MAX or not _NAME_RE.fullmatch(rest):
        raise UsageError(
            f"invalid reference {text!r}: bad repository name {rest!r} "
            "(lowercase letters, digits and . _ - separators, components joined by /)"
        )
    if tag is None and digest is None:
        tag = "latest"
    return Reference(host=host, name=rest, tag=tag, digest=digest)


def validate_digest(value: object, where: str) -> str:
    """A digest from a server, checked before it is ever used in a URL or path."""
    if not isinstance(value, str) or not _DIGEST_RE.fullmatch(value):
        hint = f" ({_digest_hint(value)})" if isinstance(value, str) else ""
        raise DkrError(f"{where}: invalid digest {value!r}{hint}")
    return value


def _digest_hint(digest: str) -> str:
    algorithm = digest.partition(":")[0]
    if algorithm in ("sha384", "sha512"):
        return f"{algorithm} digests are not supported, only sha256"
    return "want sha256:<64 hex>"


def digest_hex(digest: str) -> str:
    return digest.split(":", 1)[1]


def machine_name_is_valid(name: str) -> bool:
    """A name for a new machine: a hostname, as systemd's machine_name_is_valid()."""
    return 0 < len(name) <= _MACHINE_MAX and _MACHINE_RE.fullmatch(name) is not None


def validate_machine_name(name: str) -> str:
    """``name`` for a new machine, or a DkrError."""
    if not machine_name_is_valid(name):
        raise UsageError(
            f"invalid machine name {name!r}: want up to {_MACHINE_MAX} letters, digits and "
            "'-' in dot-separated labels, none starting or ending with '-' (a hostname)"
        )
    return name


def validate_existing_machine_name(name: str) -> str:
    """``name`` of a machine dkr may have made (older versions were less strict);
    anything else, and anything that is not a plain file name, is a DkrError."""
    older = 0 < len(name) <= _MACHINE_MAX and _OLD_MACHINE_RE.fullmatch(name) \
        and not name.startswith("-")        # (nor can it start with "." and be ".dkr-…")
    return name if older else validate_machine_name(name)


def default_machine_name(name: str) -> str:
    """LOCAL defaults to the last component of the repository name, '_' made '-'
    (which a repository name may hold and a hostname may not)."""
    return name.rsplit("/", 1)[-1].replace("_", "-")


def host_is_valid(host: str) -> bool:
    """hostname[:port] or [v6]:port, as a v1 X-Docker-Endpoints entry must be."""
    if not _HOST_RE.fullmatch(host):
        return False
    port = host.rpartition(":")[2] if not host.endswith("]") and ":" in host else ""
    return not port or 0 < int(port) <= 65535


def v1_id_is_valid(value: object) -> bool:
    return isinstance(value, str) and bool(_V1_ID_RE.fullmatch(value))


def v1_tag_is_valid(tag: str) -> bool:
    return bool(_TAG_RE.fullmatch(tag))


_V1_NAME_PART = re.compile(r"[A-Za-z0-9_.-]+")


def parse_v1_name(text: str) -> tuple[str, str]:
    """``NAMESPACE/REPO[:TAG]`` as the seed accepted it: both parts valid file names."""
    name, _, tag = text.partition(":")
    tag = tag or "latest"
    parts = name.split("/")
    if len(parts) != 2 or not all(
        _V1_NAME_PART.fullmatch(p) and p not in (".", "..") for p in parts
    ):
        raise UsageError(f"invalid v1 name {text!r}: want NAMESPACE/REPO[:TAG]")
    if not v1_tag_is_valid(tag):
        raise UsageError(f"invalid v1 tag {tag!r} in {text!r}")
    return name, tag
