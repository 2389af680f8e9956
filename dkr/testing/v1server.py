"""A small, faithful Docker Registry v1 index + registry for tests.

No maintained v1 server exists any more, so tests carry this one.  It speaks
the protocol the way systemd's import-dkr.c pulled it:

    GET https://INDEX/v1/repositories/NS/REPO/images   (X-Docker-Token: true)
        -> X-Docker-Token, X-Docker-Endpoints, body [{"id": ...}, ...]
    GET https://REG/v1/repositories/NS/REPO/tags/TAG   -> "ID"
    GET https://REG/v1/images/ID/ancestry              -> [ID, parent, ..., base]
    GET https://REG/v1/images/ID/json                  -> image JSON
    GET https://REG/v1/images/ID/layer                 -> tar (plain or gzip)

Index and registry listen on separate loopback ports, so following
X-Docker-Endpoints is a real hop, and both use TLS from a throw-away CA
(``.ca_file``) because v1 registries were only ever reached over https.

Every fault a v1 client must survive is a plain attribute on the server (see
``reset_faults``).  Per-request knobs are dicts or sets whose keys select the
requests they hit, most specific first: the request path
(``"/v1/images/ID/layer"``), an image id (ancestry/json/layer steps), or a
step name (``"images"``, ``"tags"``, ``"ancestry"``, ``"json"``, ``"layer"``).
"""

from __future__ import annotations

import datetime
import gzip
import hashlib
import ipaddress
import json
import os
import re
import secrets
import socket
import ssl
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from http.client import HTTPMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import TCPServer
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["V1Server", "Request", "Image", "ANCESTRY_FAULTS", "STEPS"]

STEPS = ("images", "tags", "ancestry", "json", "layer")
ANCESTRY_FAULTS = ("duplicate", "empty", "too_long", "foreign_first", "reversed")

# The seed refused ancestries longer than this; "too_long" goes one past it.
MAX_ANCESTRY = 2048

_HANDSHAKE_TIMEOUT = 10.0
_CHUNK = 256 * 1024

_ROUTES = {
    "index": [("images", re.compile(r"/v1/repositories/(?P<name>.+)/images"))],
    "registry": [
        ("tags", re.compile(r"/v1/repositories/(?P<name>.+)/tags/(?P<tag>[^/]+)")),
        ("ancestry", re.compile(r"/v1/images/(?P<id>[^/]+)/ancestry")),
        ("json", re.compile(r"/v1/images/(?P<id>[^/]+)/json")),
        ("layer", re.compile(r"/v1/images/(?P<id>[^/]+)/layer")),
    ],
}


@dataclass(frozen=True)
class Request:
    """One request as the server saw it; ``headers`` is case-insensitive."""

    server: str  # "index" or "registry"
    method: str
    path: str  # without the query string
    headers: HTTPMessage


@dataclass
class Image:
    """One v1 image (= one layer plus its metadata)."""

    id: str
    parent: str | None
    tar: bytes  # the uncompressed layer, as given to add_image
    layer: bytes  # the bytes served at /layer (tar, or gzip of it)
    json: dict = field(default_factory=dict)


