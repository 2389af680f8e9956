"""A loopback HTTP proxy that injects faults between a client and a registry.

Tests put it in front of a real registry to see how dkr copes with resets,
stalls, truncated bodies, 5xx/429 answers and servers that ignore Range,
without mocking anything inside dkr (DESIGN.md, "Testing with real parts")::

    with FaultProxy("127.0.0.1", registry_port) as proxy:
        proxy.add_fault(r"/blobs/sha256:", "reset_after", bytes=1000)
        pull(f"{proxy.host}/library/busybox")
        assert proxy.log_for(r"/blobs/")[1].range == "bytes=1000-"

Clients speak plain HTTP/1.1 to it as if it were the registry.  Bodies are
streamed in both directions in chunks, never held whole.  Body offsets in
fault parameters count decoded body bytes (chunked framing excluded).
"""

from __future__ import annotations

import fcntl
import http.client
import re
import socket
import struct
import termios
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http import HTTPStatus

__all__ = ["FaultProxy", "Fault", "LogEntry", "KINDS"]

CHUNK = 64 * 1024

# kind -> (required parameters, optional parameters with their defaults)
KINDS: dict[str, tuple[frozenset[str], dict[str, object]]] = {
    "reset_after": (frozenset({"bytes"}), {}),
    "truncate_after": (frozenset({"bytes"}), {}),
    "stall_after": (frozenset({"bytes", "seconds"}), {}),
    "status": (frozenset({"code"}), {"retry_after": None, "body": b"", "headers": None}),
    "refuse": (frozenset(), {}),
    "slow": (frozenset({"rate"}), {}),
    "ignore_range": (frozenset(), {}),
    "corrupt": (frozenset({"offset"}), {}),
}
_ANSWERS = ("refuse", "status")  # kinds that never reach the upstream
_CUTS = ("reset_after", "truncate_after", "stall_after")  # kinds that end the body early

# Connection-scoped headers (RFC 9110 7.6.1).  The request keeps
# Transfer-Encoding because its chunked framing is relayed verbatim.
_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate",
    "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade",
})
_REQUEST_DROP = (_HOP_BY_HOP - {"transfer-encoding", "trailer"}) | {"host"}
_REWRITTEN = frozenset({"location", "content-location", "www-authenticate"})


@dataclass
class Fault:
    """One rule.  ``remaining`` counts down per matching request; None never runs out."""

    pattern: re.Pattern[str]
    kind: str
    remaining: int | None
    params: dict[str, object]


@dataclass
class LogEntry:
    """One request as the client sent it, and what the proxy answered.

    The entry is logged as soon as the request head is read and updated as the
    answer goes out, so a client that saw a failure always finds its entry.
    """

    method: str
    path: str  # request target, query included
    range: str | None  # the client's Range header, before any ignore_range
    status: int | None = None  # None: no answer (refused, or upstream unreachable mid-way)
    bytes_sent: int = 0  # body bytes handed to the client socket
    fault: str | None = None  # kinds applied, joined with "+"


