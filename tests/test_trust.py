"""Trust policy: containers-policy.json and registries.d, obeyed as podman and skopeo obey them.

Real keys (made here with gpg), real signatures (skopeo), a real registry, the
lookaside store served by a loopback HTTP server; skopeo, with the same policy
and registries.d files, is the oracle for each case but sigstore's (Debian's
skopeo is built without it).
"""

from __future__ import annotations

import base64
import functools
import http.server
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from dkr.testing.images import File, Image, Layer, push_image, push_index
from helpers import assert_clean_failure, assert_ok, run_dkr

_counter = itertools.count()


def _image(text: str) -> Image:
    return Image([Layer([File("hello", text.encode())])])


# --- keys and signatures --------------------------------------------------------------------------

class Keys:
    def __init__(self, home: Path):
        self.home = home
        self.env = {**os.environ, "GNUPGHOME": str(home)}
        self.fpr = {}
        self.files = {}
        for who in ("good", "other"):
            subprocess.run(["gpg", "--batch", "--passphrase", "", "--quick-gen-key",
                            f"dkr test {who} <{who}@dkr.test>", "ed25519", "sign", "never"],
                           env=self.env, check=True, capture_output=True)
            listing = subprocess.run(["gpg", "--with-colons", "--list-keys", f"{who}@dkr.test"],
                                     env=self.env, check=True, capture_output=True, text=True)
            self.fpr[who] = next(line.split(":")[9] for line in listing.stdout.splitlines()
                                 if line.startswith("fpr:"))
            armored = subprocess.run(["gpg", "--armor", "--export", self.fpr[who]],
                                     env=self.env, check=True, capture_output=True).stdout
            self.files[who] = home.parent / f"{who}.asc"
            self.files[who].write_bytes(armored)
        binary = subprocess.run(["gpg", "--export", self.fpr["good"]], env=self.env, check=True,
                                capture_output=True).stdout
        self.files["good-binary"] = home.parent / "good.gpg"
        self.files["good-binary"].write_bytes(binary)

    def sign(self, manifest: bytes, identity: str, who: str = "good") -> bytes:
        """A simple signature for ``manifest`` claiming ``identity``, made by skopeo."""
        tmp = self.home.parent / f"sign-{next(_counter)}"
        tmp.mkdir()
        (tmp / "manifest.json").write_bytes(manifest)
        subprocess.run(["skopeo", "standalone-sign", "-o", str(tmp / "sig"),
                        str(tmp / "manifest.json"), identity, self.fpr[who]],
                       env=self.env, check=True, capture_output=True)
        return (tmp / "sig").read_bytes()


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    home = tmp_path_factory.mktemp("gpg") / "home"
    home.mkdir(mode=0o700)
    made = Keys(home)
    yield made
    subprocess.run(["gpgconf", "--kill", "gpg-agent"], env=made.env, capture_output=True)


class Lookaside:
    """A lookaside directory, served over loopback HTTP."""

    def __init__(self, directory: Path):
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        handler = type("Quiet", (http.server.SimpleHTTPRequestHandler,),
                       {"log_message": lambda *a: None})
        self.server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(handler, directory=str(directory)))
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def put(self, repo: str, digest: str, n: int, blob: bytes) -> None:
        where = self.dir / f"{repo}@{digest.replace(':', '=')}"
        where.mkdir(parents=True, exist_ok=True)
        (where / f"signature-{n}").write_bytes(blob)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def lookaside(tmp_path_factory):
    store = Lookaside(tmp_path_factory.mktemp("lookaside") / "store")
    yield store
    store.close()


