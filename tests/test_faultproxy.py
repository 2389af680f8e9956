"""The fault-injecting proxy, checked against a tiny Range-capable upstream."""

from __future__ import annotations

import http.client
import random
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dkr.testing.faultproxy import FaultProxy

BODY = random.Random(0).randbytes(3 * 1024 * 1024 + 17)


class _Upstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list[tuple[str, str, dict[str, str]]] = []  # (method, path, headers)

    def log_message(self, *args):
        pass

    def _record(self):
        _Upstream.seen.append((self.command, self.path, dict(self.headers.items())))

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        self._record()
        port = self.server.server_address[1]
        if self.path.split("?")[0] == "/blob":
            self._blob()
        elif self.path == "/redirect":
            self._empty(307, Location=f"http://127.0.0.1:{port}/blob?x=1")
        elif self.path == "/elsewhere":
            self._empty(307, Location=f"http://127.0.0.1:{port}1/blob")
        elif self.path == "/auth":
            self._empty(401, **{"WWW-Authenticate":
                                f'Bearer realm="http://127.0.0.1:{port}/token",service="r"'})
        elif self.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, 300_000, 70_000):
                piece = BODY[i:min(i + 70_000, 300_000)]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        else:
            self._empty(404)

    def do_POST(self):
        self._record()
        data = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _empty(self, code, **headers):
        self.send_response(code)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _blob(self):
        start, end, code = 0, len(BODY) - 1, 200
        if m := re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "")):
            start, code = int(m[1]), 206
            end = int(m[2]) if m[2] else end
        self.send_response(code)
        self.send_header("Content-Length", str(end + 1 - start))
        if code == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(BODY)}")
        self.end_headers()
        if self.command == "GET":
            view = memoryview(BODY)[start:end + 1]
            for i in range(0, len(view), 256 * 1024):
                self.wfile.write(view[i:i + 256 * 1024])


@pytest.fixture(scope="module")
def upstream():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture
def proxy(upstream):
    _Upstream.seen.clear()
    with FaultProxy("127.0.0.1", upstream) as p:
        yield p


def get(proxy, path="/blob", headers=None, timeout=10):
    conn = http.client.HTTPConnection(proxy.host, timeout=timeout)
    conn.request("GET", path, headers=headers or {})
    return conn, conn.getresponse()


def raw_get(proxy, path="/blob", extra=""):
    """Send a GET on a raw socket; return the socket and the response head."""
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {proxy.host}\r\n{extra}\r\n".encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        assert data, "closed before the response head"
        buf += data
    head, rest = buf.split(b"\r\n\r\n", 1)
    return sock, head.decode(), rest


def read_until_closed(sock, got=b""):
    """Read until EOF or error; return (bytes, how it ended)."""
    try:
        while data := sock.recv(65536):
            got += data
        return got, "eof"
    except ConnectionResetError:
        return got, "reset"


def test_pass_through_is_byte_exact_with_keep_alive(proxy, upstream):
    conn, resp = get(proxy)
    assert resp.status == 200 and resp.read() == BODY
    sock = conn.sock
    conn.request("HEAD", "/blob")
    resp = conn.getresponse()
    assert resp.getheader("Content-Length") == str(len(BODY)) and resp.read() == b""
    conn.request("POST", "/echo", body=b"hello" * 50_000)
    assert conn.getresponse().read() == b"hello" * 50_000
    assert conn.sock is sock  # all three on one client connection
    assert [s[2]["Host"] for s in _Upstream.seen] == [f"127.0.0.1:{upstream}"] * 3
    assert [(e.method, e.path, e.status, e.bytes_sent, e.fault) for e in proxy.log] == [
        ("GET", "/blob", 200, len(BODY), None),
        ("HEAD", "/blob", 200, 0, None),
        ("POST", "/echo", 200, 250_000, None),
    ]


