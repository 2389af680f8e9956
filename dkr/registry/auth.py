"""Registry credentials and the 401 challenge dance (Basic and Bearer tokens).

Credentials come from ``--creds USER:PASS`` or, failing that, from where
``podman login`` and ``docker login`` leave them (``keychain``). Bearer tokens
are cached per scope until shortly before ``expires_in`` runs out. Tokens and
passwords are never logged.
"""

from __future__ import annotations

import base64
import json
import re
import time
from pathlib import Path
from typing import Awaitable, Callable, NamedTuple, Protocol
from urllib.parse import urlencode

from dkr.errors import AuthError, UsageError
from dkr.registry.reference import split_url

DEFAULT_TOKEN_LIFETIME = 60
REFRESH_MARGIN = 10


class Credentials(NamedTuple):
    username: str
    password: str

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Authorization: Basic " + base64.b64encode(raw).decode()


# The auth files (``keychain``) this process could not read, and why. A pull from a
# registry that lets anyone in needs none of them, and only warns; one that is
# asked for a login says which files it could not read.
unreadable: dict[Path, str] = {}


def login_hint(registry: str) -> str:
    """What to do when a registry wants a login and dkr has no credentials for it."""
    return (f"no credentials for it: log in with 'dkr login {registry}' (or 'podman login', "
            "'docker login': dkr reads their files), or give --creds USER:PASS"
            + "".join(f"; cannot read credentials from {path}: {why}"
                      for path, why in unreadable.items()))


def parse_creds(text: str) -> Credentials:
    user, sep, password = text.partition(":")
    if not sep or not user:
        raise UsageError("invalid --creds: want USER:PASS")
    return Credentials(user, password)


_PARAM_RE = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))\s*,?')


_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
# A parameter (name=value) or, where no "=" follows the token, a scheme starting a
# challenge, perhaps with a token68 (Negotiate's base64) after it.
_CHALLENGE_ITEM_RE = re.compile(
    rf'[\s,]*(?:{_TOKEN}\s*=\s*(?:"(?:[^"\\]|\\.)*"|[^,\s]*)'
    rf'|(?P<scheme>{_TOKEN})(?:[ \t]+[A-Za-z0-9._~+/-]+=*(?=\s*(?:,|$)))?)')


