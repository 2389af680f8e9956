"""Image signatures: found where registries.d says, verified against policy.json's keys.

Simple signatures (``skopeo copy --sign-by``) are OpenPGP messages kept in a
lookaside store; they are verified by GnuPG's ``gpgv`` against a keyring made
from the policy's keys alone, so no key of the user's own keyrings is ever
trusted. Sigstore signatures are the registry's ``sha256-HEX.sig``
attachments, verified with ``cryptography``. Both carry the same payload: the
manifest digest and the reference the signer meant, which must match the
manifest pulled and the reference the user asked for.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from dkr.registry.policy import (Named, Policy, PolicyError, Requirement, intended_reference,
                                 load_policy, policy_path)
from dkr.registry.reference import Reference
from dkr.registry.registries_d import RegistriesD, default_dirs, load_registries_d
from dkr.tasks import retrieved

log = logging.getLogger("dkr.trust")

SIMPLE_SIGNING_TYPE = "atomic container signature"
COSIGN_TYPE = "cosign container image signature"
COSIGN_LAYER_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
COSIGN_ANNOTATION = "dev.cosignproject.cosign/signature"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MAX_SIGNATURE_BYTES = 4 * 1024 * 1024
MAX_SIGNATURES = 128
GPG_TIMEOUT = 60


class _Rejected(Exception):
    """One signature (or requirement) that does not accept the image, and why."""


@dataclass
class _Signature:
    where: str          # URL or attachment, for messages and the record
    blob: bytes         # simple: the OpenPGP message; sigstore: the payload
    sigstore_signature: bytes = b""


def _payload(data: bytes, kind: str) -> tuple[str, str]:
    """The manifest digest and identity a signature's payload claims (strictly read:
    a payload with fields it should not have is not trusted)."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise _Rejected("the signed payload is not JSON") from None
    if not isinstance(doc, dict) or "critical" not in doc or \
            set(doc) - {"critical", "optional"} or \
            not isinstance(doc.get("optional") or {}, dict):
        raise _Rejected("the signed payload is not a container signature")
    critical = doc["critical"]
    if not isinstance(critical, dict) or set(critical) != {"type", "image", "identity"}:
        raise _Rejected("the signed payload is not a container signature")
    if critical["type"] != kind:
        raise _Rejected(f"the signed payload is of type {critical['type']!r}, not {kind!r}")
    image, identity = critical["image"], critical["identity"]
    if not isinstance(image, dict) or set(image) != {"docker-manifest-digest"} or \
            not isinstance(image["docker-manifest-digest"], str):
        raise _Rejected("the signed payload names no manifest digest")
    if not isinstance(identity, dict) or set(identity) != {"docker-reference"} or \
            not isinstance(identity["docker-reference"], str):
        raise _Rejected("the signed payload names no image reference")
    return image["docker-manifest-digest"], identity["docker-reference"]


# --- OpenPGP, through GnuPG ----------------------------------------------------------------

def _gpg_tool(name: str) -> str:
    found = shutil.which(name)
    if not found:
        raise PolicyError(f"the trust policy needs OpenPGP signatures checked, and {name} "
                          "(GnuPG) is not installed")
    return found