class _Conn:
    """A client connection and the upstream connection that serves it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.killed = threading.Event()
        self.upstream: http.client.HTTPConnection | None = None
        self.reset = False  # close with RST rather than FIN

    def kill(self) -> None:
        self.killed.set()
        self.reset = True
        # shutdown() rather than close(): it wakes the serving thread out of a
        # blocking recv/send, and that thread then does the (abortive) close.
        socks = [self.sock, self.upstream.sock if self.upstream else None]
        for sock in socks:
            if sock is None:
                continue
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class FaultProxy:
    """Threaded reverse proxy on 127.0.0.1 that forwards to one upstream.

    Use as a context manager (or call ``start``/``stop``).  ``host`` is
    "127.0.0.1:PORT", ``url`` is "http://127.0.0.1:PORT".
    """

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._log: list[LogEntry] = []
        self._conns: set[_Conn] = set()
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        bracketed = f"[{upstream_host}]" if ":" in upstream_host else upstream_host
        self._upstream_netloc = f"{bracketed}:{upstream_port}"
        origins = [f"http://{self._upstream_netloc}"]
        if upstream_port == 80:
            origins.append(f"http://{bracketed}")
        # The lookahead keeps "http://h:5000" from matching "http://h:50001".
        self._upstream_origin = re.compile(
            "(?:" + "|".join(map(re.escape, origins)) + r")(?![\w.:-])", re.IGNORECASE)
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True,
                                          name=f"faultproxy-{self.port}")

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> FaultProxy:
        self._acceptor.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
        try:
            # On Linux, shutdown() wakes a thread blocked in accept(); close() would not.
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        if self._acceptor.is_alive():
            self._acceptor.join(5)
        self.kill_connections()
        for thread in list(self._threads):
            thread.join(5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- rules and records -------------------------------------------------

    def add_fault(self, match: str, kind: str, times: int | None = 1, **params: object) -> Fault:
        """Apply ``kind`` to the next ``times`` requests whose target matches ``match``.

        ``match`` is searched (re.search) in the request target; ``times=None``
        applies to every matching request.  When several rules match one
        request, the first "refuse"/"status" rule wins alone; otherwise all
        matching rules apply together (the smallest cut wins).
        """
        if kind not in KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; known: {', '.join(KINDS)}")
        required, optional = KINDS[kind]
        if missing := required - params.keys():
            raise TypeError(f"{kind} needs {', '.join(sorted(missing))}")
        if unknown := params.keys() - required - optional.keys():
            raise TypeError(f"{kind} takes no {', '.join(sorted(unknown))}")
        fault = Fault(re.compile(match), kind, times, {**optional, **params})
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    @property
    def log(self) -> list[LogEntry]:
        """A snapshot of every request so far, oldest first."""
        with self._lock:
            return list(self._log)

    def log_for(self, match: str) -> list[LogEntry]:
        """The logged requests whose target matches ``match`` (re.search)."""
        pattern = re.compile(match)
        return [entry for entry in self.log if pattern.search(entry.path)]

    def clear_log(self) -> None:
        with self._lock:
            self._log.clear()

    def kill_connections(self) -> None:
        """Drop every open client connection (and its upstream connection)."""
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            conn.kill()

    def _take_faults(self, target: str) -> list[Fault]:
        with self._lock:
            matching = [f for f in self._faults
                        if f.remaining != 0 and f.pattern.search(target)]
            answers = [f for f in matching if f.kind in _ANSWERS]
            chosen = answers[:1] or matching
            for fault in chosen:
                if fault.remaining is not None:
                    fault.remaining -= 1
            return chosen

    # -- serving -----------------------------------------------------------

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return  # the listener was shut down by stop()
            # Heads and body pieces are separate small writes; Nagle would
            # hold the second behind the client's delayed ACK.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(sock)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True,
                                      name=f"faultproxy-{self.port}-conn")
            with self._lock:
                if self._stopping:
                    sock.close()
                    return
                self._conns.add(conn)
                self._threads = [t for t in self._threads if t.is_alive()] + [thread]
            thread.start()

    def _serve(self, conn: _Conn) -> None:
        rfile = conn.sock.makefile("rb")
        try:
            while not conn.killed.is_set() and self._exchange(conn, rfile):
                pass
        except (OSError, http.client.HTTPException, ValueError):
            conn.reset = True  # a half-sent answer must not look complete
        finally:
            if conn.upstream is not None:
                conn.upstream.close()
            rfile.close()  # the socket only really closes once its files are closed
            _close(conn.sock, reset=conn.reset)
            with self._lock:
                self._conns.discard(conn)

    def _exchange(self, conn: _Conn, rfile) -> bool:
        """Serve one request; return whether the client connection stays open."""
        try:
            if rfile.peek(1)[:1] == b"\x16":
                # A TLS ClientHello (a client trying https first, as dkr --insecure
                # does): hang up at once, as a plain-http server answers it quickly.
                return False
        except OSError:
            return False
        line = rfile.readline(65537)
        if not line:
            return False
        if not line.strip():
            return True  # a stray CRLF between requests is allowed (RFC 9112 2.2)
        try:
            method, target, version = line.decode("latin-1").split()
        except ValueError:
            _send_simple(conn.sock, 400, b"bad request line\n", {}, keep=False)
            return False
        headers = http.client.parse_headers(rfile)
        keep = version == "HTTP/1.1" and "close" not in headers.get("Connection", "").lower()

        entry = LogEntry(method, target, headers.get("Range"))
        faults = self._take_faults(target)
        entry.fault = "+".join(f.kind for f in faults) or None
        with self._lock:
            self._log.append(entry)
        params: dict[str, dict[str, object]] = {}
        for fault in faults:
            params.setdefault(fault.kind, fault.params)

        if "refuse" in params:
            return False
        body = _request_body(rfile, headers)
        if "status" in params:
            for _ in body:
                pass  # drain it so the connection can carry the next request
            p = params["status"]
            extra = {str(k): str(v) for k, v in dict(p["headers"] or {}).items()}
            if p["retry_after"] is not None:
                extra["Retry-After"] = str(p["retry_after"])
            payload = bytes(p["body"])
            entry.status = int(p["code"])
            entry.bytes_sent = 0 if method == "HEAD" else len(payload)
            _send_simple(conn.sock, entry.status, payload, extra, keep, head=method == "HEAD")
            return keep

        resp = self._forward(conn, method, target, headers, body, "ignore_range" in params)
        if resp is None:
            entry.status = 502
            _send_simple(conn.sock, 502, b"upstream unreachable\n", {}, keep=False)
            return False
        return self._relay(conn, entry, method, version, keep, resp, faults, params)

    def _forward(self, conn: _Conn, method: str, target: str, headers, body: Iterator[bytes],
                 strip_range: bool) -> http.client.HTTPResponse | None:
        """Send the request upstream and return its response, or None if that failed."""
        has_body = "Content-Length" in headers or "Transfer-Encoding" in headers
        # An idle keep-alive connection may have been closed by the upstream;
        # a bodyless request can safely be replayed once on a fresh one.
        for attempt in range(2):
            reused = conn.upstream is not None and conn.upstream.sock is not None
            if conn.upstream is None:
                conn.upstream = http.client.HTTPConnection(
                    self.upstream_host, self.upstream_port, timeout=60)
            up = conn.upstream
            try:
                up.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
                up.putheader("Host", self._upstream_netloc)
                for name, value in headers.items():
                    lname = name.lower()
                    if lname in _REQUEST_DROP or (strip_range and lname in ("range", "if-range")):
                        continue
                    up.putheader(name, value)
                up.endheaders()
                for chunk in body:
                    up.send(chunk)
                return up.getresponse()
            except (OSError, http.client.HTTPException):
                up.close()
                conn.upstream = None
                if conn.killed.is_set() or not reused or has_body or attempt:
                    return None
        return None

    def _relay(self, conn: _Conn, entry: LogEntry, method: str, version: str, keep: bool,
               resp: http.client.HTTPResponse, faults: list[Fault],
               params: dict[str, dict[str, object]]) -> bool:
        """Stream the upstream response to the client, applying body faults."""
        has_body = method != "HEAD" and resp.status not in (204, 304) and resp.status >= 200
        # http.client hands us the decoded body, so an unknown length is
        # re-framed as chunked (or delimited by close for HTTP/1.0 clients).
        chunked = has_body and resp.length is None and version == "HTTP/1.1"
        if has_body and resp.length is None and not chunked:
            keep = False

        head = [f"HTTP/1.1 {resp.status} {resp.reason}"]
        for name, value in resp.getheaders():
            lname = name.lower()
            if lname in _HOP_BY_HOP:
                continue
            if lname in _REWRITTEN:
                value = self._upstream_origin.sub(self.url, value)
            head.append(f"{name}: {value}")
        if chunked:
            head.append("Transfer-Encoding: chunked")
        if not keep:
            head.append("Connection: close")
        entry.status = resp.status
        conn.sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))

        cuts = [f for f in faults if f.kind in _CUTS]
        cut = min(cuts, key=lambda f: int(f.params["bytes"])) if cuts else None
        limit = int(cut.params["bytes"]) if cut else None
        rate = float(params["slow"]["rate"]) if "slow" in params else None
        corrupt_at = int(params["corrupt"]["offset"]) if "corrupt" in params else None
        # Small pieces when throttled, so the rate holds over short spans too.
        piece = CHUNK if rate is None else max(1, min(CHUNK, int(rate) // 10))

        sent = 0
        complete = not has_body
        started = time.monotonic()
        while has_body and (limit is None or sent < limit):
            data = resp.read1(piece if limit is None else min(piece, limit - sent))
            if not data:
                # read1 reports an early EOF of a sized body as b"", not as an error.
                complete = not resp.length
                break
            if corrupt_at is not None and sent <= corrupt_at < sent + len(data):
                data = bytearray(data)
                data[corrupt_at - sent] ^= 0xFF
            if rate is not None:
                # Wait before sending, so that even the last byte is not early.
                delay = started + (sent + len(data)) / rate - time.monotonic()
                if delay > 0 and conn.killed.wait(delay):
                    return False
            entry.bytes_sent = sent + len(data)
            conn.sock.sendall(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
            sent += len(data)

        if cut is not None:
            if cut.kind == "reset_after":
                # An abortive close drops whatever the kernel has not sent yet,
                # so wait until the client has the K bytes before resetting.
                _wait_delivered(conn.sock, conn.killed)
                conn.reset = True
            elif cut.kind == "stall_after":
                conn.killed.wait(float(cut.params["seconds"]))
            return False
        if not complete:
            conn.reset = True  # the upstream broke off: so must we
            return False
        # A sized body is only marked done (and its connection reusable) by read().
        resp.read()
        if chunked:
            conn.sock.sendall(b"0\r\n\r\n")
        return keep


def _request_body(rfile, headers) -> Iterator[bytes]:
    """Yield the client's request body as raw bytes, chunked framing included."""
    if "chunked" in headers.get("Transfer-Encoding", "").lower():
        while True:
            size_line = rfile.readline(65537)
            if not size_line:
                raise ValueError("client closed inside a chunked body")
            yield size_line
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            yield _read_exact(rfile, size + 2)  # data and its CRLF
        while True:  # trailer fields, up to the empty line
            line = rfile.readline(65537)
            if not line:
                raise ValueError("client closed inside a chunked trailer")
            yield line
            if not line.strip():
                return
    left = int(headers.get("Content-Length", "0") or 0)
    while left > 0:
        data = rfile.read1(min(CHUNK, left))
        if not data:
            raise ValueError("client closed inside the request body")
        left -= len(data)
        yield data


