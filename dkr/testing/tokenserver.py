"""A Docker token-auth server for tests (the "realm" a registry points clients to).

Implements ``GET /token?service=S&scope=repository:NAME:pull,push`` from the
Docker token authentication spec, with optional Basic credentials.  Tokens
are JWTs signed with a throw-away key; the key's self-signed certificate goes
to `cert_path`, which the registry trusts as ``auth.token.rootcertbundle``.

distribution 2.8 finds the signing key from the JWT header in this order:
``x5c`` (a chain that must verify against the root bundle), ``jwk``, then
``kid`` looked up among the bundle's keys by libtrust key id.  We send
``x5c`` (our certificate) and the libtrust ``kid`` as well, so either path
works.  The registry checks ``exp`` with 60 s of leeway, so a token is
still accepted for a minute after it expires.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import http.server
import json
import secrets
import shutil
import tempfile
import threading
import time
import urllib.parse
import weakref
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TokenServer", "TokenRequest", "libtrust_key_id"]


@dataclass(frozen=True)
class TokenRequest:
    """What the token server was asked: the path, the query (name -> list of
    values, as `urllib.parse.parse_qs` gives), the Basic user ("" if
    anonymous, None if the credentials were wrong) and the HTTP status sent."""
    path: str
    query: dict
    user: str | None
    status: int


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def libtrust_key_id(public_key) -> str:
    """docker/libtrust's key id: base32 of the first 240 bits of sha256(SPKI DER),
    in colon-separated groups of four."""
    from cryptography.hazmat.primitives import serialization
    der = public_key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    b32 = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode()
    return ":".join(b32[i:i + 4] for i in range(0, len(b32), 4))


class TokenServer:
    """Threaded token server on 127.0.0.1 (start on construction; context manager).

    users:          {"name": "password"}; these may pull and push anything.
    anonymous_pull: anonymous requests get pull access (push is dropped);
                    otherwise anonymous requests get 401.
    expires_in:     token lifetime in seconds (the registry adds 60 s leeway).
    alg:            "ES256" or "RS256".
    grant:          optional callable(user, type, name, actions) -> allowed actions,
                    replacing the policy above for fine-grained tests.
    key_hint:       which JWT header names the signing key: "both", "x5c" or "kid".
    ssl_context:    serve https with this context (e.g. `TestCA.server_context()`).
    """

    def __init__(self, users=None, anonymous_pull=True, expires_in=300, alg="ES256",
                 service="dkr-test-registry", issuer="dkr-test-token-issuer", grant=None,
                 key_hint="both", ssl_context=None):
        self.users = dict(users if users is not None else {"pusher": "push-secret"})
        self.anonymous_pull = anonymous_pull
        self.expires_in = expires_in
        self.alg = alg
        self.service = service
        self.issuer = issuer
        self.grant = grant
        self.key_hint = key_hint
        self.requests: list[TokenRequest] = []
        self.issued: list[str] = []          # every token handed out, for leak checks
        self._lock = threading.Lock()
        self.workdir = Path(tempfile.mkdtemp(prefix="dkr-tokenserver-"))
        # Cleans up even if a caller forgets stop() (at GC or interpreter exit).
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.workdir), True)
        self.cert_path = self.workdir / "token-signer.pem"
        self._make_key()

        server = self
        class Handler(_Handler):
            owner = server
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.scheme = "http"
        if ssl_context is not None:
            self.httpd.socket = ssl_context.wrap_socket(self.httpd.socket, server_side=True)
            self.scheme = "https"
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="tokenserver",
                                        daemon=True)
        self._thread.start()

    # -- keys ------------------------------------------------------------

    def _make_key(self):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec, rsa
        from cryptography.x509.oid import NameOID

        if self.alg == "ES256":
            self.key = ec.generate_private_key(ec.SECP256R1())
        elif self.alg == "RS256":
            self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        else:
            raise ValueError(f"unsupported alg {self.alg!r}")
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.issuer)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self._x5c = [base64.b64encode(self.cert.public_bytes(serialization.Encoding.DER)).decode()]
        self.key_id = libtrust_key_id(self.key.public_key())

    def _sign(self, signing_input: bytes) -> bytes:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec, padding
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        if self.alg == "RS256":
            return self.key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
        # JWS wants raw r||s, not the DER that cryptography produces.
        r, s = decode_dss_signature(self.key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    # -- tokens ----------------------------------------------------------

    def make_token(self, user: str = "", access=(), expires_in=None, issuer=None,
                   audience=None, now=None) -> str:
        """A signed JWT; `access` is a list of (type, name, [actions]).  The
        keyword overrides let tests forge expired or misdirected tokens."""
        now = int(time.time() if now is None else now)
        expires_in = self.expires_in if expires_in is None else expires_in
        header = {"typ": "JWT", "alg": self.alg}
        if self.key_hint in ("both", "kid"):
            header["kid"] = self.key_id
        if self.key_hint in ("both", "x5c"):
            header["x5c"] = self._x5c
        claims = {
            "iss": issuer or self.issuer,
            "sub": user,
            "aud": audience or self.service,
            "exp": now + expires_in,
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(16),
            "access": [{"type": t, "name": n, "actions": list(a)} for t, n, a in access],
        }
        signing_input = (_b64url(json.dumps(header).encode()) + "." +
                         _b64url(json.dumps(claims).encode())).encode()
        return signing_input.decode() + "." + _b64url(self._sign(signing_input))

    def _allowed(self, user, rtype, name, actions):
        if self.grant is not None:
            return list(self.grant(user, rtype, name, actions))
        if user:
            return list(actions)
        return [a for a in actions if a == "pull"] if self.anonymous_pull else []

    def answer(self, query: dict, user: str):
        """(status, json_body) for a token request by `user` ("" = anonymous)."""
        if not user and not self.anonymous_pull and self.grant is None:
            return 401, {"errors": [{"code": "UNAUTHORIZED", "message": "credentials required"}]}
        if query.get("service", [self.service])[0] != self.service:
            return 400, {"errors": [{"code": "DENIED", "message": "unknown service"}]}
        access = []
        for scopes in query.get("scope", []):
            for scope in scopes.split():
                parts = scope.split(":")
                if len(parts) < 3:
                    continue
                # The name may itself hold ':' (a registry host with a port).
                rtype, name, actions = parts[0], ":".join(parts[1:-1]), parts[-1].split(",")
                allowed = self._allowed(user, rtype, name, actions)
                if allowed:
                    access.append((rtype, name, allowed))
        token = self.make_token(user, access)
        with self._lock:
            self.issued.append(token)
        issued_at = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return 200, {"token": token, "access_token": token,
                     "expires_in": self.expires_in, "issued_at": issued_at}

    # -- server ----------------------------------------------------------

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def realm(self) -> str:
        return self.url + "/token"

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)
        self._cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class _Handler(http.server.BaseHTTPRequestHandler):
    owner: TokenServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        # Never print requests: they carry credentials and tokens.
        pass

    def _user(self) -> str | None:
        """"" for anonymous, the user name if the Basic credentials match, else None."""
        auth = self.headers.get("Authorization", "")
        if not auth:
            return ""
        scheme, _, value = auth.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            user, _, password = base64.b64decode(value).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        ok = self.owner.users.get(user)
        return user if ok is not None and secrets.compare_digest(ok, password) else None

    def do_GET(self):
        parts = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(parts.query)
        user = self._user()
        if parts.path != "/token":
            status, body = 404, {"errors": [{"code": "NOT_FOUND"}]}
        elif user is None:
            status, body = 401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]}
        else:
            status, body = self.owner.answer(query, user)
        with self.owner._lock:
            self.owner.requests.append(TokenRequest(parts.path, query, user, status))
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 401:
            self.send_header("WWW-Authenticate", 'Basic realm="dkr-test-token"')
        self.end_headers()
        self.wfile.write(data)
