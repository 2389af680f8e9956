"""A real registry for tests, demos and benchmarks.

`Registry` runs Debian's ``docker-registry`` (CNCF distribution 2.8) on a free
loopback port with its storage in a temporary directory, optionally behind
htpasswd or token auth and/or TLS, and pushes blobs and manifests through the
registry's own HTTP API.  Nothing here depends on the dkr code under test.

`TestCA` makes throw-away certificates; the v1 test server, the fault proxy
and the token server can use it too.
"""

from __future__ import annotations

import base64
import ctypes
import ctypes.util
import datetime
import hashlib
import http.client
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.parse
import weakref
from pathlib import Path

__all__ = ["Registry", "RegistryError", "TestCA", "bcrypt_hash", "free_port",
           "sha256_digest", "file_digest"]

REGISTRY_BIN = "docker-registry"

# Big enough that Python is not the bottleneck when pushing multi-GB layers,
# small enough not to matter for memory.
CHUNK = 1 << 20


class RegistryError(RuntimeError):
    """The registry process or one of its answers was not what we expected."""


# --------------------------------------------------------------------------
# small helpers


def free_port() -> int:
    """A loopback port that was free a moment ago (the caller retries on a race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def file_digest(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _libcrypt():
    name = ctypes.util.find_library("crypt") or "libcrypt.so.1"
    lib = ctypes.CDLL(name)
    lib.crypt.restype = ctypes.c_char_p
    lib.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    lib.crypt_gensalt.restype = ctypes.c_char_p
    lib.crypt_gensalt.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_int]
    return lib


def bcrypt_hash(password: str, cost: int = 5) -> str:
    """A ``$2b$`` bcrypt hash, the only scheme distribution's htpasswd accepts.

    Debian 12 has no bcrypt in openssl and ``htpasswd`` lives in the optional
    apache2-utils, but libxcrypt (``libcrypt1``, an essential package) does
    bcrypt; calling it through ctypes keeps working after Python 3.13 drops
    the ``crypt`` module.  A low cost keeps registry logins fast in tests.
    """
    lib = _libcrypt()
    salt = lib.crypt_gensalt(b"$2b$", cost, None, 0)
    if not salt:
        raise RegistryError("libcrypt cannot make a bcrypt salt")
    out = lib.crypt(password.encode(), salt)
    if not out or not out.startswith(b"$2b$"):
        raise RegistryError("libcrypt cannot hash with bcrypt")
    return out.decode()


# --------------------------------------------------------------------------
# TLS


class TestCA:
    """A throw-away certificate authority written under `directory`.

    ``ca.pem`` is what clients trust (`cert_path`); `issue()` makes server
    certificates for loopback names.
    """

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, directory, name: str = "dkr test CA"):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.cert_path = self.directory / "ca.pem"
        self.cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, name: str = "server", hosts=("127.0.0.1", "localhost", "::1"),
              client: bool = False):
        """Write NAME.pem / NAME-key.pem for `hosts`; returns (cert_path, key_path).
        ``client``: a client certificate (mutual TLS) instead of a server's."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        sans = []
        for h in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                sans.append(x509.DNSName(h))
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client
                                                  else ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(self.key, hashes.SHA256())
        )
        cert_path = self.directory / f"{name}.pem"
        key_path = self.directory / f"{name}-key.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        key_path.chmod(0o600)
        return cert_path, key_path

    def server_context(self, name: str = "server", hosts=("127.0.0.1", "localhost", "::1")):
        """An `ssl.SSLContext` for a Python test server presenting a fresh certificate."""
        cert_path, key_path = self.issue(name, hosts)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert_path, key_path)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert_path))


# --------------------------------------------------------------------------
# HTTP client with registry auth


def _parse_challenge(header: str):
    """('basic'|'bearer', {param: value}) from a WWW-Authenticate header."""
    scheme, _, rest = header.strip().partition(" ")
    params = dict(re.findall(r'(\w+)="([^"]*)"', rest))
    return scheme.lower(), params


