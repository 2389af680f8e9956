"""policy.json and registries.d read and matched as containers/image does (no network)."""

from __future__ import annotations

import json

import pytest

from dkr.registry.policy import (Identity, PolicyError, load_policy, parse_named,
                                 policy_namespaces)
from dkr.registry.registries_d import BUILTIN_LOOKASIDE, load_registries_d

REQ = [{"type": "insecureAcceptAnything"}]


def _policy(tmp_path, doc):
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(doc))
    return load_policy(path)


def test_namespaces_most_specific_first():
    ref = parse_named("a.b.example.com:5000/ns/sub/repo:tag")
    assert policy_namespaces(ref) == [
        "a.b.example.com:5000/ns/sub/repo", "a.b.example.com:5000/ns/sub",
        "a.b.example.com:5000/ns", "a.b.example.com:5000",
        "*.b.example.com", "*.example.com", "*.com"]


@pytest.mark.parametrize("scopes, winner", [
    (["", "a.b.example.com:5000", "*.example.com", "*.b.example.com"], "a.b.example.com:5000"),
    (["", "*.example.com", "*.b.example.com"], "*.b.example.com"),
    (["", "*.example.com", "a.b.example.com:5000/ns/sub/repo:tag",
      "a.b.example.com:5000/ns/sub/repo"], "a.b.example.com:5000/ns/sub/repo:tag"),
    (["", "a.b.example.com:5000/ns"], "a.b.example.com:5000/ns"),
    (["", "a.b.example.com:5000/n", "a.b.example.com", "example.com"], ""),
])
def test_most_specific_scope_wins(tmp_path, scopes, winner):
    policy = _policy(tmp_path, {"default": REQ, "transports": {"docker": {
        s: [{"type": "reject"}] for s in scopes}}})
    scope, _ = policy.requirements_for(parse_named("a.b.example.com:5000/ns/sub/repo:tag"))
    assert scope == f'transports.docker["{winner}"]'


def test_global_default_last(tmp_path):
    policy = _policy(tmp_path, {"default": REQ, "transports": {"docker": {"x.io/a": REQ}}})
    assert policy.requirements_for(parse_named("y.io/a:1"))[0] == "default"


def test_docker_hub_short_names_are_normalized(tmp_path):
    policy = _policy(tmp_path, {"default": REQ, "transports": {"docker": {
        "docker.io/library/busybox": [{"type": "reject"}]}}})
    assert policy.requirements_for(parse_named("busybox"))[0] != "default"
    assert Identity().matches(parse_named("docker.io/library/busybox:1"), "busybox:1")
    assert Identity().matches(parse_named("index.docker.io/library/busybox:1"), "busybox:1")


def test_other_transports_are_checked_but_not_used(tmp_path):
    policy = _policy(tmp_path, {"default": REQ, "transports": {
        "atomic": {"x": [{"type": "reject"}]}, "some-new-transport": {"": REQ}}})
    assert policy.docker == {}
    with pytest.raises(PolicyError, match=r'transports\["oci"\]\["/x"\] is an empty list'):
        _policy(tmp_path, {"default": REQ, "transports": {"oci": {"/x": []}}})


@pytest.mark.parametrize("identity, problem", [
    ({"type": "exactReference", "dockerReference": "example.com/a"}, "has no tag or digest"),
    ({"type": "exactReference"}, "is not an image reference"),
    ({"type": "exactRepository", "dockerRepository": "Bad/Name"}, "is not a repository"),
    ({"type": "remapIdentity", "prefix": "example.com/a:tag", "signedPrefix": "x.io"},
     "prefix 'example.com/a:tag'"),
    ({"type": "remapIdentity", "prefix": "docker.io/busybox", "signedPrefix": "x.io"},
     "written out in full"),
    ({"type": "remapIdentity", "prefix": "example.com"}, "signedPrefix None"),
    ({"type": "matchExact", "dockerReference": "x"}, "unknown field 'dockerReference'"),
    ({"type": "matchEverything"}, "unknown identity type"),
])
def test_bad_signed_identity(tmp_path, identity, problem):
    req = {"type": "signedBy", "keyType": "GPGKeys", "keyPath": "/k", "signedIdentity": identity}
    with pytest.raises(PolicyError, match=problem):
        _policy(tmp_path, {"default": [req]})


@pytest.mark.parametrize("req, problem", [
    ({"type": "signedBy", "keyType": "GPGKeys", "keyPath": "/k", "keyData": "eA=="},
     "exactly one of"),
    ({"type": "signedBy", "keyType": "PGP", "keyPath": "/k"}, "keyType 'PGP'"),
    ({"type": "signedBy", "keyType": "GPGKeys", "keyData": "not base64!"}, "not valid base64"),
    ({"type": "sigstoreSigned", "fulcio": {}}, "fulcio is not supported"),
    ({"type": "sigstoreSigned", "keyPath": "/k", "rekorPublicKeyPath": "/r"},
     "rekorPublicKeyPath is not supported"),
    ({"type": "sigstoreSigned"}, "exactly one of"),
    ({"keyPath": "/k"}, "no requirement type"),
    ([], "is not an object"),
])
def test_bad_requirement(tmp_path, req, problem):
    with pytest.raises(PolicyError, match=rf"policy\.json: default\[0\].*{problem}"):
        _policy(tmp_path, {"default": [req]})