class Keyring:
    """The keys of one requirement, as a keyring file only ``gpgv`` reads."""

    def __init__(self, directory: Path, keys: list[bytes], where: str):
        self.dir = directory
        self.home = directory / "home"
        self.home.mkdir(mode=0o700)
        self.path = directory / "keyring.gpg"
        parts = []
        for i, key in enumerate(keys):
            if key.lstrip().startswith(b"-----BEGIN PGP"):
                key = self._gpg(["--dearmor"], key, f"{where}: key {i + 1}")
            parts.append(key)
        self.path.write_bytes(b"".join(parts))
        listing = self._gpg(["--with-colons", "--show-keys", str(self.path)], b"",
                            f"{where}: keys")
        self.fingerprints = []
        pub = False
        for line in listing.decode(errors="replace").splitlines():
            fields = line.split(":")
            if fields[0] in ("pub", "sub"):
                pub = True
            elif fields[0] == "fpr" and pub and len(fields) > 9:
                self.fingerprints.append(fields[9])
                pub = False
        if not self.fingerprints:
            raise PolicyError(f"{where}: no OpenPGP public key in the given keys")

    def _gpg(self, args: list[str], data: bytes, what: str) -> bytes:
        proc = subprocess.run(
            [_gpg_tool("gpg"), "--batch", "--no-tty", "--no-options", "--quiet",
             "--homedir", str(self.home), *args],
            input=data, capture_output=True, timeout=GPG_TIMEOUT)
        if proc.returncode != 0:
            why = proc.stderr.decode(errors="replace").strip().splitlines()
            raise PolicyError(f"{what}: not usable OpenPGP keys ({why[-1] if why else 'gpg failed'})")
        return proc.stdout

    def verify(self, message: bytes) -> tuple[bytes, str]:
        """The signed payload and the signing key's fingerprint, or _Rejected."""
        with tempfile.TemporaryDirectory(prefix="sig-", dir=self.dir) as tmp:
            sig, out = Path(tmp, "signature"), Path(tmp, "payload")
            sig.write_bytes(message)
            # A signed message may be compressed: the payload it unpacks to is
            # capped like the signature (ulimit -f counts 512-byte blocks).
            proc = subprocess.run(
                ["/bin/sh", "-c", f'ulimit -f {MAX_SIGNATURE_BYTES // 512} && exec "$@"', "sh",
                 _gpg_tool("gpgv"), "--homedir", str(self.home), "--keyring", str(self.path),
                 "--status-fd", "1", "--output", str(out), "--", str(sig)],
                capture_output=True, timeout=GPG_TIMEOUT)
            status = [line.split()[1:] for line in proc.stdout.decode(errors="replace").splitlines()
                      if line.startswith("[GNUPG:] ") and len(line.split()) > 1]
            words = [s[0] for s in status]
            valid = [s for s in status if s[0] == "VALIDSIG"]
            if proc.returncode == 0 and len(valid) == 1 and "GOODSIG" in words and \
                    words.count("NEWSIG") <= 1 and not set(words) & {
                        "BADSIG", "ERRSIG", "EXPSIG", "EXPKEYSIG", "REVKEYSIG"}:
                return out.read_bytes(), valid[0][-1] if len(valid[0]) > 1 else valid[0][0]
        if "ERRSIG" in words and any(s[0] == "NO_PUBKEY" for s in status):
            raise _Rejected("signed by a key the policy does not trust")
        if "BADSIG" in words:
            raise _Rejected("the signature does not match its content (corrupted or altered)")
        if set(words) & {"EXPKEYSIG", "REVKEYSIG", "EXPSIG"}:
            raise _Rejected("signed by an expired or revoked key")
        raise _Rejected("not a valid OpenPGP signature")


# --- sigstore, through cryptography ------------------------------------------------------------

def _public_keys(keys: list[bytes], where: str) -> list:
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    loaded = []
    for i, data in enumerate(keys):
        try:
            loaded.append(load_pem_public_key(data))
        except (ValueError, TypeError) as e:
            raise PolicyError(f"{where}: key {i + 1} is not a PEM public key ({e})") from None
    return loaded


def _sigstore_verify(keys: list, payload: bytes, signature: bytes) -> None:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

    for key in keys:
        try:
            if isinstance(key, ec.EllipticCurvePublicKey):
                key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
            elif isinstance(key, ed25519.Ed25519PublicKey):
                key.verify(signature, payload)
            elif isinstance(key, rsa.RSAPublicKey):
                key.verify(signature, payload, padding.PKCS1v15(), hashes.SHA256())
            else:
                continue
            return
        except InvalidSignature:
            continue
    raise _Rejected("not signed by a key the policy trusts (or the signature is corrupted)")


# --- the checks ----------------------------------------------------------------------------------