def _read_exact(rfile, n: int) -> bytes:
    data = rfile.read(n)
    if len(data) != n:
        raise ValueError("client closed inside a chunk")
    return data


def _send_simple(sock: socket.socket, code: int, body: bytes, headers: dict[str, str],
                 keep: bool, head: bool = False) -> None:
    try:
        reason = HTTPStatus(code).phrase
    except ValueError:
        reason = "Unknown"
    lines = [f"HTTP/1.1 {code} {reason}", f"Content-Length: {len(body)}"]
    if body:
        lines.append("Content-Type: text/plain")
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if not keep:
        lines.append("Connection: close")
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head else body))


def _wait_delivered(sock: socket.socket, stop: threading.Event, timeout: float = 10.0) -> None:
    """Wait until the peer has acknowledged everything written to ``sock``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not stop.is_set():
        try:
            # TIOCOUTQ is SIOCOUTQ on Linux: bytes not yet acknowledged by the peer.
            unacked = struct.unpack("i", fcntl.ioctl(sock, termios.TIOCOUTQ, b"\0" * 4))[0]
        except OSError:
            return
        if unacked == 0:
            return
        stop.wait(0.005)


def _close(sock: socket.socket, reset: bool) -> None:
    try:
        if reset:
            # Linger 0 makes close() send RST instead of FIN.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    sock.close()