def test_unknown_top_level_key(tmp_path):
    with pytest.raises(PolicyError, match="unknown key 'defaults'"):
        _policy(tmp_path, {"default": REQ, "defaults": REQ})


@pytest.mark.parametrize("prefix, pulled, signed, ok", [
    ("example.com/ns", "example.com/ns/repo:1", "mirror.io/up/repo:1", True),
    ("example.com/ns", "example.com/nsx/repo:1", "mirror.io/up/repo:1", False),
    ("example.com/ns", "example.com/nsx/repo:1", "example.com/nsx/repo:1", True),
    ("example.com", "example.com/ns/repo:1", "mirror.io/up/ns/repo:1", True),
    ("example.com/ns/repo", "example.com/ns/repo@sha256:" + "a" * 64, "mirror.io/up:9", True),
])
def test_remap_identity(prefix, pulled, signed, ok):
    identity = Identity("remapIdentity", prefix=prefix, signed_prefix="mirror.io/up")
    assert identity.matches(parse_named(pulled), signed) is ok


def test_name_only_signatures_never_match_exactly():
    intended = parse_named("example.com/a:1")
    assert not Identity("matchExact").matches(intended, "example.com/a")
    assert not Identity().matches(intended, "example.com/a")
    assert Identity("matchRepository").matches(intended, "example.com/a")
    assert not Identity().matches(intended, "not a reference")


# --- registries.d ------------------------------------------------------------------------------

def _dirs(tmp_path, **files):
    d = tmp_path / "registries.d"
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (d / f"{name}.yaml").write_text(text)
    (d / "ignored.yml").write_text("default-docker: {lookaside: http://wrong}\n")
    return load_registries_d([d])


def test_registries_d_first_entry_that_says_wins(tmp_path):
    regd = _dirs(tmp_path, a="default-docker:\n  lookaside: https://default.example\n"
                             "  use-sigstore-attachments: true\n",
                 b="docker:\n  reg.example.com/ns:\n    sigstore: file:///ns/\n"
                   "  '*.example.com':\n    use-sigstore-attachments: false\n"
                   "  reg.example.com/ns/repo:\n    use-sigstore-attachments: true\n")
    ref = parse_named("reg.example.com/ns/repo:1")
    assert regd.lookaside(ref) == "file:///ns"
    assert regd.use_sigstore_attachments(ref) is True
    other = parse_named("reg.example.com/other:1")
    assert regd.lookaside(other) == "https://default.example"
    assert regd.use_sigstore_attachments(other) is False
    assert _dirs(tmp_path / "x").lookaside(ref) == BUILTIN_LOOKASIDE


@pytest.mark.parametrize("files, problem", [
    ({"a": "default-docker:\n  lookaside: http://a\n",
      "b": "default-docker:\n  lookaside: http://b\n"}, "default-docker is given both in"),
    ({"a": "docker:\n  x.io:\n    lookaside: http://a\n",
      "b": "docker:\n  x.io:\n    lookaside: http://b\n"}, "docker scope 'x.io' is given both"),
    ({"a": "docker: [\n"}, r"a\.yaml: not valid YAML"),
    ({"a": "default-docker:\n  lookaside: ftp://a\n"}, "not an http, https or file URL"),
    ({"a": "default-docker:\n  use-sigstore-attachments: yes please\n"}, "not true or false"),
])
def test_registries_d_errors(tmp_path, files, problem):
    with pytest.raises(PolicyError, match=problem):
        _dirs(tmp_path, **files)


@pytest.mark.parametrize("transport, scope, ok", [
    ("dir", "/srv/images", True), ("dir", "relative", False), ("dir", "/", False),
    ("oci", "/srv//x", False), ("docker-archive", "", True),
    ("containers-storage", "[overlay@/var/lib/containers/storage]", True),
    ("containers-storage", "busybox", False),
    ("docker-daemon", "anything", True), ("atomic", "anything", True),
    ("a-new-transport", "anything", True), ("docker", "Not A Reference!", True),
])
def test_scopes_of_other_transports(tmp_path, transport, scope, ok):
    doc = {"default": REQ, "transports": {transport: {scope: REQ}}}
    if ok:
        _policy(tmp_path, doc)
    else:
        with pytest.raises(PolicyError, match=f'transports\\["{transport}"\\]'):
            _policy(tmp_path, doc)


def test_the_users_registries_d_stands_for_the_systems(tmp_path, monkeypatch):
    from dkr.registry.registries_d import SYSTEM_DIR, default_dirs
    monkeypatch.delenv("DKR_REGISTRIES_D", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_dirs() == [SYSTEM_DIR]
    (tmp_path / ".config/containers/registries.d").mkdir(parents=True)
    assert default_dirs() == [tmp_path / ".config/containers/registries.d"]
    assert [str(d) for d in default_dirs("/elsewhere")] == ["/elsewhere"]
