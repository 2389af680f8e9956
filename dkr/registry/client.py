"""Talking to one registry host: scheme, authentication, redirects.

Every request of a pull goes through ``RegistryClient.get``: it adds the
registry's Authorization header (answering a 401 challenge once), follows
redirects itself so that credentials are only ever sent to the registry's
own host, and refuses to be redirected from https to plain http.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import random
import time
from typing import Awaitable, Callable
from urllib.parse import urljoin, urlsplit

from dkr.errors import AuthError, DkrError, NotFound, reworded
from dkr.registry.auth import Authenticator, Credentials, RequestAuth, split_challenges
from dkr.transport.glue import CurlGlue
from dkr.transport.job import Job, Response, Sink, TransferError, TransferOptions

log = logging.getLogger("dkr.registry")

MAX_REDIRECTS = 10
REDIRECT_CODES = (301, 302, 303, 307, 308)
RETRY_STATUSES = (429, 500, 502, 503, 504)
PROBE_TIMEOUT = 3
BACKOFF_BASE = 0.5
BACKOFF_CAP = 15.0
RETRY_AFTER_CAP = 60.0


def backoff(attempt: int) -> float:
    """Exponential backoff with full jitter (so many clients do not retry in step)."""
    ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** attempt)
    return random.uniform(ceiling / 2, ceiling)


def auth_challenge(response: Response) -> str | None:
    """The WWW-Authenticate challenge to answer: Bearer where a server offers it too."""
    offered = [challenge for value in response.headers.get("www-authenticate") or []
               for challenge in split_challenges(value)]
    bearer = [c for c in offered if c.split(None, 1)[0].lower() == "bearer"]
    return (bearer or offered or [None])[-1]


def retry_after(response: Response) -> float | None:
    value = response.header("retry-after")
    if not value:
        return None
    if value.strip().isascii() and value.strip().isdigit():
        return min(float(value), RETRY_AFTER_CAP)
    import email.utils  # rarely needed; it costs every start-up 7 ms
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, min(when - time.time(), RETRY_AFTER_CAP))


def status_error(what: str, status: int) -> DkrError:
    """The error for an answer that is no success: its kind says what the status means."""
    message = f"{what}: registry answered {status}"
    if status == 404:
        return NotFound(message)
    if status in (401, 403):
        return AuthError(message)
    return DkrError(message)


class RegistryClient:
    def __init__(self, glue: CurlGlue, host: str, *, credentials: Credentials | None = None,
                 options: TransferOptions | None = None, plain_http: bool = False,
                 auth: RequestAuth | None = None):
        self.glue = glue
        self.host = host
        self.options = options or TransferOptions()
        self.scheme = "http" if plain_http else "https"
        self.auth = auth or Authenticator(host, credentials, self._fetch_plain,
                                          insecure=self.options.insecure)

    @property
    def base(self) -> str:
        return f"{self.scheme}://{self.host}"

    async def _fetch_plain(self, url: str, headers: list[str], what: str) -> tuple[int, bytes]:
        """A small GET outside the registry's own requests (a token), retried as they are.

        Retried here, on its own: a failure must never count toward the
        resume offset of the blob download that needed the token.
        """
        response = await self._retrying(lambda _: self._job(url, headers, what=what), what,
                                        server="server")
        return response.status, response.body

    async def _job(self, url: str, headers: list[str], *, options: TransferOptions | None = None,
                   **kw) -> Response:
        return await Job(self.glue, url, headers=headers, options=options or self.options,
                         **kw).run()

    async def ping(self) -> None:
        """``GET /v2/``; with --insecure fall back to plain http when https fails."""
        where = f"{self.host}: /v2/"
        try:
            if self.scheme == "https" and self.options.insecure:
                try:
                    # A plain-http server may never answer a TLS hello: don't wait long.
                    probe = dataclasses.replace(self.options, connect_timeout=PROBE_TIMEOUT)
                    response = await self._job(f"{self.base}/v2/", [], what=where, options=probe)
                except DkrError as e:
                    log.debug("https to %s failed (%s); trying plain http", self.host, e)
                    self.scheme = "http"
                    response = await self.get("/v2/", scope=None, what=where)
            else:
                response = await self.get("/v2/", scope=None, what=where)
        except DkrError as e:
            raise reworded(e, f"cannot reach registry {self.host}: "
                              f"{str(e).removeprefix(where + ': ')}") from None
        if response.status == 401:
            return                          # the challenge is answered per scope, on demand
        if response.status != 200:
            raise DkrError(f"{self.host} does not speak the registry v2 API "
                           f"(GET /v2/ answered {response.status})")

    async def get(self, path: str, *, scope: str | None, accept: list[str] | None = None,
                  sink: Sink | None = None, expected_size: int | None = None,
                  offset: int = 0, hasher=None, what: str = "") -> Response:
        """GET with retries: network failures, 429 and 5xx are tried again with backoff.

        A streamed body continues where it broke off (``Range``); ``hasher``
        (if given) has already seen the first ``offset`` bytes and sees the
        rest, so ``Response.sha256`` covers the whole body.
        """
        what = what or path
        if sink is not None and hasher is None:
            hasher = hashlib.sha256()
        return await self._retrying(
            lambda start: self._get_once(path, scope, accept, sink, expected_size, start,
                                         hasher, what),
            what, offset if sink is not None else None)

    async def _retrying(self, attempt_from: Callable[[int], Awaitable[Response]], what: str,
                        offset: int | None = None, server: str = "registry") -> Response:
        """``attempt_from(offset)`` until it succeeds: network failures, 429 and 5xx
        are tried again with backoff. ``offset``: where a streamed body stands
        (None: the body is not resumed, each attempt starts over)."""
        attempt = 0
        while True:
            try:
                response = await attempt_from(offset or 0)
            except TransferError as e:
                if not e.retryable or attempt >= self.options.retries:
                    if attempt:
                        raise reworded(e, f"{e} (gave up after {attempt + 1} attempts)") from None
                    raise
                if offset is not None:
                    offset += e.delivered
                delay, cause = backoff(attempt), str(e).removeprefix(f"{what}: ")
            else:
                if response.status in RETRY_STATUSES and attempt and \
                        attempt >= self.options.retries:
                    raise DkrError(f"{what}: {server} answered {response.status} "
                                   f"(gave up after {attempt + 1} attempts)", kind="network")
                if response.status not in RETRY_STATUSES or attempt >= self.options.retries:
                    if offset is not None:
                        response.received += offset
                    return response
                delay = retry_after(response) or backoff(attempt)
                cause = f"{server} answered {response.status}"
            attempt += 1
            log.warning("%s: %s; trying again in %.1f s (attempt %d of %d%s).", what, cause,
                        delay, attempt + 1, self.options.retries + 1,
                        f", from byte {offset}" if offset else "")
            await asyncio.sleep(delay)

    async def _get_once(self, path: str, scope: str | None, accept: list[str] | None,
                        sink: Sink | None, expected_size: int | None, range_start: int,
                        hasher, what: str) -> Response:
        url = f"{self.base}{path}"
        extra = [f"Accept: {', '.join(accept)}"] if accept else []
        answered = False
        for _ in range(MAX_REDIRECTS + 1):
            own_host = self._same_origin(url) and scope is not None
            headers = extra + (await self.auth.headers(scope) if own_host else [])
            response = await self._job(url, headers, sink=sink, expected_size=expected_size,
                                       range_start=range_start, what=what, hasher=hasher)
            if response.status == 401 and own_host:
                if answered:
                    raise AuthError(self.auth.refusal(scope))
                await self.auth.answer(auth_challenge(response), scope)
                answered = True
                continue
            if response.status in REDIRECT_CODES and response.header("location"):
                url = self._redirect_target(url, response.header("location"), what)
                continue
            return response
        raise DkrError(f"{what}: more than {MAX_REDIRECTS} redirects")

    def _same_origin(self, url: str) -> bool:
        parts = urlsplit(url)
        return parts.scheme == self.scheme and parts.netloc == self.host

    def _redirect_target(self, current: str, location: str, what: str) -> str:
        try:
            target = urljoin(current, location)
            scheme = urlsplit(target).scheme
        except ValueError:                 # e.g. an unclosed IPv6 bracket
            raise DkrError(f"{what}: redirected to an invalid URL {location!r}") from None
        if scheme not in ("http", "https"):
            raise DkrError(f"{what}: redirected to unsupported URL scheme {scheme!r}")
        if urlsplit(current).scheme == "https" and scheme == "http" and not self.options.insecure:
            raise DkrError(f"{what}: refusing redirect from https to plain http "
                           f"({urlsplit(target).netloc})")
        log.debug("%s: redirected to %s", what, urlsplit(target).netloc)
        return target