class Trust:
    """policy.json and registries.d for one run: read once, used for every image.

    A file that cannot be used fails each image's check with the same line, so
    that in a batch each image is refused on its own and nothing is pulled."""

    def __init__(self, policy_file: str | None = None, registries_d: str | None = None):
        self._policy_file = policy_file
        self._registries_d = registries_d
        self._policy: Policy | PolicyError | None = None
        self._dirs: RegistriesD | PolicyError | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._keys: dict[int, list] = {}
        self._keyrings: dict[int, asyncio.Future] = {}

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def policy(self) -> Policy:
        return self._read_once("_policy", lambda: load_policy(policy_path(self._policy_file)))

    def registries(self) -> RegistriesD:
        return self._read_once("_dirs",
                               lambda: load_registries_d(default_dirs(self._registries_d)))

    def _read_once(self, attribute: str, load):
        """What ``load`` reads, once per run; a file that cannot be used gives every
        image the same error."""
        value = getattr(self, attribute)
        if value is None:
            try:
                value = load()
            except PolicyError as e:
                value = e
            setattr(self, attribute, value)
        if isinstance(value, PolicyError):
            raise PolicyError(str(value))
        return value

    async def check(self, client, ref: Reference, manifest_digest: str | None) -> dict:
        """How the policy accepts the image whose (platform) manifest is
        ``manifest_digest``, as a record; a PolicyError saying why not otherwise.
        (None: a v1 image, which no signature can name.)"""
        policy = self.policy()
        if client is not None:
            # As containers/image does for every pull from a registry, whether the
            # policy asks for signatures or not: a broken file is never passed over.
            try:
                self.registries()
            except PolicyError as e:
                raise PolicyError(f"{intended_reference(ref)}: {e}") from None
        intended = intended_reference(ref)
        scope, requirements = policy.requirements_for(intended)
        check = _ImageCheck(self, client, intended, manifest_digest)
        accepted = []
        for req in requirements:
            try:
                accepted.append(await check.requirement(req))
            except (_Rejected, PolicyError) as e:
                # (a key or registries.d file that cannot be used is the policy's failure too)
                raise PolicyError(f"{intended} is not accepted by trust policy {policy.path} "
                                  f"({scope}): {e}") from None
        record = {"policy": str(policy.path), "scope": scope, "requirements": accepted}
        log.debug("%s: accepted by trust policy %s (%s): %s", intended, policy.path, scope,
                  "; ".join(a["accepted"] for a in accepted))
        return record

    async def keyring(self, req: Requirement) -> Keyring:
        """``req``'s keyring, made once for all the images of a run (on the event loop,
        so that images checked side by side share it)."""
        if id(req) not in self._keyrings:
            if self._tmp is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="dkr-trust-")
            directory = Path(tempfile.mkdtemp(dir=self._tmp.name))
            making = asyncio.ensure_future(
                asyncio.to_thread(Keyring, directory, _key_material(req), req.where))
            making.add_done_callback(retrieved)
            self._keyrings[id(req)] = making
        return await asyncio.shield(self._keyrings[id(req)])

    def sigstore_keys(self, req: Requirement) -> list:
        if id(req) not in self._keys:
            self._keys[id(req)] = _public_keys(_key_material(req), req.where)
        return self._keys[id(req)]


def _key_material(req: Requirement) -> list[bytes]:
    keys = list(req.key_datas)
    for path in req.key_paths:
        try:
            with open(path, "rb") as f:
                keys.append(f.read(MAX_SIGNATURE_BYTES))
        except OSError as e:
            raise PolicyError(f"{req.where}: key file {path} cannot be read: "
                              f"{e.strerror or e}") from None
    return keys