class _Client:
    """Just enough of a registry client to push: answers Basic and Bearer challenges.

    Uses `http.client` directly (not `urllib.request`) so that redirects are
    never followed, big bodies stream from files in large blocks, and the TLS
    context is ours.
    """

    def __init__(self, base_url: str, credentials=None, ca_file=None, answer_challenges=True,
                 client_cert=None):
        self.base = urllib.parse.urlsplit(base_url)
        self.answer_challenges = answer_challenges
        self.credentials = credentials
        self.ssl_context = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None
        if client_cert:
            self.ssl_context = self.ssl_context or ssl.create_default_context()
            self.ssl_context.load_cert_chain(*map(str, client_cert))
        self.basic = False
        self.tokens: dict[str, str] = {}   # scope -> bearer token

    def _connect(self, parts):
        if parts.scheme == "https":
            ctx = self.ssl_context or ssl.create_default_context()
            return http.client.HTTPSConnection(parts.hostname, parts.port, context=ctx,
                                               blocksize=CHUNK, timeout=120)
        return http.client.HTTPConnection(parts.hostname, parts.port, blocksize=CHUNK, timeout=120)

    def _basic_header(self):
        user, password = self.credentials
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def _auth_header(self, scope):
        if self.basic and self.credentials:
            return self._basic_header()
        if scope in self.tokens:
            return "Bearer " + self.tokens[scope]
        return None

    def _fetch_token(self, params, scope):
        realm = urllib.parse.urlsplit(params["realm"])
        query = {"service": params.get("service", "")}
        if scope:
            query["scope"] = scope
        conn = self._connect(realm)
        headers = {}
        if self.credentials:
            headers["Authorization"] = self._basic_header()
        try:
            sep = "&" if realm.query else ""
            conn.request("GET", f"{realm.path or '/'}?{realm.query}{sep}{urllib.parse.urlencode(query)}",
                         headers=headers)
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        if resp.status != 200:
            raise RegistryError(f"token server {params['realm']} answered {resp.status} for scope {scope!r}")
        answer = json.loads(body)
        return answer.get("token") or answer["access_token"]

    def request(self, method, target, body=None, headers=None, scope=None, ok=(200, 201, 202, 204)):
        """(status, headers, body) for `target` (a path or an absolute URL).

        `body` may be bytes or an open binary file (rewound for a retry after
        a 401).  Raises RegistryError for a status outside `ok`.
        """
        parts = urllib.parse.urlsplit(urllib.parse.urljoin(self.base.geturl(), target))
        path = parts.path + ("?" + parts.query if parts.query else "")
        for attempt in range(2):
            hdrs = dict(headers or {})
            auth = self._auth_header(scope)
            if auth:
                hdrs["Authorization"] = auth
            if hasattr(body, "seek"):
                body.seek(0)
                hdrs.setdefault("Content-Length", str(os.fstat(body.fileno()).st_size))
            elif body is not None:
                hdrs.setdefault("Content-Length", str(len(body)))
            conn = self._connect(parts)
            try:
                conn.request(method, path, body=body, headers=hdrs)
                resp = conn.getresponse()
                data = resp.read()
            finally:
                conn.close()
            if resp.status == 401 and attempt == 0 and self._answer_challenge(resp, scope):
                continue
            break
        if resp.status not in ok:
            raise RegistryError(f"{method} {path}: HTTP {resp.status}: {data[:500]!r}")
        return resp.status, resp.headers, data

    def _answer_challenge(self, resp, scope) -> bool:
        if not self.answer_challenges:
            return False
        scheme, params = _parse_challenge(resp.headers.get("WWW-Authenticate", ""))
        if scheme == "basic" and self.credentials:
            self.basic = True
            return True
        if scheme == "bearer" and "realm" in params:
            self.tokens[scope] = self._fetch_token(params, params.get("scope", scope))
            return True
        return False


# --------------------------------------------------------------------------
# the registry