def _make_tls(directory: str) -> tuple[str, str, str]:
    """Write a throw-away CA and a server cert for 127.0.0.1/localhost.

    EC P-256 keeps generation in the millisecond range, so every server can
    have its own CA and no test trusts another test's certificates.  The key
    identifier extensions are there because strict X.509 verification
    (Python >= 3.13 default, recent OpenSSL) insists on them.
    """
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(days=1), now + datetime.timedelta(days=7)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dkr v1 test CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False,
                key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(
            x509.SubjectAlternativeName([
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            ]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    pem = serialization.Encoding.PEM
    paths = [os.path.join(directory, n) for n in ("ca.pem", "server.pem", "server.key")]
    with open(paths[0], "wb") as f:
        f.write(ca_cert.public_bytes(pem))
    with open(paths[1], "wb") as f:
        f.write(cert.public_bytes(pem))
    with open(paths[2], "wb") as f:
        f.write(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return paths[0], paths[1], paths[2]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the registries curl talked to
    server_version = "dkr-v1-testserver"

    def do_GET(self) -> None:
        self.server.owner._dispatch(self)

    def log_message(self, format, *args) -> None:  # noqa: A002 - stdlib signature
        pass  # tests assert on .requests, not on stderr noise


class _TLSServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, owner: V1Server, role: str, context: ssl.SSLContext):
        self.owner, self.role, self.context = owner, role, context
        self.connections: set[ssl.SSLSocket] = set()
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls getfqdn(), a reverse DNS lookup that
        # can stall for seconds in a sandbox; the name is never used here.
        TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def finish_request(self, request, client_address) -> None:
        # TLS is set up here, in the per-connection thread, rather than on
        # the listening socket: a client that connects and never completes a
        # handshake must not block accept() for everyone else.
        request.settimeout(_HANDSHAKE_TIMEOUT)
        try:
            conn = self.context.wrap_socket(request, server_side=True)
        except OSError as exc:
            self.owner.errors.append(exc)
            return
        conn.settimeout(None)
        with self.lock:
            self.connections.add(conn)
        try:
            self.RequestHandlerClass(conn, client_address, self)
        except OSError as exc:  # the client went away mid-response: its business
            self.owner.errors.append(exc)
        finally:
            with self.lock:
                self.connections.discard(conn)
            conn.close()

    def handle_error(self, request, client_address) -> None:
        self.owner.errors.append(sys.exc_info()[1])

    def drop_connections(self) -> None:
        # Idle keep-alive connections park a thread in readline(); shutting
        # the sockets down wakes them so close() leaves nothing behind.
        with self.lock:
            conns = list(self.connections)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class V1Server:
    """Docker v1 index + registry on two loopback HTTPS ports.

    Use as a context manager (or ``start()``/``close()``)::

        with V1Server() as srv:
            ids = srv.add_image("library/busybox", "latest", [tar_bytes])
            ... pull from srv.index_url, trusting srv.ca_file ...
            assert srv.requests[-1].headers["Authorization"].startswith("Token ")
    """

    def __init__(self, *, require_token: bool = True):
        self._tmp = tempfile.TemporaryDirectory(prefix="dkr-v1srv-")
        self.ca_file, cert_file, key_file = _make_tls(self._tmp.name)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_file, key_file)

        self.images: dict[str, Image] = {}
        self.repos: dict[str, dict[str, str]] = {}  # name -> {tag: image id}
        self.tokens: dict[str, str] = {}  # token issued by the index -> repo name
        self.requests: list[Request] = []
        self.errors: list[BaseException] = []  # connection-level trouble, for debugging

        # Not reset by reset_faults(): it is how the registry is set up.
        self.require_token = require_token  # False: ignore Authorization entirely
        self.reset_faults()

        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._index = _TLSServer(self, "index", context)
        self._registry = _TLSServer(self, "registry", context)
        self.index_host = "127.0.0.1:%d" % self._index.server_port
        self.registry_host = "127.0.0.1:%d" % self._registry.server_port
        self.index_url = "https://" + self.index_host
        self.registry_url = "https://" + self.registry_host

    def reset_faults(self) -> None:
        """Put every fault knob (not ``require_token``) back to healthy."""
        # Index answer to /images:
        self.omit_token = False  # no X-Docker-Token header even when asked for
        self.omit_endpoints = False  # no X-Docker-Endpoints header
        self.endpoints: str | None = None  # raw X-Docker-Endpoints value instead of registry_host
        # Registry:
        self.ancestry_fault: str | None = None  # one of ANCESTRY_FAULTS
        # Per-request knobs, keyed by path, image id or step name:
        self.status: dict[str, int] = {}  # answer with this HTTP status instead
        self.payload: dict[str, object] = {}  # serve this JSON value instead
        self.malformed: set[str] = set()  # cut the JSON body in half
        self.nul_byte: set[str] = set()  # put a raw NUL byte inside the JSON
        self.truncate: dict[str, int] = {}  # send only N body bytes, then close
        self.delay: dict[str, float] = {}  # stall this long after half the body

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> V1Server:
        for srv in (self._index, self._registry):
            t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                                 name="v1server-" + srv.role, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def close(self) -> None:
        self._stopping.set()  # releases responses stalled by .delay
        for srv in (self._index, self._registry):
            if self._threads:
                srv.shutdown()
            srv.drop_connections()
            srv.server_close()
        for t in self._threads:
            t.join()
        self._threads.clear()
        self._tmp.cleanup()

    def __enter__(self) -> V1Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- content -----------------------------------------------------------

    def add_image(self, name: str, tag: str, layers: list[bytes], gzip_layers: bool = False,
                  config: dict | None = None, chosen_ids: list[str] | None = None) -> list[str]:
        """Publish ``name:tag`` built from tar ``layers`` (base first).

        Returns the image ids, base first; the last one is what the tag
        points at.  Ids are sha256 over the parent id, the compression and
        the layer, so equal stacks share ids across images and tests; or
        ``chosen_ids``, as a hostile server picks them.
        """
        if not layers:
            raise ValueError("an image needs at least one layer")
        config = {"Cmd": ["/bin/sh"], "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]} \
            if config is None else config
        ids: list[str] = []
        parent = None
        for n, tar in enumerate(layers):
            mode = "gzip" if gzip_layers else "tar"
            image_id = chosen_ids[n] if chosen_ids else \
                hashlib.sha256(f"{parent or ''}\n{mode}\n".encode() + tar).hexdigest()
            if image_id not in self.images:
                served = gzip.compress(tar, compresslevel=6, mtime=0) if gzip_layers else tar
                created = datetime.datetime(2015, 1, 1, tzinfo=datetime.timezone.utc) \
                    + datetime.timedelta(seconds=n)
                meta = {
                    "id": image_id,
                    "created": created.isoformat().replace("+00:00", "Z"),
                    "container_config": {"Cmd": ["/bin/sh", "-c", f"#(nop) layer {n}"]},
                    "config": config,
                    "docker_version": "1.3.0",
                    "architecture": "amd64",
                    "os": "linux",
                    "Size": len(tar),
                }
                if parent:
                    meta["parent"] = parent
                self.images[image_id] = Image(image_id, parent, tar, served, meta)
            ids.append(image_id)
            parent = image_id
        self.repos.setdefault(name, {})[tag] = ids[-1]
        return ids

    def ancestry(self, image_id: str) -> list[str]:
        """The true ancestry: the image first, its base last."""
        chain = []
        while image_id is not None:
            chain.append(image_id)
            image_id = self.images[image_id].parent
        return chain

    def repo_images(self, name: str) -> list[str]:
        """Every image id reachable from one of the repository's tags."""
        seen: dict[str, None] = {}
        for top in self.repos.get(name, {}).values():
            seen.update(dict.fromkeys(self.ancestry(top)))
        return list(seen)

    # -- serving -----------------------------------------------------------

    def _dispatch(self, h: _Handler) -> None:
        path = urlsplit(h.path).path
        role = h.server.role
        self.requests.append(Request(role, h.command, path, h.headers))
        for step, pattern in _ROUTES[role]:
            m = pattern.fullmatch(path)
            if m:
                break
        else:
            return self._error(h, 404, "not found", step=None, path=path, ident=None)
        args = m.groupdict()
        ident = args.get("id")

        if role == "registry" and not self._authorized(h, args.get("name"), ident):
            return self._error(h, 401, "requires authorization", step, path, ident)
        injected = self._knob(self.status, step, path, ident)
        if injected is not None:
            return self._error(h, injected, f"injected HTTP {injected}", step, path, ident)

        headers: dict[str, str] = {}
        if step == "images":
            name = args["name"]
            if name not in self.repos:
                return self._error(h, 404, "repository not found", step, path, ident)
            if h.headers.get("X-Docker-Token", "").lower() == "true" and not self.omit_token:
                # The real index signed a random nonce; the client only ever
                # echoes the whole value back, so a random signature will do.
                token = f'signature={secrets.token_hex(20)},repository="{name}",access=read'
                self.tokens[token] = name
                headers["X-Docker-Token"] = token
            if not self.omit_endpoints:
                headers["X-Docker-Endpoints"] = \
                    self.registry_host if self.endpoints is None else self.endpoints
            value: object = [{"id": i} for i in self.repo_images(name)]
        elif step == "tags":
            image_id = self.repos.get(args["name"], {}).get(args["tag"])
            if image_id is None:
                return self._error(h, 404, "tag not found", step, path, ident)
            value = image_id
        else:
            image = self.images.get(ident)
            if image is None:
                return self._error(h, 404, "image not found", step, path, ident)
            if step == "layer":
                return self._send(h, 200, image.layer, {}, "application/octet-stream",
                                  step, path, ident)
            if step == "json":
                value = image.json
                headers["X-Docker-Size"] = str(len(image.tar))
            else:
                value = self._faulty_ancestry(self.ancestry(ident))
        self._send_json(h, value, headers, step, path, ident)

    def _authorized(self, h: _Handler, name: str | None, image_id: str | None) -> bool:
        if not self.require_token:
            return True
        auth = h.headers.get("Authorization", "")
        if not auth.startswith("Token "):
            return False
        repo = self.tokens.get(auth[len("Token "):])
        if repo is None:
            return False
        if name is not None:
            return repo == name
        # A token is scoped to one repository; images outside it are refused,
        # unknown ones fall through to an honest 404.
        return image_id not in self.images or image_id in self.repo_images(repo)

    def _faulty_ancestry(self, chain: list[str]) -> list[str]:
        fault = self.ancestry_fault
        if fault is None:
            return chain
        if fault == "duplicate":
            return chain + [chain[-1]]
        if fault == "empty":
            return []
        if fault == "too_long":
            # Unique, well-formed ids, so length is the only thing wrong.
            fillers = (hashlib.sha256(b"filler %d" % i).hexdigest()
                       for i in range(MAX_ANCESTRY + 1 - len(chain)))
            return chain + list(fillers)
        if fault == "foreign_first":
            return [hashlib.sha256(b"foreign").hexdigest()] + chain[1:]
        if fault == "reversed":
            return chain[::-1]
        raise ValueError(f"unknown ancestry_fault {fault!r}; choose from {ANCESTRY_FAULTS}")

    @staticmethod
    def _knob(knobs, step, path, ident, default=None):
        """Look a request up in a knob dict/set: path, then image id, then step."""
        for key in (path, ident, step):
            if key is not None and key in knobs:
                return knobs[key] if isinstance(knobs, dict) else True
        return default

    def _send_json(self, h, value, headers, step, path, ident) -> None:
        # Key membership decides, so None (JSON null) is a valid override too.
        value = self._knob(self.payload, step, path, ident, default=value)
        body = json.dumps(value).encode()
        if self._knob(self.malformed, step, path, ident):
            body = body[: len(body) // 2]
        if self._knob(self.nul_byte, step, path, ident):
            # Inside a string where there is one, so a parser that stops at
            # NUL (C strings) would still see something plausible.
            body = body.replace(b'"', b'"\x00', 1) if b'"' in body else body + b"\x00"
        self._send(h, 200, body, headers, "application/json", step, path, ident)

    def _error(self, h, status, message, step, path, ident) -> None:
        body = json.dumps({"error": message}).encode()
        self._send(h, status, body, {}, "application/json", step, path, ident)

    def _send(self, h, status, body, headers, content_type, step, path, ident) -> None:
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(body)))  # the full length, even when truncating
        if h.server.role == "registry":
            h.send_header("X-Docker-Registry-Version", "0.6.0")
        for k, v in headers.items():
            h.send_header(k, v)
        h.end_headers()

        cut = self._knob(self.truncate, step, path, ident)
        delay = self._knob(self.delay, step, path, ident)
        if cut is not None:
            body = body[:cut]
            # Closing is what makes it a truncation rather than a stall.
            h.close_connection = True
        if delay:
            half = len(body) // 2
            self._write(h, body[:half])
            if self._stopping.wait(delay):
                h.close_connection = True
                return
            body = body[half:]
        self._write(h, body)
        if cut is not None:
            self._close_notify(h)

    @staticmethod
    def _close_notify(h) -> None:
        # A clean TLS close, so the only thing wrong is the short body and a
        # client has to notice it from Content-Length, not from a TLS error.
        h.connection.settimeout(2)
        try:
            h.connection.unwrap()
        except (OSError, ValueError):
            pass

    @staticmethod
    def _write(h, data: bytes) -> None:
        view = memoryview(data)
        for off in range(0, len(view), _CHUNK):
            h.wfile.write(view[off:off + _CHUNK])
        h.wfile.flush()