class _ImageCheck:
    def __init__(self, trust: Trust, client, intended: Named, manifest_digest: str):
        self.trust = trust
        self.client = client
        self.intended = intended
        self.digest = manifest_digest
        self._simple: list[_Signature] | None = None
        self._sigstore: list[_Signature] | None = None
        self._lookaside = ""

    async def requirement(self, req: Requirement) -> dict:
        if req.type == "insecureAcceptAnything":
            return {"type": req.type, "accepted": f"{req.where}: insecureAcceptAnything"}
        if req.type == "reject":
            raise _Rejected(f"{req.where} is reject: the scope accepts no image")
        if req.type == "signedBaseLayer":
            raise _Rejected(f"{req.where}: signedBaseLayer is not supported")
        if self.digest is None:
            raise _Rejected(f"{req.where} ({req.type}) needs a signature, and images of the "
                            "v1 protocol have none")
        if req.type == "signedBy":
            if req.key_type != "GPGKeys":
                raise _Rejected(f"{req.where}: keyType {req.key_type} is not supported "
                                "(only GPGKeys)")
            keyring = await self.trust.keyring(req)
            signatures = await self.simple_signatures()
            where = f"in {self._lookaside}"
            verify = lambda sig: self._verify_simple(keyring, sig)   # noqa: E731
        else:
            keys = self.trust.sigstore_keys(req)
            signatures = await self.sigstore_signatures()
            where = "among the registry's sigstore attachments" \
                if self.trust.registries().use_sigstore_attachments(self.intended) else \
                "(use-sigstore-attachments is not enabled in registries.d)"
            verify = lambda sig: self._verify_sigstore(keys, sig)    # noqa: E731
        if not signatures:
            raise _Rejected(f"{req.where} ({req.type}) needs a signature and there is none "
                            f"{where}")
        reasons = []
        for sig in signatures:
            try:
                claimed_digest, claimed_identity, signer = await verify(sig)
                self._check_claims(req, claimed_digest, claimed_identity)
            except _Rejected as e:
                reasons.append(f"{sig.where}: {e}")
                continue
            return {"type": req.type, "signature": sig.where, "signer": signer,
                    "identity": claimed_identity,
                    "accepted": f"{req.where}: {req.type} signature {sig.where} by {signer} "
                                f"(identity {claimed_identity}, signedIdentity "
                                f"{req.identity.describe()})"}
        if len(reasons) == 1:
            raise _Rejected(f"{req.where} ({req.type}): {reasons[0]}")
        raise _Rejected(f"{req.where} ({req.type}): none of {len(reasons)} signatures is "
                        f"accepted: {'; '.join(reasons)}")

    def _check_claims(self, req: Requirement, digest: str, identity: str) -> None:
        if digest != self.digest:
            raise _Rejected(f"signed manifest digest {digest} is not the pulled {self.digest}")
        if not req.identity.matches(self.intended, identity):
            raise _Rejected(f"identity {identity} not accepted for {self.intended} "
                            f"(signedIdentity {req.identity.describe()})")

    async def _verify_simple(self, keyring: Keyring, sig: _Signature):
        payload, signer = await asyncio.to_thread(keyring.verify, sig.blob)
        return (*_payload(payload, SIMPLE_SIGNING_TYPE), signer)

    async def _verify_sigstore(self, keys: list, sig: _Signature):
        _sigstore_verify(keys, sig.blob, sig.sigstore_signature)
        return (*_payload(sig.blob, COSIGN_TYPE), "a policy key")

    # --- where signatures are ---------------------------------------------------------------
    async def simple_signatures(self) -> list[_Signature]:
        if self._simple is None:
            base = self.trust.registries().lookaside(self.intended)
            algorithm, _, hex_ = self.digest.partition(":")
            self._lookaside = f"{base}/{self.intended.path}@{algorithm}={hex_}"
            self._simple = []
            for n in range(1, MAX_SIGNATURES + 1):
                url = f"{self._lookaside}/signature-{n}"
                blob = await self._read(url)
                if blob is None:
                    break
                self._simple.append(_Signature(url, blob))
        return self._simple

    async def _read(self, url: str) -> bytes | None:
        """A lookaside file's bytes; None where it does not exist."""
        parts = urlsplit(url)
        if parts.scheme == "file":
            try:
                with open(unquote(parts.path), "rb") as f:
                    data = f.read(MAX_SIGNATURE_BYTES + 1)
            except (FileNotFoundError, NotADirectoryError):
                return None
            except OSError as e:
                raise PolicyError(f"signature {url} cannot be read: {e.strerror or e}") from None
        else:
            from dkr.transport.job import Job

            # (with the registry's retries and TLS settings: a mirror has no say here)
            http = await self.client.registry()
            response = await http._retrying(
                lambda _: Job(http.glue, url, options=http.options,
                              max_payload=MAX_SIGNATURE_BYTES + 1, what=url).run(),
                url, server="lookaside server")
            if response.status == 404:
                return None
            if response.status != 200:
                raise PolicyError(f"signature {url}: server answered {response.status}")
            data = response.body
        if len(data) > MAX_SIGNATURE_BYTES:
            raise PolicyError(f"signature {url}: larger than {MAX_SIGNATURE_BYTES} bytes")
        return data

    async def sigstore_signatures(self) -> list[_Signature]:
        if self._sigstore is not None:
            return self._sigstore
        self._sigstore = []
        if not self.trust.registries().use_sigstore_attachments(self.intended):
            return self._sigstore
        repo = self.intended.path
        scope = f"repository:{repo}:pull"
        tag = self.digest.replace(":", "-") + ".sig"
        what = f"{self.intended.name}:{tag}"
        response = await self.client.get(f"/v2/{repo}/manifests/{tag}", scope=scope,
                                         accept=[OCI_MANIFEST], what=what)
        if response.status == 404:
            return self._sigstore
        if response.status != 200:
            raise PolicyError(f"{what}: registry answered {response.status}")
        try:
            layers = json.loads(response.body).get("layers")
        except (ValueError, UnicodeDecodeError, AttributeError):
            raise PolicyError(f"{what}: not a signature manifest") from None
        if not isinstance(layers, list):
            raise PolicyError(f"{what}: not a signature manifest")
        for i, layer in enumerate(layers[:MAX_SIGNATURES]):
            where = f"{what} layer {i + 1}"
            if not isinstance(layer, dict) or layer.get("mediaType") != COSIGN_LAYER_TYPE:
                continue
            annotation = (layer.get("annotations") or {}).get(COSIGN_ANNOTATION)
            digest, size = layer.get("digest"), layer.get("size")
            if not isinstance(annotation, str) or not isinstance(digest, str) or \
                    not digest.startswith("sha256:") or not isinstance(size, int) or \
                    not 0 <= size <= MAX_SIGNATURE_BYTES:
                continue
            try:
                signature = base64.b64decode(annotation, validate=True)
            except (binascii.Error, ValueError):
                signature = b""
            blob = await self.client.get(f"/v2/{repo}/blobs/{digest}", scope=scope,
                                         expected_size=size, what=where)
            if blob.status != 200:
                raise PolicyError(f"{where}: registry answered {blob.status}")
            if "sha256:" + blob.sha256 != digest:
                raise PolicyError(f"{where}: content does not match its digest")
            self._sigstore.append(_Signature(where, blob.body, signature))
        return self._sigstore