class Setup:
    """The policy and registries.d files of one case, and both tools run with them."""

    def __init__(self, tmp: Path, registry, lookaside: Lookaside, keys: Keys):
        self.tmp, self.registry, self.lookaside, self.keys = tmp, registry, lookaside, keys
        self.policy = tmp / "policy.json"
        self.regd = tmp / "registries.d"
        self.regd.mkdir()
        (self.regd / "default.yaml").write_text(f"default-docker:\n  lookaside: {lookaside.url}\n")
        self.root = tmp / "machines"

    def write_policy(self, policy) -> None:
        self.policy.write_text(policy if isinstance(policy, str) else json.dumps(policy))

    def signed_by(self, who="good", identity=None, key_field="keyPath"):
        req = {"type": "signedBy", "keyType": "GPGKeys"}
        if key_field == "keyPath":
            req["keyPath"] = str(self.keys.files[who])
        elif key_field == "keyPaths":
            req["keyPaths"] = [str(self.keys.files["other"]), str(self.keys.files[who])]
        else:
            req["keyData"] = base64.b64encode(self.keys.files[who].read_bytes()).decode()
        if identity:
            req["signedIdentity"] = identity
        return req

    def dkr(self, ref: str, *extra, local="img"):
        return run_dkr("pull", "--insecure", "--backend", "dir", "--image-root", self.root,
                       "--signature-policy", self.policy, "--registries.d", self.regd,
                       *extra, f"{self.registry.host}/{ref}", local)

    def skopeo(self, ref: str) -> bool:
        out = self.tmp / f"skopeo-{next(_counter)}"
        proc = subprocess.run(["skopeo", "--policy", str(self.policy), "--registries.d",
                               str(self.regd), "copy", "--src-tls-verify=false",
                               f"docker://{self.registry.host}/{ref}", f"dir:{out}"],
                              capture_output=True, text=True, timeout=120)
        return proc.returncode == 0

    def podman(self, ref: str) -> bool:
        """podman, pointed at the same files: it takes registries.d from $HOME when
        that has one, and has no option for it."""
        home = self.tmp / "podman-home"
        config = home / ".config" / "containers"
        if not config.exists():
            config.mkdir(parents=True)
            (config / "registries.d").symlink_to(self.regd)
        store = Path(tempfile.mkdtemp(prefix="dkrp-"))     # (podman wants a short runroot)
        env = {**os.environ, "HOME": str(home)}
        proc = subprocess.run(["podman", "--root", str(store / "root"), "--runroot",
                               str(store / "run"), "--storage-driver", "vfs", "pull", "-q",
                               "--tls-verify=false", "--signature-policy", str(self.policy),
                               f"{self.registry.host}/{ref}"],
                              capture_output=True, text=True, timeout=120, env=env)
        shutil.rmtree(store, ignore_errors=True)
        print("podman:", proc.returncode, proc.stderr)
        return proc.returncode == 0

    def expect(self, ref: str, accepted: bool, pattern: str = "", *extra):
        """dkr, skopeo and podman all accept ``ref``, or all refuse it."""
        run = self.dkr(ref, *extra)
        if accepted:
            assert_ok(run)
        else:
            assert_clean_failure(run, self.root, pattern, "img")
            assert not (self.root / "img").exists()
            assert not [p for p in self.root.glob(".dkr-*")], "a layer was left behind"
        assert self.skopeo(ref) == accepted, f"skopeo disagrees on {ref}"
        assert self.podman(ref) == accepted, f"podman disagrees on {ref}"
        return run


@pytest.fixture
def case(tmp_path, registry, lookaside, keys):
    return Setup(tmp_path, registry, lookaside, keys)


def _repo() -> str:
    return f"trust/r{next(_counter)}"


def push_signed(case: Setup, who: str | None = "good", tag="v1", identity=None):
    """An image under REPO:tag, with one signature by ``who`` in the lookaside store."""
    repo = _repo()
    image = _image(repo)
    digest = push_image(case.registry, repo, tag, image)
    if who:
        claimed = identity or f"{case.registry.host}/{repo}:{tag}"
        case.lookaside.put(repo, digest, 1, case.keys.sign(image.manifest_bytes, claimed, who))
    return repo, image, digest


# --- the cases --------------------------------------------------------------------------------------

def test_signed_by_the_trusted_key_is_accepted_and_recorded(case):
    repo, image, digest = push_signed(case)
    case.write_policy({"default": [case.signed_by()]})
    run = case.expect(f"{repo}:v1", True, "", "-v")
    assert "accepted by trust policy" in run.err and "signedBy" in run.err
    inspect = json.loads(assert_ok(run_dkr("inspect", "--image-root", case.root, "img")).out)
    accepted = inspect["machine"]["accepted"]
    assert accepted["policy"] == str(case.policy) and accepted["scope"] == "default"
    assert accepted["requirements"][0]["signer"] == case.keys.fpr["good"]