def test_upstream_chunked_body_is_rechunked(proxy):
    with urllib.request.urlopen(proxy.url + "/chunked") as resp:
        assert resp.read() == BODY[:300_000]


def test_urls_pointing_at_upstream_are_rewritten(proxy, upstream):
    _, resp = get(proxy, "/redirect")
    assert resp.getheader("Location") == f"{proxy.url}/blob?x=1"
    _, resp = get(proxy, "/elsewhere")  # another port that merely starts alike
    assert resp.getheader("Location") == f"http://127.0.0.1:{upstream}1/blob"
    _, resp = get(proxy, "/auth")
    assert resp.status == 401
    assert resp.getheader("WWW-Authenticate") == f'Bearer realm="{proxy.url}/token",service="r"'
    with urllib.request.urlopen(proxy.url + "/redirect") as resp:  # followed through the proxy
        assert resp.read() == BODY


def test_range_is_forwarded_and_logged(proxy):
    _, resp = get(proxy, headers={"Range": "bytes=1000-"})
    assert resp.status == 206 and resp.read() == BODY[1000:]
    assert _Upstream.seen[-1][2]["Range"] == "bytes=1000-"
    assert proxy.log[-1].range == "bytes=1000-"


def test_ignore_range_strips_it(proxy):
    proxy.add_fault("/blob", "ignore_range")
    _, resp = get(proxy, headers={"Range": "bytes=1000-"})
    assert resp.status == 200 and resp.read() == BODY
    assert "Range" not in _Upstream.seen[-1][2]
    entry = proxy.log[-1]
    assert (entry.range, entry.fault, entry.status) == ("bytes=1000-", "ignore_range", 200)


def test_reset_after_sends_k_bytes_then_rst(proxy):
    proxy.add_fault("/blob", "reset_after", bytes=1_000_000)
    sock, head, rest = raw_get(proxy)
    assert head.startswith("HTTP/1.1 200") and f"Content-Length: {len(BODY)}" in head
    got, how = read_until_closed(sock, rest)
    assert (got, how) == (BODY[:1_000_000], "reset")
    # The resumed request passes through and shows in the log.
    _, resp = get(proxy, headers={"Range": "bytes=1000000-"})
    assert resp.read() == BODY[1_000_000:]
    assert [(e.range, e.fault, e.bytes_sent) for e in proxy.log_for("/blob")] == [
        (None, "reset_after", 1_000_000), ("bytes=1000000-", None, len(BODY) - 1_000_000)]


def test_truncate_after_closes_cleanly(proxy):
    proxy.add_fault("/blob", "truncate_after", bytes=5000)
    sock, head, rest = raw_get(proxy)
    assert f"Content-Length: {len(BODY)}" in head
    assert read_until_closed(sock, rest) == (BODY[:5000], "eof")
    proxy.add_fault("/blob", "truncate_after", bytes=0)
    with pytest.raises(http.client.IncompleteRead) as err:
        get(proxy)[1].read()
    assert err.value.partial == b""


def test_stall_after_pauses_then_closes(proxy):
    proxy.add_fault("/blob", "stall_after", bytes=3000, seconds=0.6)
    sock, _, got = raw_get(proxy)
    sock.settimeout(0.3)
    with pytest.raises(socket.timeout):
        while True:
            got += sock.recv(65536)
    assert got == BODY[:3000]
    sock.settimeout(5)
    assert read_until_closed(sock) == (b"", "eof")


def test_kill_connections_ends_a_stall(proxy):
    proxy.add_fault("/blob", "stall_after", bytes=10, seconds=60)
    sock, _, got = raw_get(proxy)
    while len(got) < 10:
        got += sock.recv(100)
    started = time.monotonic()
    proxy.kill_connections()
    got, _ = read_until_closed(sock, got)
    assert got == BODY[:10] and time.monotonic() - started < 5


def test_kill_connections_drops_idle_keep_alive(proxy):
    conn, resp = get(proxy)
    resp.read()
    proxy.kill_connections()
    assert read_until_closed(conn.sock)[0] == b""


