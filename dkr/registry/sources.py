"""Where an image's manifests and blobs come from: its pull sources, in order.

This is the one place that decides it. ``SourceSet`` stands in for a
registry client: each request goes to the first source (mirrors first, as
registries.conf lists them, the registry itself last) that serves it. A
mirror that cannot be reached, answers an error (5xx, 404, 401, ...) or
serves content that does not match the digest asked for is passed over for
that request and the next source asked; only the last source's failure is
the request's. What the request names (the repository path and the token
scope) is rewritten for each source, and each source's client has the
login and TLS settings of the host it contacts.

A blob streamed into the spool is read by its extractor while it arrives:
when a mirror fails after bytes of it were written there, the layer has to
start over (``ResumedBlobMismatch``), and that mirror is not asked for the
blob again in this run.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Awaitable, Callable

from dkr.errors import DkrError
from dkr.registry.client import RegistryClient
from dkr.registry.registries_conf import PullSource
from dkr.transport.job import Response, SinkError

log = logging.getLogger("dkr.registry")


class SourceFailed(DkrError):
    """A source could not serve a request; the next one is asked."""


class ContentMismatch(DkrError):
    """A blob's content did not match its digest (and was thrown away)."""

    kind = "digest"


class BlobStartsOver(DkrError):
    """A mirror failed after part of a blob reached its readers: start the layer over."""

    kind = "network"


class SourceState:
    """What a run has learnt about sources, shared by all its images."""

    def __init__(self):
        self.unreachable: set[str] = set()          # hosts whose /v2/ ping failed
        self.bad: set[tuple[str, str]] = set()      # (host, digest) served wrong or broke off


class SourceSet:
    def __init__(self, name: str, sources: list[PullSource],
                 connect: Callable[[PullSource], Awaitable[RegistryClient]],
                 state: SourceState, emit: Callable[..., None] = lambda kind, **f: None):
        self.name = name                 # how the requests name the image (as the user did)
        self.sources = sources
        self.connect = connect
        self.state = state
        self.emit = emit

    @property
    def host(self) -> str:
        return self.sources[-1].reference.host

    async def registry(self) -> RegistryClient:
        """The registry's own client (the last source): for what no mirror serves, such
        as the retries of a request to a signature store."""
        return await self._client(self.sources[-1])

    def _eligible(self, digest: str | None) -> list[PullSource]:
        last = self.sources[-1]
        return [s for s in self.sources if s is last or not (
            s.reference.host in self.state.unreachable or
            (digest and (s.reference.host, digest) in self.state.bad))]

    def _rewrite(self, text: str | None, source: PullSource) -> str | None:
        if text is None:
            return None
        return text.replace(f"/v2/{self.name}/", f"/v2/{source.reference.name}/", 1) \
            .replace(f"repository:{self.name}:", f"repository:{source.reference.name}:", 1)

    async def _client(self, source: PullSource) -> RegistryClient:
        try:
            return await self.connect(source)
        except SinkError:
            raise
        except DkrError as e:
            if source is not self.sources[-1]:
                self.state.unreachable.add(source.reference.host)
            raise SourceFailed(str(e), kind=e.kind) from None

    def _passed_over(self, source: PullSource, what: str, why: str) -> None:
        # A mirror that does not have something (a peer-to-peer agent whose peers
        # lack a layer) is no trouble worth a warning.
        level = logging.INFO if why == "answered 404" else logging.WARNING
        log.log(level, "%s: %s failed (%s); trying the next source.", what, source.label, why)
        self.emit("source-failed", source=source.reference.host, mirror=source.mirror,
                  what=what, reason=why)

    def served(self, source: PullSource, what: str, size: int, kind: str) -> None:
        log.debug("%s: served by %s, %d bytes.", what, source.label, size)
        self.emit("source", source=source.reference.host, mirror=source.mirror,
                  request=kind, what=what, bytes=size)

    async def get(self, path: str, *, scope: str | None, what: str = "", **kw) -> Response:
        """``RegistryClient.get`` from the first source that serves it. Payloads named
        by digest (manifests, configs) are checked against it for a mirror here."""
        what = what or path
        digest = path.rsplit("/", 1)[-1] if "/sha256:" in path else None
        digest = digest if digest and digest.startswith("sha256:") else None
        manifest = "/manifests/" in path

        async def attempt(source: PullSource, client: RegistryClient, last: bool):
            response = await client.get(self._rewrite(path, source),
                                        scope=self._rewrite(scope, source), what=what, **kw)
            if not last:
                why = _problem(response, digest, manifest)
                if why:
                    raise _PassOver(why)
            if response.status in (200, 206):       # (the last source's error is the caller's)
                self.served(source, what, len(response.body), "manifest" if manifest else "blob")
            return response
        return await self._first_serving(digest, what, attempt)

    async def fetch_blob(self, digest: str, what: str,
                         fetch: Callable[[RegistryClient, str], Awaitable[int]],
                         written: Callable[[], int], forget: Callable[[], None]) -> None:
        """``fetch(client, name)`` from the first source that serves the blob; it gives
        the bytes it fetched. ``written()``: how much of the blob is in the spool
        (what its readers may have seen); ``forget()`` drops what a source that
        failed handed over and no reader saw yet."""
        async def attempt(source: PullSource, client: RegistryClient, last: bool):
            before = written()
            try:
                size = await fetch(client, source.reference.name)
            except (SourceFailed, SinkError):
                raise
            except DkrError as e:
                if last:
                    raise
                forget()
                if written() != before or isinstance(e, ContentMismatch):
                    self._passed_over(source, what, str(e))
                    self.state.bad.add((source.reference.host, digest))
                    raise BlobStartsOver(f"{what}: {source.label} failed while it was being "
                                         "read") from None
                raise _PassOver(str(e)) from None
            self.served(source, what, size, "blob")
        await self._first_serving(digest, what, attempt)

    async def _first_serving(self, digest: str | None, what: str, attempt):
        """``attempt(source, client, last)`` for each source in turn, until one serves:
        a source that cannot be reached, fails, or is passed over (``_PassOver``)
        leaves the request to the next one; the last one's failure is the caller's."""
        candidates = self._eligible(digest)
        for source in candidates:
            last = source is candidates[-1]
            try:
                return await attempt(source, await self._client(source), last)
            except SourceFailed as e:
                if last:
                    raise DkrError(str(e), kind=e.kind) from None
                self._passed_over(source, what, str(e))
            except (SinkError, BlobStartsOver):
                raise
            except _PassOver as e:
                self._passed_over(source, what, str(e))
            except DkrError as e:
                if last:
                    raise
                self._passed_over(source, what, str(e))
        raise AssertionError("no source")       # (the last one returns or raises)


class _PassOver(Exception):
    """This source's answer is not to be used (the next one is asked): why."""


def _problem(response: Response, digest: str | None, manifest: bool) -> str | None:
    """Why a mirror's answer is not to be used, or None. A manifest asked for by tag
    has no digest to check: it is at least to be a JSON object."""
    if response.status not in (200, 206):
        return f"answered {response.status}"
    if digest and response.status == 200 and \
            "sha256:" + hashlib.sha256(response.body).hexdigest() != digest:
        return "content does not match its digest"
    if manifest and not digest:
        try:
            if isinstance(json.loads(response.body), dict):
                return None
        except ValueError:
            pass
        return "a manifest that is no JSON object"
    return None