@pytest.mark.parametrize("key_field", ["keyPaths", "keyData"])
def test_keys_given_as_paths_or_data(case, key_field):
    repo, _, _ = push_signed(case)
    case.write_policy({"default": [case.signed_by(key_field=key_field)]})
    case.expect(f"{repo}:v1", True)


def test_binary_key_file(case):
    repo, _, _ = push_signed(case)
    case.write_policy({"default": [case.signed_by(who="good-binary")]})
    case.expect(f"{repo}:v1", True)


def test_signed_with_skopeo_copy_sign_by(case, keys):
    """The signature skopeo writes when it copies an image (its own lookaside layout)."""
    repo = _repo()
    push_image(case.registry, repo, "src", _image(repo))
    staging = case.tmp / "staging.d"
    staging.mkdir()
    (staging / "w.yaml").write_text(f"default-docker:\n  lookaside: file://{case.lookaside.dir}\n")
    accept = case.tmp / "accept.json"
    accept.write_text('{"default": [{"type": "insecureAcceptAnything"}]}')
    host = case.registry.host
    subprocess.run(["skopeo", "--policy", str(accept), "--registries.d", str(staging), "copy",
                    "--src-tls-verify=false", "--dest-tls-verify=false",
                    "--sign-by", keys.fpr["good"], f"docker://{host}/{repo}:src",
                    f"docker://{host}/{repo}:signed"], env=keys.env, check=True,
                   capture_output=True)
    case.write_policy({"default": [case.signed_by()]})
    case.expect(f"{repo}:signed", True)


def test_unsigned_image_is_refused(case):
    repo, _, _ = push_signed(case, who=None)
    case.write_policy({"default": [case.signed_by()]})
    run = case.expect(f"{repo}:v1", False, r"not accepted by trust policy .*policy\.json "
                      r"\(default\): .*needs a signature and there is none", "--json")
    [error] = [e for e in run.events if e["event"] == "error"]
    assert error["kind"] == "policy"


def test_wrong_key_is_refused(case):
    repo, _, _ = push_signed(case, who="other")
    case.write_policy({"default": [case.signed_by()]})
    case.expect(f"{repo}:v1", False, "signed by a key the policy does not trust")


def test_signature_of_another_image_is_refused(case):
    repo, image, digest = push_signed(case, who=None)
    other = _image("something else")
    case.lookaside.put(repo, digest, 1, case.keys.sign(
        other.manifest_bytes, f"{case.registry.host}/{repo}:v1"))
    case.write_policy({"default": [case.signed_by()]})
    case.expect(f"{repo}:v1", False, f"signed manifest digest {other.manifest_digest} is not "
                f"the pulled {digest}")