class Registry:
    """``docker-registry serve`` on 127.0.0.1:PORT with storage in a temp dir.

    auth: None, ("htpasswd", {"user": "password", ...}) or ("token", TokenServer).
    tls:  False, True (a fresh `TestCA`; `.ca_file`), or a `TestCA` to reuse — pass
          the same one to an https TokenServer (`ca.server_context()`), since
          the push client trusts only this CA.
    push_credentials: (user, password) the push helpers use; defaults to the
    first htpasswd user, or the first user of the token server.
    proxy_of: the URL of a registry this one is a pull-through cache of
    (distribution's ``proxy: remoteurl:``); it then takes no pushes.
    client_cas: CA files whose client certificates the server demands (mutual
    TLS, ``http.tls.clientcas``); the push helpers present ``client_cert``.
    """

    def __init__(self, auth=None, tls=False, push_credentials=None, workdir=None,
                 log_level="info", start=True, redirect_blobs_to=None, link=None,
                 proxy_of=None, client_cas=(), client_cert=None):
        self.auth = auth
        self.proxy_of = proxy_of
        self.client_cas = [str(p) for p in client_cas]
        self.client_cert = client_cert      # (cert_path, key_path) the helpers present
        # A ShapedLink (dkr.testing.link): serve from inside its namespace, reached over it.
        self.link = link
        self.address = link.server_address if link else "127.0.0.1"
        # Base URL of a server that serves the storage directory: blob GETs are
        # then redirected there (the registry's "redirect" storage middleware).
        self.redirect_blobs_to = redirect_blobs_to
        self.workdir = Path(tempfile.mkdtemp(prefix="dkr-registry-", dir=workdir))
        self.storage = self.workdir / "storage"
        self.config_path = self.workdir / "config.yml"
        self.log_path = self.workdir / "registry.log"
        self.log_level = log_level
        self.proc: subprocess.Popen | None = None
        self.port = None
        self.ca = None
        self.ca_file = None
        self.cert_path = self.key_path = None
        if tls:
            self.ca = tls if isinstance(tls, TestCA) else TestCA(self.workdir / "tls")
            self.ca_file = self.ca.cert_path
            self.cert_path, self.key_path = self.ca.issue("registry")
        self.push_credentials = push_credentials or self._default_credentials()
        self._client = None
        # If a caller forgets stop(), still kill the server and remove the
        # temp dir at GC or interpreter exit.
        self._proc_box = [None]
        self._finalizer = weakref.finalize(self, _cleanup, self._proc_box, str(self.workdir))
        if start:
            self.start()

    # -- configuration --------------------------------------------------

    def _default_credentials(self):
        if not self.auth:
            return None
        kind, arg = self.auth
        users = arg if kind == "htpasswd" else getattr(arg, "users", {})
        return next(iter(users.items()), None)

    def _auth_config(self):
        if not self.auth:
            return None
        kind, arg = self.auth
        if kind == "htpasswd":
            path = self.workdir / "htpasswd"
            path.write_text("".join(f"{u}:{bcrypt_hash(p)}\n" for u, p in arg.items()))
            return {"htpasswd": {"realm": "dkr-test-registry", "path": str(path)}}
        if kind == "token":
            return {"token": {"realm": arg.realm, "service": arg.service,
                              "issuer": arg.issuer, "rootcertbundle": str(arg.cert_path)}}
        raise ValueError(f"unknown auth kind {kind!r}")

    def _write_config(self):
        config = {
            "version": "0.1",
            "log": {"level": self.log_level, "formatter": "text",
                    "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage)},
                "delete": {"enabled": True},
                # The filesystem driver cannot redirect anyway; say so explicitly.
                "redirect": {"disable": True},
                "cache": {"blobdescriptor": "inmemory"},
                # Keep the registry from doing background work during benchmarks.
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {
                "addr": f"{self.address}:{self.port}",
                "secret": secrets.token_hex(16),
                "headers": {"X-Content-Type-Options": ["nosniff"]},
            },
            "health": {"storagedriver": {"enabled": False}},
        }
        if self.cert_path:
            config["http"]["tls"] = {"certificate": str(self.cert_path), "key": str(self.key_path)}
            if self.client_cas:
                config["http"]["tls"]["clientcas"] = self.client_cas
        if self.proxy_of:
            config["proxy"] = {"remoteurl": self.proxy_of}
        auth = self._auth_config()
        if auth:
            config["auth"] = auth
        if self.redirect_blobs_to:
            del config["storage"]["redirect"]
            config["middleware"] = {"storage": [
                {"name": "redirect", "options": {"baseurl": self.redirect_blobs_to}}]}
        # JSON is valid YAML, and avoids needing a YAML writer.
        self.config_path.write_text(json.dumps(config, indent=2))

    # -- lifecycle -------------------------------------------------------

    @property
    def scheme(self):
        return "https" if self.cert_path else "http"

    @property
    def host(self) -> str:
        return f"{self.address}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}"

    def start(self, timeout: float = 20.0):
        """Start the server (the constructor does, unless told not to); once is enough:
        a second call must not leave the first server running untracked."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        if shutil.which(REGISTRY_BIN) is None:
            raise RegistryError(f"{REGISTRY_BIN} not found (Debian package docker-registry)")
        # free_port() can race with another process; retry with a new port.
        for _ in range(5):
            self.port = free_port()
            self._write_config()
            # REGISTRY_* variables would override our config file.
            env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
            log = open(self.log_path, "ab")
            argv = [REGISTRY_BIN, "serve", str(self.config_path)]
            self.proc = subprocess.Popen(
                self.link.command(argv) if self.link else argv,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=env, start_new_session=True)
            log.close()
            self._proc_box[0] = self.proc
            if self._wait_ready(timeout):
                return self
            if b"address already in use" not in self.log_path.read_bytes():
                tail = self.log_path.read_bytes()[-2000:].decode(errors="replace")
                self.stop(remove=False)
                raise RegistryError(f"docker-registry did not come up; log {self.log_path}:\n{tail}")
        raise RegistryError("no free port for docker-registry")

    def _wait_ready(self, timeout) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                status = self.get("/v2/", auth=False)[0]
                if status in (200, 401):
                    return True
            except (OSError, http.client.HTTPException):
                pass
            time.sleep(0.05)
        self.proc.kill()
        self.proc.wait()
        return False

    def stop(self, remove: bool = True):
        """Kill the registry and (unless remove=False) delete its temp dir."""
        _kill(self.proc)
        if remove:
            self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    # -- HTTP ------------------------------------------------------------

    @property
    def client(self) -> _Client:
        if self._client is None:
            self._client = _Client(self.url, self.push_credentials, self.ca_file,
                                   client_cert=self.client_cert)
        return self._client

    def ssl_context(self):
        return ssl.create_default_context(cafile=str(self.ca_file)) if self.ca_file else None

    def get(self, path, headers=None, auth=True):
        """(status, headers, body) of a GET; with auth=False, no credentials at all."""
        if auth:
            return self.client.request("GET", path, headers=headers, ok=range(100, 600),
                                       scope=_scope_for(path, "pull"))
        return _Client(self.url, None, self.ca_file, answer_challenges=False,
                       client_cert=self.client_cert).request(
            "GET", path, headers=headers, ok=range(100, 600))

    def blob_exists(self, repo: str, digest: str) -> bool:
        status = self.client.request("HEAD", f"/v2/{repo}/blobs/{digest}", ok=range(100, 600),
                                     scope=_push_scope(repo))[0]
        return status == 200

    def push_blob(self, repo: str, data, digest: str | None = None) -> str:
        """Upload bytes or the file at path `data` as one blob; returns its digest.

        A file is streamed (hashed first unless `digest` is given, then sent
        in 1 MiB blocks), never read whole.  Blobs already present are skipped.
        """
        is_bytes = isinstance(data, (bytes, bytearray, memoryview))
        if digest is None:
            digest = sha256_digest(data) if is_bytes else file_digest(data)
        scope = _push_scope(repo)
        if self.blob_exists(repo, digest):
            return digest
        _, headers, _ = self.client.request("POST", f"/v2/{repo}/blobs/uploads/", body=b"",
                                            scope=scope, ok=(202,))
        location = headers["Location"]
        sep = "&" if "?" in location else "?"
        target = f"{location}{sep}digest={urllib.parse.quote(digest)}"
        hdrs = {"Content-Type": "application/octet-stream"}
        if is_bytes:
            self.client.request("PUT", target, body=bytes(data), headers=hdrs, scope=scope, ok=(201,))
        else:
            with open(data, "rb") as f:
                self.client.request("PUT", target, body=f, headers=hdrs, scope=scope, ok=(201,))
        return digest

    def push_manifest(self, repo: str, ref: str, body: bytes, media_type: str) -> str:
        """PUT a manifest or index under a tag or digest; returns its digest."""
        _, headers, _ = self.client.request(
            "PUT", f"/v2/{repo}/manifests/{ref}", body=body,
            headers={"Content-Type": media_type}, scope=_push_scope(repo), ok=(201,))
        digest = sha256_digest(body)
        served = headers.get("Docker-Content-Digest")
        if served and served != digest:
            raise RegistryError(f"registry says {served}, we computed {digest}")
        return digest

    def get_manifest(self, repo: str, ref: str, accept=None):
        """(content_type, body) of a manifest; `accept` defaults to all four kinds."""
        accept = accept or ", ".join(MANIFEST_TYPES)
        status, headers, body = self.get(f"/v2/{repo}/manifests/{ref}", headers={"Accept": accept})
        if status != 200:
            raise RegistryError(f"GET manifest {repo}:{ref}: HTTP {status}: {body[:300]!r}")
        return headers.get("Content-Type"), body

    def delete_manifest(self, repo: str, digest: str):
        self.client.request("DELETE", f"/v2/{repo}/manifests/{digest}", scope=_scope(repo, "delete"),
                            ok=(202,))


def _kill(proc):
    if proc and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _cleanup(proc_box, workdir):
    _kill(proc_box[0])
    shutil.rmtree(workdir, ignore_errors=True)


MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)


def _scope(repo, actions):
    return f"repository:{repo}:{actions}"


def _push_scope(repo):
    return _scope(repo, "pull,push")


def _scope_for(path, actions):
    """The token scope a /v2/NAME/... request needs (None for /v2/ itself)."""
    m = re.match(r"^/v2/(.+)/(manifests|blobs|tags)/", urllib.parse.urlsplit(path).path)
    return _scope(m.group(1), actions) if m else None
