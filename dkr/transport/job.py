"""One HTTP transfer on the CurlGlue engine (systemd's ImportJob).

A job either collects a small body (manifests, JSON, tokens) into a buffer
with a hard cap, or streams a blob into a ``Sink`` with backpressure: when the
sink is full the transfer pauses, and it resumes when the sink drains, so the
event loop never blocks and a blob is never held whole. The compressed sha256
is computed on the same pass.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol
from urllib.parse import urlsplit

import pycurl

from dkr.errors import DkrError, error_kind
from dkr.transport.glue import CurlGlue

log = logging.getLogger("dkr.job")

MAX_PAYLOAD = 4 * 1024 * 1024      # the OCI cap for a manifest; plenty for JSON
ERROR_BODY_KEEP = 4096             # enough of an error body to quote it
BLOB_BUFFER = 1024 * 1024          # large curl buffers: Python touches each MB few times
USER_AGENT = "dkr/0.1 (+pycurl)"


class SinkError(DkrError):
    """The blob's consumer (the extractor) stopped taking data; it knows why."""


class TransferError(DkrError):
    """A transfer failed; ``retryable`` says whether trying again may help.

    ``delivered`` counts the body bytes that reached the sink before the
    failure, so that a retry can continue with a Range request.
    """

    kind = "network"

    def __init__(self, message: str, *, retryable: bool, delivered: int = 0,
                 kind: str | None = None):
        super().__init__(message, kind=kind)
        self.retryable = retryable
        self.delivered = delivered


# libcurl errors worth another attempt: the network, not the request, failed. (A name
# that does not resolve is not: the resolver has already tried, and will say so again.)
RETRYABLE_CURL_ERRORS = {
    pycurl.E_COULDNT_CONNECT, pycurl.E_PARTIAL_FILE,
    pycurl.E_OPERATION_TIMEDOUT, pycurl.E_GOT_NOTHING, pycurl.E_SEND_ERROR,
    pycurl.E_RECV_ERROR, 16, 92,   # HTTP/2 framing and stream errors
}

# OpenSSL's words for a certificate chain that ends at no CA we trust (curl error 60
# also covers names that do not match and expired certificates, which say so).
UNKNOWN_ISSUER = ("unable to get local issuer", "unable to get issuer", "self-signed",
                  "self signed")


# TLS alerts with which a server refuses the client's certificate, or its lack of one.
CLIENT_CERT_REFUSED = ("alert bad certificate", "alert certificate required",
                       "alert unknown ca", "alert certificate unknown")


def client_cert_refused(message: str) -> bool:
    return any(words in message for words in CLIENT_CERT_REFUSED)


# libcurl errors of TLS itself: the handshake, a certificate, its files.
TLS_CURL_ERRORS = {35, 51, 53, 54, 58, 59, 60, 64, 66, 77, 80, 82, 83, 90, 91, 98}


def curl_error_kind(code: int) -> str:
    return "tls" if code in TLS_CURL_ERRORS else "network"


def curl_hint(code: int, message: str, url: str, client_cert: bool = False) -> str:
    """What the user can do about a libcurl error whose text does not say it."""
    if code == pycurl.E_SSL_CONNECT_ERROR and "wrong version number" in message:
        # OpenSSL read an HTTP answer where a TLS record should be.
        return f"; {urlsplit(url).netloc} answers plain HTTP, not HTTPS: " \
               "--insecure (or --tls-verify=false) allows that"
    if code == pycurl.E_COULDNT_RESOLVE_HOST:
        return "; check the registry's name"
    if client_cert_refused(message):
        host = urlsplit(url).netloc
        if client_cert:
            return f"; {host} refused the client certificate dkr presented"
        return f"; {host} wants a client certificate: put NAME.cert and NAME.key in " \
               f"/etc/containers/certs.d/{host}/ (or give --cert-dir)"
    if code == pycurl.E_PEER_FAILED_VERIFICATION and \
            any(words in message for words in UNKNOWN_ISSUER):
        return f"; no trusted CA signed the certificate of {urlsplit(url).netloc}: " \
               "give its CA with --ca-file"
    return ""


class JobState(enum.Enum):
    """Where a transfer is; the callbacks act on it, as systemd's import job does.

    INIT -> ANALYZING (request sent; headers, or the body of an answer that is
    no success) -> RUNNING (a success's body flowing) <-> PAUSED (the sink is
    full: libcurl holds the data until the sink drains). ABORTING: we refused
    the data (over a limit, a wrong range, the sink failed) and wait for libcurl
    to end the transfer. DONE and FAILED are final.
    """
    INIT = "init"
    ANALYZING = "analyzing"
    RUNNING = "running"
    PAUSED = "paused"
    ABORTING = "aborting"
    DONE = "done"
    FAILED = "failed"


FINAL = (JobState.DONE, JobState.FAILED)