def test_corrupted_signature_is_refused(case):
    repo, image, digest = push_signed(case, who=None)
    blob = bytearray(case.keys.sign(image.manifest_bytes, f"{case.registry.host}/{repo}:v1"))
    blob[len(blob) // 2] ^= 0x55
    case.lookaside.put(repo, digest, 1, bytes(blob))
    case.write_policy({"default": [case.signed_by()]})
    case.expect(f"{repo}:v1", False, r"\(signedBy\): .*signature-1: ")


def test_a_second_good_signature_is_enough(case):
    repo, image, digest = push_signed(case, who="other")
    case.lookaside.put(repo, digest, 2, case.keys.sign(
        image.manifest_bytes, f"{case.registry.host}/{repo}:v1"))
    case.write_policy({"default": [case.signed_by()]})
    case.expect(f"{repo}:v1", True)


def test_signatures_end_at_the_first_missing_one(case):
    repo, image, digest = push_signed(case, who="other")
    case.lookaside.put(repo, digest, 3, case.keys.sign(
        image.manifest_bytes, f"{case.registry.host}/{repo}:v1"))
    case.write_policy({"default": [case.signed_by()]})
    case.expect(f"{repo}:v1", False, "signed by a key the policy does not trust")


def test_pull_by_digest(case):
    repo, _, digest = push_signed(case)
    case.write_policy({"default": [case.signed_by()]})
    case.expect(f"{repo}@{digest}", True)


@pytest.mark.parametrize("identity, claimed, pulled, accepted", [
    # matchRepoDigestOrExact (the default): by tag exactly, by digest any tag of the repo
    (None, "{repo}:v1", "{repo}:v1", True),
    (None, "{repo}:v2", "{repo}:v1", False),
    (None, "{repo}:other", "{repo}@{digest}", True),
    (None, "{host}/elsewhere:v1", "{repo}@{digest}", False),
    ({"type": "matchExact"}, "{repo}:v1", "{repo}:v1", True),
    ({"type": "matchExact"}, "{repo}:v2", "{repo}:v1", False),
    ({"type": "matchExact"}, "{repo}:v1", "{repo}@{digest}", False),
    ({"type": "matchRepository"}, "{repo}:v2", "{repo}:v1", True),
    ({"type": "matchRepository"}, "{host}/elsewhere:v1", "{repo}:v1", False),
    ({"type": "exactReference", "dockerReference": "example.com/signed/name:1"},
     "example.com/signed/name:1", "{repo}:v1", True),
    ({"type": "exactReference", "dockerReference": "example.com/signed/name:1"},
     "example.com/signed/name:2", "{repo}:v1", False),
    ({"type": "exactRepository", "dockerRepository": "example.com/signed/name"},
     "example.com/signed/name:anything", "{repo}:v1", True),
    ({"type": "exactRepository", "dockerRepository": "example.com/signed/name"},
     "example.com/signed/other:anything", "{repo}:v1", False),
    ({"type": "remapIdentity", "prefix": "{host}/trust", "signedPrefix": "example.com/upstream"},
     "example.com/upstream/{name}:v1", "{repo}:v1", True),
    ({"type": "remapIdentity", "prefix": "{host}/trust", "signedPrefix": "example.com/upstream"},
     "{repo}:v1", "{repo}:v1", False),
    ({"type": "remapIdentity", "prefix": "{host}/nothing-here", "signedPrefix": "example.com/x"},
     "{repo}:v1", "{repo}:v1", True),
])
def test_signed_identity(case, identity, claimed, pulled, accepted):
    repo = _repo()
    image = _image(repo)
    digest = push_image(case.registry, repo, "v1", image)
    values = {"repo": f"{case.registry.host}/{repo}", "host": case.registry.host,
              "name": repo.split("/", 1)[1], "digest": digest}
    if identity:
        identity = {k: v.format(**values) for k, v in identity.items()}
    case.lookaside.put(repo, digest, 1, case.keys.sign(image.manifest_bytes,
                                                       claimed.format(**values)))
    case.write_policy({"default": [case.signed_by(identity=identity)]})
    case.expect(pulled.format(**values).removeprefix(case.registry.host + "/"), accepted,
                r"identity .* not accepted for ")


@pytest.mark.parametrize("scope_of", [
    lambda host, repo: f"{host}/{repo}:v1",
    lambda host, repo: f"{host}/{repo}",
    lambda host, repo: f"{host}/{repo.split('/')[0]}",
    lambda host, repo: host,
])
def test_the_most_specific_scope_wins(case, scope_of):
    repo, _, _ = push_signed(case, who=None)
    host = case.registry.host
    scope = scope_of(host, repo)
    # Everything less specific than the scope rejects; the scope itself accepts.
    case.write_policy({"default": [{"type": "reject"}], "transports": {"docker": {
        "": [{"type": "reject"}], host: [{"type": "reject"}],
        scope: [{"type": "insecureAcceptAnything"}]}}})
    case.expect(f"{repo}:v1", True)
    shutil.rmtree(case.root)
    case.write_policy({"default": [{"type": "insecureAcceptAnything"}], "transports": {
        "docker": {scope: [{"type": "reject"}], "": [{"type": "insecureAcceptAnything"}]}}})
    case.expect(f"{repo}:v1", False, rf'\(transports\.docker\["{scope}"\]\): .*reject')


def test_namespace_scope_is_whole_components(case):
    repo, _, _ = push_signed(case, who=None)
    host = case.registry.host
    case.write_policy({"default": [{"type": "insecureAcceptAnything"}], "transports": {
        "docker": {f"{host}/tru": [{"type": "reject"}]}}})
    case.expect(f"{repo}:v1", True)


def test_transport_default_before_global_default(case):
    repo, _, _ = push_signed(case, who=None)
    case.write_policy({"default": [{"type": "insecureAcceptAnything"}],
                       "transports": {"docker": {"": [{"type": "reject"}]}}})
    case.expect(f"{repo}:v1", False, r'\(transports\.docker\[""\]\)')


def test_every_requirement_must_hold(case):
    repo, _, _ = push_signed(case)
    case.write_policy({"default": [case.signed_by(), {"type": "reject"}]})
    case.expect(f"{repo}:v1", False, r"default\[1\] is reject: the scope accepts no image")


def test_index_whose_picked_instance_is_signed(case):
    repo = _repo()
    amd, arm = _image(repo + "amd"), _image(repo + "arm")
    push_index(case.registry, repo, "v1", {"linux/amd64": amd, "linux/arm64": arm})
    picked = amd.as_format("oci").with_platform("linux/amd64")
    case.lookaside.put(repo, picked.manifest_digest, 1, case.keys.sign(
        picked.manifest_bytes, f"{case.registry.host}/{repo}:v1"))
    case.write_policy({"default": [case.signed_by()]})
    case.expect(f"{repo}:v1", True, "", "--platform", "linux/amd64")


def test_index_where_only_the_index_is_signed(case):
    repo = _repo()
    amd, arm = _image(repo + "amd"), _image(repo + "arm")
    index_digest = push_index(case.registry, repo, "v1", {"linux/amd64": amd, "linux/arm64": arm})
    from dkr.testing.images import index_bytes
    body, _ = index_bytes({"linux/amd64": amd, "linux/arm64": arm})
    case.lookaside.put(repo, index_digest, 1, case.keys.sign(
        body, f"{case.registry.host}/{repo}:v1"))
    case.write_policy({"default": [case.signed_by()]})
    case.expect(f"{repo}:v1", False, "there is none", "--platform", "linux/amd64")


@pytest.mark.parametrize("text, problem", [
    ('{"default": [', "not valid JSON"),
    ('{"default": [{"type": "acceptEverything"}]}', "unknown requirement type 'acceptEverything'"),
    ('{"default": [{"type": "reject", "why": 1}]}', "unknown field 'why'"),
    ('{"default": []}', "empty list of requirements"),
    ('{"transports": {}}', 'no "default"'),
    ('{"default": [{"type": "insecureAcceptAnything"}], "transports": {"docker": {"x": []}}}',
     "empty list of requirements"),
    ('{"default": [{"type": "signedBy", "keyType": "GPGKeys"}]}', "exactly one of keyPath"),
    ('{"default": [{"type": "insecureAcceptAnything"}], "default": []}', "duplicate key"),
    (None, "does not exist"),
    ('{"default": [{"type": "insecureAcceptAnything"}], "transports": {"dir": {"relative": '
     '[{"type": "reject"}]}}}', r'transports\["dir"\]\["relative"\]: a scope of the dir transport is an absolute'),
])
def test_a_policy_that_cannot_be_read_refuses_the_pull(case, text, problem):
    repo, _, _ = push_signed(case)
    if text is not None:
        case.write_policy(text)
    case.expect(f"{repo}:v1", False, rf"trust policy {case.policy}.*{problem}")


def test_policy_and_registries_d_from_home(case, tmp_path):
    """Without --signature-policy: $HOME/.config/containers/policy.json and registries.d."""
    repo, _, _ = push_signed(case)
    config = tmp_path / "home" / ".config" / "containers"
    (config / "registries.d").mkdir(parents=True)
    (config / "policy.json").write_text(json.dumps({"default": [case.signed_by()]}))
    (config / "registries.d" / "a.yaml").write_text(
        (case.regd / "default.yaml").read_text())
    env = {k: v for k, v in os.environ.items() if not k.startswith("DKR_")}
    env["HOME"] = str(tmp_path / "home")
    run = run_dkr("pull", "--insecure", "--backend", "dir", "--image-root", case.root, "-v",
                  f"{case.registry.host}/{repo}:v1", "img", env=env)
    assert_ok(run)
    assert str(config / "policy.json") in run.err
    (config / "policy.json").write_text('{"default": [{"type": "reject"}]}')
    run = run_dkr("pull", "--insecure", "--backend", "dir", "--image-root", case.root, "--force",
                  f"{case.registry.host}/{repo}:v1", "img", env=env)
    assert run.rc != 0 and str(config / "policy.json") in run.err


def test_registries_d_most_specific_lookaside_wins(case, tmp_path):
    repo, image, digest = push_signed(case, who=None)
    good = Lookaside(tmp_path / "specific")
    try:
        good.put(repo, digest, 1, case.keys.sign(image.manifest_bytes,
                                                 f"{case.registry.host}/{repo}:v1"))
        # default-docker points at the shared store, which has no signature for it;
        # the namespace's entry, in another file, points at the one that does.
        (case.regd / "z.yaml").write_text(
            f"docker:\n  {case.registry.host}/trust:\n    sigstore: {good.url}\n")
        case.write_policy({"default": [case.signed_by()]})
        case.expect(f"{repo}:v1", True)
        (case.regd / "y.yaml").write_text(
            f"docker:\n  {case.registry.host}/trust:\n    lookaside: {good.url}\n")
        run = case.dkr(f"{repo}:v1", "--force")
        assert_clean_failure(run, case.root, r"registries\.d: docker scope .* is given both")
    finally:
        good.close()


def test_file_lookaside(case):
    repo, _, _ = push_signed(case)
    (case.regd / "default.yaml").write_text(
        f"default-docker:\n  lookaside: file://{case.lookaside.dir}\n")
    case.write_policy({"default": [case.signed_by()]})
    case.expect(f"{repo}:v1", True)


def test_batch_judges_each_image_alone(case):
    signed, _, _ = push_signed(case)
    unsigned, _, _ = push_signed(case, who=None)
    case.write_policy({"default": [case.signed_by()]})
    batch = case.tmp / "batch"
    batch.write_text(f"{case.registry.host}/{signed}:v1 one\n"
                     f"{case.registry.host}/{unsigned}:v1 two\n")
    run = run_dkr("pull", "--insecure", "--backend", "dir", "--image-root", case.root,
                  "--signature-policy",
                  case.policy, "--registries.d", case.regd, "--batch", batch, "--json")
    assert run.rc != 0
    assert (case.root / "one").exists() and not (case.root / "two").exists()
    errors = [e for e in run.events if e["event"] == "error"]
    assert [e.get("kind") for e in errors] == ["policy"], run.err
    assert unsigned in errors[0]["reference"]


# --- sigstore (made here in cosign's format: Debian's tools have it switched off) ---------------

def _cosign_sign(case: Setup, repo: str, image: Image, digest: str, private_key, identity: str):
    payload = json.dumps({"critical": {
        "identity": {"docker-reference": identity},
        "image": {"docker-manifest-digest": digest},
        "type": "cosign container image signature"}, "optional": None}).encode()
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric import padding, rsa
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        signature = private_key.sign(payload, ec.ECDSA(hashes.SHA256()))
    elif isinstance(private_key, rsa.RSAPrivateKey):
        signature = private_key.sign(payload, padding.PKCS1v15(), hashes.SHA256())
    else:
        signature = private_key.sign(payload)
    layer_digest = case.registry.push_blob(repo, payload)
    config = b"{}"
    config_digest = case.registry.push_blob(repo, config)
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": config_digest, "size": len(config)},
                "layers": [{"mediaType": "application/vnd.dev.cosign.simplesigning.v1+json",
                            "digest": layer_digest, "size": len(payload),
                            "annotations": {"dev.cosignproject.cosign/signature":
                                            base64.b64encode(signature).decode()}}]}
    case.registry.push_manifest(repo, digest.replace(":", "-") + ".sig",
                                json.dumps(manifest).encode(),
                                "application/vnd.oci.image.manifest.v1+json")