@pytest.mark.parametrize("code,retry_after", [(503, 2), (429, None), (500, None)])
def test_status_answers_without_upstream(proxy, code, retry_after):
    proxy.add_fault("/blob", "status", code=code, retry_after=retry_after, body=b"nope")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(proxy.url + "/blob")
    assert err.value.code == code and err.value.read() == b"nope"
    assert err.value.headers.get("Retry-After") == (None if retry_after is None else "2")
    assert _Upstream.seen == []
    assert (proxy.log[-1].status, proxy.log[-1].fault) == (code, "status")


def test_status_keeps_the_connection_usable(proxy):
    proxy.add_fault("/blob", "status", code=401, headers={"WWW-Authenticate": "Basic"})
    conn, resp = get(proxy)
    assert resp.status == 401 and resp.getheader("WWW-Authenticate") == "Basic"
    resp.read()
    conn.request("GET", "/blob")
    assert conn.getresponse().read() == BODY


def test_refuse_closes_without_answer(proxy):
    proxy.add_fault("/blob", "refuse")
    with pytest.raises(http.client.RemoteDisconnected):
        get(proxy)
    assert (proxy.log[-1].status, proxy.log[-1].fault) == (None, "refuse")
    assert _Upstream.seen == []


def test_slow_throttles_the_body(proxy):
    proxy.add_fault("/blob", "slow", rate=400_000)
    started = time.monotonic()
    _, resp = get(proxy, headers={"Range": "bytes=0-199999"})
    assert resp.read() == BODY[:200_000]
    assert time.monotonic() - started >= 0.45  # 200 kB at 400 kB/s


def test_corrupt_flips_one_byte(proxy):
    proxy.add_fault("/blob", "corrupt", offset=123_457)
    got = get(proxy)[1].read()
    diff = [i for i in range(len(BODY)) if got[i] != BODY[i]] if len(got) == len(BODY) else None
    assert diff == [123_457] and got[123_457] == BODY[123_457] ^ 0xFF


def test_times_and_clear_faults(proxy):
    proxy.add_fault("/blob", "status", code=503, times=2)
    proxy.add_fault("/other", "status", code=500, times=None)
    assert [get(proxy)[1].status for _ in range(3)] == [503, 503, 200]
    assert [get(proxy, "/other")[1].status for _ in range(3)] == [500] * 3
    proxy.clear_faults()
    assert get(proxy, "/other")[1].status == 404


def test_answer_rule_wins_over_body_rules(proxy):
    proxy.add_fault("/blob", "corrupt", offset=0)
    proxy.add_fault("/blob", "status", code=503)
    assert get(proxy)[1].status == 503
    assert get(proxy)[1].read()[0] == BODY[0] ^ 0xFF  # the corrupt rule was not used up


def test_rules_combine(proxy):
    proxy.add_fault("/blob", "ignore_range")
    proxy.add_fault("/blob", "truncate_after", bytes=100)
    sock, head, rest = raw_get(proxy, extra="Range: bytes=50-\r\n")
    assert head.startswith("HTTP/1.1 200")
    assert read_until_closed(sock, rest) == (BODY[:100], "eof")
    assert proxy.log[-1].fault == "ignore_range+truncate_after"


def test_bad_rules_are_rejected(proxy):
    with pytest.raises(ValueError):
        proxy.add_fault("/", "explode")
    with pytest.raises(TypeError):
        proxy.add_fault("/", "reset_after")
    with pytest.raises(TypeError):
        proxy.add_fault("/", "slow", rate=1, bytes=3)


def test_unreachable_upstream_gives_502():
    spare = socket.create_server(("127.0.0.1", 0))
    port = spare.getsockname()[1]
    spare.close()
    with FaultProxy("127.0.0.1", port) as proxy:
        assert get(proxy)[1].status == 502