class Sink(Protocol):
    """Where a blob's bytes go."""

    def write(self, data: bytes) -> bool:
        """Take all of ``data``; return False when full (the job pauses until drained)."""

    def on_drain(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once, when the sink can take more."""


@dataclass
class TransferOptions:
    """TLS and transport settings that apply to every request to one registry."""

    insecure: bool = False
    ca_pem: bytes | None = None  # trust.trusted_pem(): None leaves libcurl's default
    client_cert: str | None = None   # PEM files presented for mutual TLS
    client_key: str | None = None
    connect_timeout: int = 30
    low_speed_time: int = 60    # a transfer slower than 1 B/s this long is stalled
    retries: int = 4            # further attempts after a failed one


@dataclass
class Response:
    url: str
    status: int
    headers: dict[str, list[str]] = field(default_factory=dict)
    body: bytes = b""
    received: int = 0
    sha256: str = ""

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[-1] if values else None


class Job:
    """One GET (or HEAD) with explicit states; ``await job.run()`` gives the Response."""

    def __init__(self, glue: CurlGlue, url: str, *, headers: list[str] | None = None,
                 sink: Sink | None = None, expected_size: int | None = None,
                 max_payload: int = MAX_PAYLOAD, options: TransferOptions | None = None,
                 range_start: int = 0, method: str = "GET", what: str = "",
                 hasher=None):
        self.glue = glue
        self.url = url
        self.what = what or url
        self.sink = sink
        self.expected_size = expected_size
        self.max_payload = max_payload
        self.range_start = range_start
        self.state = JobState.INIT
        self.status = 0
        self.headers: dict[str, list[str]] = {}
        self.received = 0              # body bytes of this response
        self.content_length: int | None = None
        self.hasher = hasher if hasher is not None else hashlib.sha256()
        self._skip = 0                 # bytes to drop when a server ignored our Range
        self._body = bytearray()
        self._abort_reason = ""        # why, in state ABORTING
        self._sink_failed = ""         # ... and, if the sink (not the server) was why, its kind
        self.stall_timeout = (options or TransferOptions()).low_speed_time
        self.client_cert = bool(options and options.client_cert)
        self._last_activity = 0.0
        self._future: asyncio.Future[Response] = glue.loop.create_future()
        self.curl = self._make_curl(url, headers or [], options or TransferOptions(), method)

    def _make_curl(self, url: str, headers: list[str], options: TransferOptions,
                   method: str) -> pycurl.Curl:
        c = pycurl.Curl()
        c.setopt(pycurl.URL, url)
        c.setopt(pycurl.NOSIGNAL, 1)
        c.setopt(pycurl.USERAGENT, USER_AGENT)
        c.setopt(pycurl.HTTPHEADER, headers)
        c.setopt(pycurl.PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
        c.setopt(pycurl.FOLLOWLOCATION, 0)   # redirects are ours: credentials must not follow
        c.setopt(pycurl.CONNECTTIMEOUT, options.connect_timeout)
        c.setopt(pycurl.LOW_SPEED_LIMIT, 1)
        c.setopt(pycurl.LOW_SPEED_TIME, options.low_speed_time)
        c.setopt(pycurl.TCP_KEEPALIVE, 1)
        c.setopt(pycurl.HEADERFUNCTION, self._on_header)
        c.setopt(pycurl.WRITEFUNCTION, self._on_write)
        if self.sink is not None:
            c.setopt(pycurl.BUFFERSIZE, BLOB_BUFFER)
        if method == "HEAD":
            c.setopt(pycurl.NOBODY, 1)
        if self.range_start:
            c.setopt(pycurl.RANGE, f"{self.range_start}-")
        if options.ca_pem:
            c.setopt(pycurl.CAINFO_BLOB, options.ca_pem)
        if options.client_cert:
            c.setopt(pycurl.SSLCERT, options.client_cert)
            c.setopt(pycurl.SSLKEY, options.client_key)
        if options.insecure:
            c.setopt(pycurl.SSL_VERIFYPEER, 0)
            c.setopt(pycurl.SSL_VERIFYHOST, 0)
        return c

    # --- lifecycle --------------------------------------------------------
    async def run(self) -> Response:
        self.state = JobState.ANALYZING
        self.glue.add(self)
        self._last_activity = time.monotonic()
        self._watchdog = self.glue.loop.call_later(1.0, self._check_stall)
        try:
            return await self._future
        finally:
            self._watchdog.cancel()
            if not self._future.done() or self._future.cancelled():
                self.glue.remove(self)
            self.curl.close()

    def _check_stall(self) -> None:
        """No byte for the stall timeout (libcurl's own check averages over seconds more).

        Waiting for our own sink (PAUSED) is no stall."""
        if self.state in FINAL:
            return
        idle = time.monotonic() - self._last_activity
        if idle >= self.stall_timeout and self.state is not JobState.PAUSED:
            self.glue.remove(self)
            self._fail(f"{self.what}: no data for {self.stall_timeout} s (stalled)",
                       retryable=True)
            return
        self._watchdog = self.glue.loop.call_later(1.0, self._check_stall)

    def on_finished(self, code: int, message: str) -> None:
        if self.state in FINAL:
            return
        if self.state is JobState.ABORTING:
            self._fail(self._abort_reason, retryable=False)
        elif code != 0:
            self._fail(f"{self.what}: {message or 'transfer failed'} (curl error {code})"
                       f"{curl_hint(code, message, self.url, self.client_cert)}",
                       retryable=code in RETRYABLE_CURL_ERRORS and
                       not client_cert_refused(message), kind=curl_error_kind(code))
        elif self._is_success() and self.expected_size is not None and \
                self.range_start + self.received != self.expected_size:
            self._fail(f"{self.what}: body ended after {self.range_start + self.received} "
                       f"of {self.expected_size} bytes", retryable=True)
        else:
            self.state = JobState.DONE
            self._future.set_result(Response(
                url=self.url, status=self.status, headers=self.headers,
                body=bytes(self._body), received=self.received,
                sha256=self.hasher.hexdigest()))

    def _fail(self, reason: str, retryable: bool, kind: str | None = None) -> None:
        self.state = JobState.FAILED
        if self._sink_failed:
            error: DkrError = SinkError(reason, kind=self._sink_failed)
        else:
            error = TransferError(reason, retryable=retryable, delivered=self.received,
                                  kind=kind)
        self._future.set_exception(error)

    def _is_success(self) -> bool:
        return 200 <= self.status < 300

    # --- curl callbacks ------------------------------------------------------
    def _on_header(self, line: bytes):
        self._last_activity = time.monotonic()
        text = line.decode("iso-8859-1").rstrip("\r\n")
        if text.startswith("HTTP/"):
            parts = text.split(None, 2)
            self.status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
            self.headers = {}
            return None
        if not text:
            return self._headers_complete()
        name, sep, value = text.partition(":")
        if sep:
            self.headers.setdefault(name.strip().lower(), []).append(value.strip())
        return None

    def _headers_complete(self):
        if self.status == 100 or not self._is_success():
            return None
        self.state = JobState.RUNNING
        if self.range_start and self.status == 200:
            self._skip = self.range_start      # a full body again: drop what we have
        if self.status == 206 and not self._range_matches():
            return self._abort(f"{self.what}: server sent a range other than the one asked for "
                               f"({self.headers.get('content-range', ['none'])[-1]})")
        length = self.headers.get("content-length")
        if length and length[-1].isdigit():
            self.content_length = int(length[-1])
            total = self.content_length + (self.range_start if self.status == 206 else 0)
            if self.sink is None and self.content_length > self.max_payload:
                return self._abort(f"{self.what}: response of {self.content_length} bytes "
                                   f"is over the {self.max_payload} byte limit")
            if self.expected_size is not None and total != self.expected_size \
                    and self.status in (200, 206):
                return self._abort(f"{self.what}: server announced {total} bytes, "
                                   f"expected {self.expected_size}")
        return None

    def _range_matches(self) -> bool:
        value = (self.headers.get("content-range") or [""])[-1]
        unit, _, spec = value.partition(" ")
        start = spec.split("-", 1)[0]
        return unit == "bytes" and start.isdigit() and int(start) == self.range_start

    def _on_write(self, data: bytes):
        self._last_activity = time.monotonic()
        if self.state is JobState.ABORTING:
            return 0
        if not self._is_success():
            if len(self._body) < ERROR_BODY_KEEP:
                self._body += data[: ERROR_BODY_KEEP - len(self._body)]
            return None
        if self.sink is None:
            if self.expected_size is not None and \
                    self.received + len(data) > self.expected_size:
                return self._abort(f"{self.what}: body runs past the expected "
                                   f"{self.expected_size} bytes")
            if len(self._body) + len(data) > self.max_payload:
                return self._abort(f"{self.what}: response is over the "
                                   f"{self.max_payload} byte limit")
            self._body += data
            self.received += len(data)
            self.hasher.update(data)
            return None
        if self.state is JobState.PAUSED:
            return pycurl.WRITEFUNC_PAUSE
        if self._skip:
            dropped = min(self._skip, len(data))
            self._skip -= dropped
            data = data[dropped:]
            if not data:
                return None
        if self.expected_size is not None and \
                self.range_start + self.received + len(data) > self.expected_size:
            return self._abort(f"{self.what}: body runs past the expected "
                               f"{self.expected_size} bytes")
        self.hasher.update(data)
        self.received += len(data)
        try:
            accepted = self.sink.write(data)
        except OSError as e:
            self._sink_failed = error_kind(e)
            where = f" to {e.filename}" if e.filename else ""
            return self._abort(f"{self.what}: cannot write{where}: {e.strerror}")
        if not accepted:
            self.state = JobState.PAUSED
            self.sink.on_drain(self._resume)
        return None

    def _abort(self, reason: str) -> int:
        self.state = JobState.ABORTING
        self._abort_reason = reason
        return 0   # any short count makes libcurl fail the transfer

    def _resume(self) -> None:
        if self.state is not JobState.PAUSED or self._future.done():
            return                                # ended, aborted or given up meanwhile
        self.state = JobState.RUNNING
        self._last_activity = time.monotonic()   # waiting for our sink is not a stall
        try:
            self.curl.pause(pycurl.PAUSE_CONT)
        except pycurl.error:
            return
        self.glue.kick()