def _pem(private_key) -> str:
    from cryptography.hazmat.primitives import serialization
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


@pytest.mark.parametrize("algorithm", ["ecdsa", "ed25519", "rsa"])
def test_sigstore_signed(case, algorithm):
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
    make = {"ecdsa": lambda: ec.generate_private_key(ec.SECP256R1()),
            "ed25519": ed25519.Ed25519PrivateKey.generate,
            "rsa": lambda: rsa.generate_private_key(65537, 2048)}[algorithm]
    key, stranger = make(), make()
    repo, image, digest = push_signed(case, who=None)
    (case.regd / "default.yaml").write_text("default-docker:\n  use-sigstore-attachments: true\n")
    key_file = case.tmp / "cosign.pub"
    key_file.write_text(_pem(key))
    req = {"type": "sigstoreSigned", "keyPath": str(key_file),
           "signedIdentity": {"type": "matchRepository"}}
    case.write_policy({"default": [req]})
    run = case.dkr(f"{repo}:v1")
    assert_clean_failure(run, case.root, "needs a signature and there is none", "img")

    _cosign_sign(case, repo, image, digest, stranger, f"{case.registry.host}/{repo}")
    run = case.dkr(f"{repo}:v1")
    assert_clean_failure(run, case.root, "not signed by a key the policy trusts", "img")

    _cosign_sign(case, repo, image, digest, key, f"{case.registry.host}/{repo}")
    assert_ok(case.dkr(f"{repo}:v1"))
    req = {"type": "sigstoreSigned", "keyDatas": [base64.b64encode(_pem(k).encode()).decode()
                                                  for k in (stranger, key)]}
    case.write_policy({"default": [req]})          # matchRepoDigestOrExact: a tag is not enough
    run = case.dkr(f"{repo}:v1", local="two")
    assert_clean_failure(run, case.root, "identity .* not accepted", "two")


