"""Talking to one registry host: scheme, authentication, redirects.

Every request of a pull goes through ``RegistryClient.get``: it adds the
registry's Authorization header (answering a 401 challenge once), follows
redirects itself so that credentials are only ever sent to the registry's
own host, and refuses to be redirected from https to plain http.
"""

from __future__ import annotations

import logging
from urllib.parse import urljoin, urlsplit

from .auth import Authenticator, Credentials
from .errors import DkrError
from .glue import CurlGlue
from .job import Job, Response, Sink, TransferOptions

log = logging.getLogger("dkr.registry")

MAX_REDIRECTS = 10
REDIRECT_CODES = (301, 302, 303, 307, 308)


class RegistryClient:
    def __init__(self, glue: CurlGlue, host: str, *, credentials: Credentials | None = None,
                 options: TransferOptions | None = None, plain_http: bool = False):
        self.glue = glue
        self.host = host
        self.options = options or TransferOptions()
        self.scheme = "http" if plain_http else "https"
        self.auth = Authenticator(host, credentials, self._fetch_plain)

    @property
    def base(self) -> str:
        return f"{self.scheme}://{self.host}"

    async def _fetch_plain(self, url: str, headers: list[str], what: str) -> tuple[int, bytes]:
        response = await self._job(url, headers, what=what)
        return response.status, response.body

    async def _job(self, url: str, headers: list[str], **kw) -> Response:
        return await Job(self.glue, url, headers=headers, options=self.options, **kw).run()

    async def ping(self) -> None:
        """``GET /v2/``; with --insecure fall back to plain http when https fails."""
        try:
            response = await self._job(f"{self.base}/v2/", [], what=f"{self.host}: /v2/")
        except DkrError as e:
            if self.scheme == "https" and self.options.insecure:
                log.debug("https to %s failed (%s); trying plain http", self.host, e)
                self.scheme = "http"
                response = await self._job(f"{self.base}/v2/", [], what=f"{self.host}: /v2/")
            else:
                raise DkrError(f"cannot reach registry {self.host}: {e}") from None
        if response.status == 401:
            return                          # the challenge is answered per scope, on demand
        if response.status != 200:
            raise DkrError(f"{self.host} does not speak the registry v2 API "
                           f"(GET /v2/ answered {response.status})")

    async def get(self, path: str, *, scope: str, accept: list[str] | None = None,
                  sink: Sink | None = None, expected_size: int | None = None,
                  range_start: int = 0, what: str = "") -> Response:
        url = f"{self.base}{path}"
        extra = [f"Accept: {', '.join(accept)}"] if accept else []
        answered = False
        for _ in range(MAX_REDIRECTS + 1):
            own_host = self._same_origin(url)
            headers = extra + (await self.auth.headers(scope) if own_host else [])
            response = await self._job(url, headers, sink=sink, expected_size=expected_size,
                                       range_start=range_start, what=what or path)
            if response.status == 401 and own_host:
                if answered:
                    raise DkrError(self.auth.refusal(scope))
                await self.auth.answer(response.header("www-authenticate"), scope)
                answered = True
                continue
            if response.status in REDIRECT_CODES and response.header("location"):
                url = self._redirect_target(url, response.header("location"), what or path)
                continue
            return response
        raise DkrError(f"{what or path}: more than {MAX_REDIRECTS} redirects")

    def _same_origin(self, url: str) -> bool:
        parts = urlsplit(url)
        return parts.scheme == self.scheme and parts.netloc == self.host

    def _redirect_target(self, current: str, location: str, what: str) -> str:
        target = urljoin(current, location)
        scheme = urlsplit(target).scheme
        if scheme not in ("http", "https"):
            raise DkrError(f"{what}: redirected to unsupported URL scheme {scheme!r}")
        if urlsplit(current).scheme == "https" and scheme == "http" and not self.options.insecure:
            raise DkrError(f"{what}: refusing redirect from https to plain http "
                           f"({urlsplit(target).netloc})")
        log.debug("%s: redirected to %s", what, urlsplit(target).netloc)
        return target
