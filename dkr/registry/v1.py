"""The Docker Registry v1 protocol, as systemd's import-dkr.c pulled it.

The seed's sequence, state for state, on the shared CurlGlue engine (the
pull that drives it is ``dkr.pull.v1``):

    GET {index}/v1/repositories/NAME/images   (X-Docker-Token: true)
        -> X-Docker-Token, X-Docker-Endpoints
    GET https://REG/v1/repositories/NAME/tags/TAG   -> "ID"
    GET https://REG/v1/images/ID/ancestry  } side by side
    GET https://REG/v1/images/ID/json      }
    GET https://REG/v1/images/LAYER/layer  base first, each layer once

v1 has no digests: the registry picks the image ids and is trusted for its
content. So a v1 layer is kept under a key of its own, ``v1-`` and the sha256
of the registry and the id (``IMAGE_ROOT/.dkr-v1-<hex>``): no v1 server can
name a layer that v2 (whose keys are verified chain ids) or another registry
would reuse. What the servers say is still checked before it becomes part of
a URL or a path.
Requests go through ``RegistryClient`` like v2's, so retries, resumed layer
bodies and the redirect rules (no token to another host) are the same.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from urllib.parse import urlsplit

from dkr.errors import DkrError, reworded
from dkr.registry.client import RegistryClient, status_error
from dkr.registry.reference import host_is_valid, split_url, v1_id_is_valid
from dkr.transport.glue import CurlGlue
from dkr.transport.job import Response, Sink, SinkError, TransferOptions

log = logging.getLogger("dkr.v1")

MAX_ANCESTRY = 2048        # layers in one image, as the seed capped it

# The seed's words for a failed request, per step; details follow them.
FAILED = {
    "images": "Failed to retrieve images list. (Wrong index URL?)",
    "tags": "Failed to retrieve tags list.",
    "ancestry": "Failed to retrieve ancestry list.",
    "json": "Failed to retrieve json data.",
    "layer": "Failed to retrieve layer data.",
}


# --- the conversation ----------------------------------------------------------

class TokenAuth:
    """v1 authentication for ``RegistryClient``: the index's token, echoed back.

    There is nothing to negotiate: without a token every request asks for one
    (``X-Docker-Token: true``), as the seed did, and a 401 is final. The
    client sends these headers only to its own origin, so a redirect to a CDN
    carries no token. ``scope`` is the protocol step, for the error message.
    """

    def __init__(self, token: str | None, on_index: bool = False):
        self.token = token
        self.on_index = on_index

    async def headers(self, scope: str) -> list[str]:
        return [f"Authorization: Token {self.token}" if self.token else "X-Docker-Token: true"]

    async def answer(self, challenge_header: str | None, scope: str) -> None:
        raise Unauthorized(self.refusal(scope))

    def refusal(self, scope: str) -> str:
        if self.on_index:
            return "HTTP 401"
        return "HTTP 401 " + ("(the registry refused the index's token)" if self.token else
                              "(the registry wants a token, and the index gave none)")


class Unauthorized(DkrError):
    """A 401 from the index or registry: v1 has no second way in."""

    kind = "auth"


class V1Session:
    """One pull's requests: the index's answers and where its token may go."""

    def __init__(self, glue: CurlGlue, options: TransferOptions, index: str):
        self.glue = glue
        self.options = options
        self.index = index
        parts = urlsplit(index)
        self._index_path = parts.path
        self._index = self._client(parts.netloc, TokenAuth(None, on_index=True),
                                   plain_http=parts.scheme == "http")
        self._registry: RegistryClient | None = None
        self.token: str | None = None
        self.registry: str | None = None      # host[:port] the index directed us to

    def _client(self, host: str, auth: TokenAuth, plain_http: bool = False) -> RegistryClient:
        client = RegistryClient(self.glue, host, options=self.options, plain_http=plain_http,
                                auth=auth)
        return client

    async def lookup_index(self, repo: str) -> None:
        response = await self.get(self._index, "images",
                                  f"{self._index_path}/v1/repositories/{repo}/images")
        self.token = parse_token(response.headers.get("x-docker-token", []))
        self.registry = parse_endpoints(response.headers.get("x-docker-endpoints", []))[0]
        # Registries are https only, as in the seed; --insecure only relaxes verification.
        self._registry = self._client(self.registry, TokenAuth(self.token))
        log.info("Index lookup succeeded, directed to registry %s.", self.registry)

    async def resolve_tag(self, repo: str, tag: str) -> str:
        response = await self.get(self._registry, "tags", f"/v1/repositories/{repo}/tags/{tag}")
        image_id = decode_json(response.body, f"tag {tag}")
        if not v1_id_is_valid(image_id):
            raise DkrError(f"Invalid tag id for {repo}:{tag}: {_quote(image_id)}")
        log.info("Tag lookup succeeded, resolved to layer %s.", image_id)
        return image_id

    async def ancestry(self, image_id: str) -> list[str]:
        response = await self.get(self._registry, "ancestry", f"/v1/images/{image_id}/ancestry")
        return parse_ancestry(decode_json(response.body, f"ancestry of {image_id}"), image_id)

    async def image_json(self, image_id: str) -> tuple[dict, bytes]:
        response = await self.get(self._registry, "json", f"/v1/images/{image_id}/json")
        config = decode_json(response.body, f"json of {image_id}")
        if not isinstance(config, dict):
            raise DkrError(f"Invalid json data for image {image_id}: not a JSON object")
        if "id" in config and config["id"] != image_id:
            raise DkrError(f"Invalid json data for image {image_id}: "
                           f"it describes image {_quote(config['id'])}")
        return config, response.body

    async def layer(self, layer_id: str, sink: Sink, label: str) -> Response:
        return await self.get(self._registry, "layer", f"/v1/images/{layer_id}/layer",
                              sink=sink, label=label)

    async def get(self, client: RegistryClient, step: str, path: str, *,
                  sink: Sink | None = None, label: str = "") -> Response:
        """GET with the client's retries and redirects; anything but 200 fails the step."""
        failed = FAILED[step] + (f" ({label})" if label else "")
        url = f"{client.base}{path}"
        try:
            response = await client.get(path, scope=step, accept=["application/json"],
                                        sink=sink, what=f"GET {url}")
        except SinkError:
            raise                         # the extractor knows why; the caller asks it
        except Unauthorized as e:
            raise reworded(e, f"{failed} GET {url}: {e}") from None
        except DkrError as e:
            raise reworded(e, f"{failed} {e}") from None
        if response.status != 200:
            said = _server_said(response.body)
            raise DkrError(f"{failed} GET {url}: HTTP {response.status}"
                           + (f": {said}" if said else ""),
                           kind=status_error("", response.status).kind)
        return response