@pytest.mark.parametrize("wildcard, matches", [("*.0.0.1", True), ("*.1", True),
                                               ("*.127.0.0.1", False)])
def test_wildcard_host_scope(case, wildcard, matches):
    """``*.DOMAIN`` matches hosts below DOMAIN, by whole labels (the port set aside);
    the loopback registry's host is an address, which counts as labels too."""
    repo, _, _ = push_signed(case, who=None)
    case.write_policy({"default": [{"type": "insecureAcceptAnything"}],
                       "transports": {"docker": {wildcard: [{"type": "reject"}]}}})
    case.expect(f"{repo}:v1", not matches, rf'\(transports\.docker\["\{wildcard}"\]\)')


def test_v1_images_have_no_signature(case):
    from dkr.testing.v1server import V1Server
    with V1Server() as srv:
        srv.add_image("ns/app", "latest", [Layer([File("a", b"v1\n")]).tar])

        def pull_v1(local):
            return run_dkr("pull", "--v1", "--index-url", srv.index_url, "--ca-file",
                           srv.ca_file, "--image-root", case.root, "--backend", "dir",
                           "--signature-policy", case.policy, "ns/app", local)
        case.write_policy({"default": [case.signed_by()]})
        assert_clean_failure(pull_v1("one"), case.root, r"default\[0\] \(signedBy\) needs a "
                             "signature, and images of the v1 protocol have none", "one")
        assert not [p for p in case.root.glob(".dkr-*")]
        case.write_policy({"default": [case.signed_by()], "transports": {"docker": {
            "": [{"type": "insecureAcceptAnything"}]}}})
        assert_ok(pull_v1("two"))