def split_challenges(value: str) -> list[str]:
    """The challenges in one WWW-Authenticate value, which may hold several
    (RFC 7235): ``Bearer realm="a",service="b", Basic realm="c"`` → the two.
    What cannot be read is passed over up to the next comma."""
    starts, pos = [], 0
    while pos < len(value):
        m = _CHALLENGE_ITEM_RE.match(value, pos)
        if not m or m.end() == pos:
            comma = value.find(",", pos)
            if comma < 0:
                break
            pos = comma + 1
            continue
        if m.group("scheme"):
            starts.append(m.start("scheme"))
        pos = m.end()
    return [value[start:end].strip().rstrip(",").rstrip()
            for start, end in zip(starts, starts[1:] + [len(value)])]


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="…",service="…",scope="…"`` → ("bearer", {...})."""
    scheme, _, rest = header.strip().replace("\t", " ").partition(" ")
    params: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        m = _PARAM_RE.match(rest, pos)
        if not m or m.end() == pos:
            break
        value = m.group(2) if m.group(2) is not None else m.group(3)
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
        pos = m.end()
    return scheme.lower(), params


Fetch = Callable[[str, list[str], str], Awaitable[tuple[int, bytes]]]


class RequestAuth(Protocol):
    """What a RegistryClient needs of an authentication scheme."""

    async def headers(self, scope: str) -> list[str]:
        """Headers for a request within ``scope`` (sent to the registry's own origin only)."""

    async def answer(self, challenge_header: str | None, scope: str) -> None:
        """A request got 401: get what the challenge asks for, or raise DkrError."""

    def refusal(self, scope: str) -> str:
        """The error message when the answered challenge still ends in 401."""


class Authenticator:
    """Answers a registry's challenges and hands out the header for each request."""

    def __init__(self, registry: str, credentials: Credentials | None, fetch: Fetch,
                 insecure: bool = False):
        self.registry = registry
        self.credentials = credentials
        self.fetch = fetch                      # GET url with headers → (status, body)
        self.insecure = insecure                # a token realm may be plain http
        self._scheme: str | None = None
        self._challenge: dict[str, str] = {}
        self._tokens: dict[str, tuple[str, float]] = {}

    async def headers(self, scope: str) -> list[str]:
        if self._scheme == "basic":
            return [self._require_credentials().basic_header()]
        if self._scheme == "bearer":
            token, expires = self._tokens.get(scope, ("", 0.0))
            if time.monotonic() >= expires:
                token = await self._fetch_token(scope)
            return [f"Authorization: Bearer {token}"]
        return []

    async def answer(self, challenge_header: str | None, scope: str) -> None:
        """A request got 401: learn the scheme and get what it asks for."""
        if not challenge_header:
            raise AuthError(f"{self.registry}: 401 Unauthorized without a WWW-Authenticate "
                            "challenge")
        scheme, params = parse_challenge(challenge_header)
        if scheme not in ("basic", "bearer"):
            raise AuthError(f"{self.registry}: unsupported authentication scheme {scheme!r}")
        if scheme == "basic":
            self._require_credentials()
        self._scheme, self._challenge = scheme, params
        self._tokens.pop(scope, None)
        if scheme == "bearer":
            await self._fetch_token(scope)

    def refusal(self, scope: str) -> str:
        """Why a request that carried our answer to the challenge still got 401."""
        who = f"credentials for {self.credentials.username!r}" if self.credentials else \
            "anonymous access"
        what = "the token" if self._scheme == "bearer" else who
        hint = "" if self.credentials else f": {login_hint(self.registry)}"
        return f"{self.registry}: {what} refused for {scope} (401){hint}"

    def _require_credentials(self) -> Credentials:
        if self.credentials is None:
            raise AuthError(f"{self.registry} requires a login: {login_hint(self.registry)}")
        return self.credentials

    async def _fetch_token(self, scope: str) -> str:
        realm = self._challenge.get("realm", "")
        parts = split_url(realm)
        if parts is None or parts.scheme not in ("http", "https"):
            raise AuthError(f"{self.registry}: token realm {realm!r} is not an http(s) URL")
        if parts.scheme == "http" and not self.insecure:
            raise AuthError(f"{self.registry}: refusing to ask {parts.netloc} for a "
                           "token over plain http (use --insecure to allow it)")
        query = {"scope": scope}
        if "service" in self._challenge:
            query["service"] = self._challenge["service"]
        headers = [self.credentials.basic_header()] if self.credentials else []
        joiner = "&" if parts.query else "?"
        status, body = await self.fetch(f"{realm}{joiner}{urlencode(query)}", headers,
                                        f"{self.registry}: token server {parts.netloc}")
        if status == 401:
            raise AuthError(f"{self.registry}: token server {parts.netloc} refused "
                           + ("the credentials" if self.credentials else
                              f"anonymous access: {login_hint(self.registry)}"))
        if status != 200:
            raise AuthError(f"{self.registry}: token server {parts.netloc} answered {status}")
        try:
            answer = json.loads(body)
            token = answer.get("token") or answer.get("access_token")
            lifetime = int(answer.get("expires_in") or DEFAULT_TOKEN_LIFETIME)
        except (ValueError, AttributeError, TypeError, OverflowError):
            raise AuthError(f"{self.registry}: token server sent an unreadable answer") from None
        if not isinstance(token, str) or not token or any(c in token for c in "\r\n"):
            raise AuthError(f"{self.registry}: token server sent no usable token")
        margin = min(REFRESH_MARGIN, lifetime / 2)
        self._tokens[scope] = (token, time.monotonic() + lifetime - margin)
        return token