# --- what the servers say, checked ------------------------------------------------

def index_base(url: str, insecure: bool) -> str:
    """The index URL without a trailing slash, as the seed kept it."""
    parts = split_url(url)
    if (parts is None or parts.scheme not in ("http", "https") or not host_is_valid(parts.netloc)
            or parts.query or parts.fragment or "#" in url or "?" in url
            or any(c.isspace() or not c.isprintable() for c in url)):
        raise DkrError(f"invalid index URL {_quote(url)}: want https://HOST[:PORT][/PATH]")
    if parts.scheme == "http" and not insecure:
        raise DkrError(f"index URL {_quote(url)} is plain http: the index hands out "
                       "registry tokens (use https, or --insecure)")
    return url.rstrip("/")


def parse_token(values: list[str]) -> str | None:
    """The index's X-Docker-Token, echoed back verbatim, so it must be header-safe."""
    token = values[-1] if values else ""
    if not token:
        return None
    if not all(" " <= c <= "~" for c in token):
        raise DkrError("Index sent an invalid X-Docker-Token header.")
    return token


def parse_endpoints(values: list[str]) -> list[str]:
    """X-Docker-Endpoints: comma-separated registry hosts, every one of them valid."""
    entries = [entry.strip() for value in values for entry in value.split(",")]
    if not entries or entries == [""]:
        raise DkrError("Didn't get registry information. "
                       "(The index sent no X-Docker-Endpoints header.)")
    for entry in entries:
        if not host_is_valid(entry):
            raise DkrError(f"Registry hostname is not valid: {_quote(entry)}")
    return entries


def decode_json(body: bytes, what: str):
    if b"\0" in body:
        raise DkrError(f"Failed to parse JSON {what}: the payload contains NUL bytes")
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise DkrError(f"Failed to parse JSON {what}: malformed JSON ({e})") from None


def parse_ancestry(value, image_id: str) -> list[str]:
    """The server's ancestry (image first) checked, and turned base first."""
    if not isinstance(value, list):
        raise DkrError(f"Failed to parse JSON ancestry of {image_id}: not a JSON array")
    if not value:
        raise DkrError(f"Ancestry is empty for image {image_id}")
    if len(value) > MAX_ANCESTRY:
        raise DkrError(f"Too many layers in ancestry of {image_id}: "
                       f"{len(value)}, at most {MAX_ANCESTRY}")
    for entry in value:
        if not v1_id_is_valid(entry):
            raise DkrError(f"Invalid id in ancestry of {image_id}: {_quote(entry)}")
    if len(set(value)) != len(value):
        twice = next(entry for n, entry in enumerate(value) if entry in value[:n])
        raise DkrError(f"Ancestry has duplicate entries: {twice} appears more than once")
    base_first = value[::-1]
    if base_first[-1] != image_id:
        raise DkrError(f"Ancestry doesn't end in main layer. It ends in {base_first[-1]}, "
                       f"the tag points at {image_id}")
    return base_first


# --- layers ------------------------------------------------------------------------

def layer_key(registry: str, layer_id: str) -> str:
    """Where a v1 layer is kept: its id means something only on its own registry."""
    return "v1-" + hashlib.sha256(f"{registry}\n{layer_id}".encode()).hexdigest()


# --- small things ------------------------------------------------------------------------

async def both(first, second):
    """Two requests side by side on the one CurlMulti; when one fails, stop the other."""
    tasks = [asyncio.ensure_future(first), asyncio.ensure_future(second)]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def platform_of(config: dict) -> str:
    os_name, arch = config.get("os"), config.get("architecture")
    if isinstance(os_name, str) and isinstance(arch, str):
        return _printable(f"{os_name}/{arch}", 40)
    return "unknown platform"


def _server_said(body: bytes) -> str:
    """The ``error`` a registry put in its JSON answer, made safe for one line."""
    try:
        said = json.loads(body.decode("utf-8")).get("error")
    except (UnicodeDecodeError, ValueError, AttributeError):
        return ""
    return _printable(said, 120) if isinstance(said, str) else ""


def _printable(text: str, limit: int) -> str:
    clean = "".join(c if c.isprintable() else "?" for c in " ".join(text.split()))
    return clean if len(clean) <= limit else clean[:limit] + "…"


def _quote(value) -> str:
    """A server's value in a message: repr keeps it on one line; long ones are cut."""
    text = repr(value)
    return text if len(text) <= 80 else text[:80] + "…"