def test_a_key_that_cannot_be_read_refuses_the_pull(case):
    repo, _, _ = push_signed(case)
    missing = case.tmp / "no-such-key.gpg"
    req = case.signed_by()
    req["keyPath"] = str(missing)
    case.write_policy({"default": [req]})
    case.expect(f"{repo}:v1", False, rf"trust policy {case.policy} \(default\): default\[0\]: "
                rf"key file {missing} cannot be read")
    (case.tmp / "garbage.gpg").write_bytes(b"not a key at all\n")
    req["keyPath"] = str(case.tmp / "garbage.gpg")
    case.write_policy({"default": [req]})
    case.expect(f"{repo}:v1", False, r"default\[0\]: no OpenPGP public key|not usable OpenPGP")


@pytest.mark.parametrize("signed", [True, False])
def test_registries_d_that_cannot_be_read_refuses_the_pull(case, signed):
    """Also where the policy asks for no signature: podman reads registries.d for
    every pull from a registry."""
    repo, _, _ = push_signed(case)
    (case.regd / "broken.yaml").write_text("docker: [\n")
    case.write_policy({"default": [case.signed_by() if signed else
                                   {"type": "insecureAcceptAnything"}]})
    case.expect(f"{repo}:v1", False, r"broken\.yaml: not valid YAML")


def test_index_pulled_by_digest(case):
    """The index's digest pins the pull; the picked instance's signature names the
    repository (by any tag), which the default signedIdentity accepts."""
    repo = _repo()
    amd, arm = _image(repo + "amd"), _image(repo + "arm")
    index_digest = push_index(case.registry, repo, "v1", {"linux/amd64": amd, "linux/arm64": arm})
    picked = amd.as_format("oci").with_platform("linux/amd64")
    case.lookaside.put(repo, picked.manifest_digest, 1, case.keys.sign(
        picked.manifest_bytes, f"{case.registry.host}/{repo}:v1"))
    case.write_policy({"default": [case.signed_by()]})
    case.expect(f"{repo}@{index_digest}", True, "", "--platform", "linux/amd64")
    shutil.rmtree(case.root)
    case.write_policy({"default": [case.signed_by(identity={"type": "matchExact"})]})
    case.expect(f"{repo}@{index_digest}", False, "identity .* not accepted",
                "--platform", "linux/amd64")


def test_a_signature_by_an_expired_key_is_refused(case, keys):
    subprocess.run(["gpg", "--batch", "--passphrase", "", "--quick-gen-key",
                    "dkr test expiring <expiring@dkr.test>", "ed25519", "sign", "seconds=3"],
                   env=keys.env, check=True, capture_output=True)
    listing = subprocess.run(["gpg", "--with-colons", "--list-keys", "expiring@dkr.test"],
                             env=keys.env, check=True, capture_output=True, text=True).stdout
    keys.fpr["expiring"] = next(line.split(":")[9] for line in listing.splitlines()
                                if line.startswith("fpr:"))
    key_file = case.tmp / "expiring.gpg"
    key_file.write_bytes(subprocess.run(["gpg", "--export", keys.fpr["expiring"]], env=keys.env,
                                        check=True, capture_output=True).stdout)
    keys.files["expiring"] = key_file
    repo, _, _ = push_signed(case, who="expiring")
    case.write_policy({"default": [case.signed_by(who="expiring")]})
    time.sleep(4)
    case.expect(f"{repo}:v1", False, "signed by an expired or revoked key")


def test_a_lookaside_server_that_fails_fails_the_pull(case, tmp_path):
    repo, _, _ = push_signed(case)

    class Failing(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(500)

        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        (case.regd / "default.yaml").write_text(
            f"default-docker:\n  lookaside: http://127.0.0.1:{server.server_address[1]}\n")
        case.write_policy({"default": [case.signed_by()]})
        case.expect(f"{repo}:v1", False, r"signature-1: server answered 500", "--retries", "0")
    finally:
        server.shutdown()
        server.server_close()


def test_https_lookaside_with_a_private_ca(case, tmp_path):
    """An https lookaside store is trusted as the pull's other hosts are (--ca-file):
    here the registry has one private CA and the store another. (dkr alone:
    podman would take the CAs from the host's certs.d.)"""
    from dkr.testing.registry import Registry, TestCA
    registry_ca = TestCA(tmp_path / "ca1")
    store_ca = TestCA(tmp_path / "ca2", name="dkr test lookaside CA")
    both = tmp_path / "both.pem"
    both.write_bytes(registry_ca.cert_path.read_bytes() + store_ca.cert_path.read_bytes())
    handler = type("Quiet", (http.server.SimpleHTTPRequestHandler,),
                   {"log_message": lambda *a: None})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(case.lookaside.dir)))
    server.socket = store_ca.server_context().wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with Registry(tls=registry_ca) as registry:
            repo = _repo()
            image = _image(repo)
            digest = push_image(registry, repo, "v1", image)
            case.lookaside.put(repo, digest, 1, case.keys.sign(image.manifest_bytes,
                                                               f"{registry.host}/{repo}:v1"))
            (case.regd / "default.yaml").write_text(
                f"default-docker:\n  lookaside: https://127.0.0.1:{server.server_address[1]}\n")
            case.write_policy({"default": [case.signed_by()]})

            def pull(ca_file):
                return run_dkr("pull", "--backend", "dir", "--image-root", case.root,
                               "--retries", "0", "--signature-policy", case.policy,
                               "--registries.d", case.regd, "--ca-file", ca_file,
                               f"{registry.host}/{repo}:v1", "img")
            assert_ok(pull(both))
            shutil.rmtree(case.root)
            assert_clean_failure(pull(registry_ca.cert_path), case.root,
                                 r"/trust/r\d+@sha256=[0-9a-f]+/signature-1: .*(certificate|SSL)",
                                 "img")
    finally:
        server.shutdown()
        server.server_close()
