"""The test helpers themselves work, against the real tools they stand in for:
docker-registry accepts what we push and enforces our auth, and skopeo +
umoci unpack our images into the trees we meant."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import ssl
import stat
import tarfile
import urllib.error
import urllib.request

import pytest
import zstandard

from dkr.testing.images import (
    Device, Dir, Fifo, File, Hardlink, Image, Layer, Opaque, Symlink, Whiteout,
    index_bytes, push_image, push_index, random_image, random_tree_layer,
    sample_expectations, sample_image,
)
from dkr.testing.oracle import (
    check_expectations, diff_trees, hardlink_groups, tree_snapshot, umoci_unpack,
)
from dkr.testing.registry import Registry, RegistryError, TestCA, bcrypt_hash
from dkr.testing.tokenserver import TokenServer

ACCEPT_ALL = ", ".join([
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
])


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def http_get(url, headers=None, context=None):
    """(status, headers, body) without raising on 4xx."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, context=context, timeout=10) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def basic(user, password):
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def decompress(blob: bytes, media_type: str) -> bytes:
    if media_type.endswith("gzip"):
        return gzip.decompress(blob)
    if media_type.endswith("zstd"):
        return zstandard.ZstdDecompressor().decompressobj().decompress(blob)
    return blob


@pytest.fixture(scope="module")
def registry():
    with Registry() as reg:
        yield reg


# --------------------------------------------------------------------------
# image building


def test_layer_members_and_determinism():
    layer = Layer([
        Dir("etc"),
        File("etc/a", b"x", mode=0o4755, xattrs={"user.k": b"\x00\xff"}),
        Hardlink("etc/b", "etc/a"),
        Symlink("etc/c", "/abs/target"),
        Device("dev/null", "c", 1, 3),
        Fifo("run/f"),
        Whiteout("etc/old"),
        Opaque("var/cache"),
    ])
    members = {m.name: m for m in tarfile.open(fileobj=io.BytesIO(layer.tar))}
    assert set(members) == {"etc", "etc/a", "etc/b", "etc/c", "dev/null", "run/f",
                            "etc/.wh.old", "var/cache/.wh..wh..opq"}
    assert members["etc"].isdir()
    assert members["etc/a"].mode == 0o4755 and members["etc/a"].mtime == 1700000000
    # Binary xattr values come back byte for byte through the PAX header.
    raw = members["etc/a"].pax_headers["SCHILY.xattr.user.k"]
    assert raw.encode("utf-8", "surrogateescape") == b"\x00\xff"
    assert members["etc/b"].islnk() and members["etc/b"].linkname == "etc/a"
    assert members["etc/c"].issym() and members["etc/c"].linkname == "/abs/target"
    assert members["dev/null"].ischr() and (members["dev/null"].devmajor, members["dev/null"].devminor) == (1, 3)
    assert members["run/f"].isfifo()
    assert layer.diff_id == sha(layer.tar) and layer.digest == sha(layer.blob)
    assert gzip.decompress(layer.blob) == layer.tar
    # Rebuilding gives the same bytes, so digests are stable across runs.
    again = Layer(list(layer.entries))
    assert again.digest == layer.digest
    assert sample_image().manifest_digest == sample_image().manifest_digest


def test_image_json_shapes():
    oci, docker = sample_image("oci"), sample_image("docker")
    m = json.loads(oci.manifest_bytes)
    assert m["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert [layer["mediaType"].rsplit(".", 1)[-1] for layer in m["layers"]] == \
        ["tar+gzip", "tar+zstd", "tar"]
    d = json.loads(docker.manifest_bytes)
    assert d["config"]["mediaType"] == "application/vnd.docker.container.image.v1+json"
    assert d["layers"][0]["mediaType"] == "application/vnd.docker.image.rootfs.diff.tar.gzip"
    # Same trees, so the same diff_ids, whatever the compression.
    assert json.loads(oci.config_bytes)["rootfs"] == json.loads(docker.config_bytes)["rootfs"]
    with pytest.raises(ValueError):
        Image([Layer([], compression="zstd")], format="docker").manifest_bytes
    body, media_type = index_bytes({"linux/arm64/v8": docker}, "docker")
    entry = json.loads(body)["manifests"][0]
    assert media_type.endswith("manifest.list.v2+json")
    assert entry["platform"] == {"os": "linux", "architecture": "arm64", "variant": "v8"}
    assert entry["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"


def test_random_tree_layer(tmp_path):
    total = 1 << 20
    layers = {}
    for comp in ("gzip", "zstd", "none"):
        layers[comp] = random_tree_layer(42, 60, total, tmp_path / f"l.{comp}", comp, prefix="data/")
    again = random_tree_layer(42, 60, total, tmp_path / "again", "gzip", prefix="data/")
    assert again.digest == layers["gzip"].digest
    # One tree, three encodings.
    assert len({layer.diff_id for layer in layers.values()}) == 1
    tar = (tmp_path / "l.none").read_bytes()
    assert sha(tar) == layers["gzip"].diff_id == sha(gzip.decompress((tmp_path / "l.gzip").read_bytes()))
    files = [m for m in tarfile.open(fileobj=io.BytesIO(tar)) if m.isfile()]
    assert len(files) == 60 and sum(m.size for m in files) == total
    assert all(m.name.startswith("data/") for m in files)
    # Compressible, but not trivially so.
    for comp in ("gzip", "zstd"):
        assert 0.2 < layers[comp].size / len(tar) < 0.9, comp
    assert random_tree_layer(43, 60, total, tmp_path / "other", "none").diff_id != layers["none"].diff_id


def test_random_image_is_cached_and_unpackable(registry, tmp_path):
    layers = [(30, 300 << 10), (10, 100 << 10)]
    image = random_image(5, tmp_path / "gen", layers, compression="zstd")
    stamps = sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "gen").iterdir())
    again = random_image(5, tmp_path / "gen", layers, compression="zstd")
    assert again.manifest_digest == image.manifest_digest
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "gen").iterdir()) == stamps
    push_image(registry, "test/random", "v1", image)
    snap = tree_snapshot(umoci_unpack(registry, "test/random", "v1", tmp_path / "u"))
    files = [p for p, e in snap.items() if e.type == "file"]
    assert len(files) == 40 and {p.split("/")[0] for p in files} == {"layer0", "layer1"}
    assert sum(snap[p].size for p in files) == (300 << 10) + (100 << 10)


# --------------------------------------------------------------------------
# the registry


@pytest.mark.parametrize("fmt", ["oci", "docker"])
def test_push_and_fetch_back(registry, fmt):
    image = sample_image(fmt)
    digest = push_image(registry, "test/sample", fmt, image)
    assert digest == image.manifest_digest

    status, headers, body = http_get(f"{registry.url}/v2/test/sample/manifests/{fmt}",
                                     {"Accept": ACCEPT_ALL})
    assert status == 200
    assert headers["Content-Type"] == image.media_type
    assert headers["Docker-Content-Digest"] == digest == sha(body)
    manifest = json.loads(body)

    _, _, config = http_get(f"{registry.url}/v2/test/sample/blobs/{manifest['config']['digest']}")
    assert sha(config) == manifest["config"]["digest"]
    diff_ids = json.loads(config)["rootfs"]["diff_ids"]
    for desc, diff_id in zip(manifest["layers"], diff_ids):
        _, _, blob = http_get(f"{registry.url}/v2/test/sample/blobs/{desc['digest']}")
        assert sha(blob) == desc["digest"] and len(blob) == desc["size"]
        assert sha(decompress(blob, desc["mediaType"])) == diff_id


def test_push_blob_from_file(registry, tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(3 << 20))
    digest = registry.push_blob("test/files", path)
    assert digest == sha(path.read_bytes())
    assert registry.blob_exists("test/files", digest)
    assert registry.push_blob("test/files", path) == digest   # already there: skipped
    status, _, body = http_get(f"{registry.url}/v2/test/files/blobs/{digest}")
    assert status == 200 and sha(body) == digest
    assert registry.log_path.exists() and b"blobs/uploads" in registry.log_path.read_bytes()


def test_umoci_oracle_sample(registry, tmp_path):
    snaps = {}
    for fmt in ("oci", "docker"):
        push_image(registry, "test/oracle", fmt, sample_image(fmt))
        rootfs = umoci_unpack(registry, "test/oracle", fmt, tmp_path / fmt)
        snaps[fmt] = tree_snapshot(rootfs)
        assert check_expectations(snaps[fmt], sample_expectations()) == []
    # The zstd layer (recompressed for umoci) gives the same tree as gzip.
    assert diff_trees(snaps["oci"], snaps["docker"], "oci", "docker") == []
    snap = snaps["oci"]
    assert snap["usr/bin/su"].mode == 0o4755
    assert snap["usr/bin/ls"].link == "usr/bin/busybox"
    assert dict(snap["etc/xattrs"].xattrs)["user.comment"] == b"hello"
    assert "var/cache/apt/pkgcache.bin" not in snap and "var/cache/apt/fresh.bin" in snap
    assert "etc/old.conf" not in snap


def test_index_and_platforms(registry, tmp_path):
    arm = Image([Layer([File("arch", b"arm64\n")])])
    digest = push_index(registry, "test/multi", "latest",
                        {"linux/amd64": sample_image(), "linux/arm64/v8": arm})
    content_type, body = registry.get_manifest("test/multi", "latest")
    assert content_type == "application/vnd.oci.image.index.v1+json" and sha(body) == digest
    platforms = [m["platform"] for m in json.loads(body)["manifests"]]
    assert {"os": "linux", "architecture": "arm64", "variant": "v8"} in platforms
    for m in json.loads(body)["manifests"]:
        ct, child = registry.get_manifest("test/multi", m["digest"])
        config_digest = json.loads(child)["config"]["digest"]
        config = json.loads(registry.get(f"/v2/test/multi/blobs/{config_digest}")[2])
        assert config["architecture"] == m["platform"]["architecture"]

    rootfs = umoci_unpack(registry, "test/multi", "latest", tmp_path / "arm",
                          platform="linux/arm64/v8")
    assert (rootfs / "arch").read_bytes() == b"arm64\n"

    push_index(registry, "test/multi", "docker", {"linux/arm64/v8": arm}, format="docker")
    content_type, _ = registry.get_manifest("test/multi", "docker")
    assert content_type == "application/vnd.docker.distribution.manifest.list.v2+json"


# --------------------------------------------------------------------------
# auth and TLS


def test_bcrypt_hash():
    h = bcrypt_hash("secret")
    assert h.startswith("$2b$05$") and len(h) == 60


def test_htpasswd_registry(tmp_path):
    with Registry(auth=("htpasswd", {"alice": "s3cret"})) as reg:
        status, headers, _ = http_get(reg.url + "/v2/")
        assert status == 401 and headers["WWW-Authenticate"].startswith("Basic ")
        assert http_get(reg.url + "/v2/", {"Authorization": basic("alice", "wrong")})[0] == 401
        assert http_get(reg.url + "/v2/", {"Authorization": basic("alice", "s3cret")})[0] == 200
        arm = Image([Layer([File("hello", b"hi\n")])])
        push_image(reg, "private/img", "v1", arm)
        assert http_get(reg.url + "/v2/private/img/manifests/v1", {"Accept": ACCEPT_ALL})[0] == 401
        rootfs = umoci_unpack(reg, "private/img", "v1", tmp_path / "u")   # creds from reg
        assert (rootfs / "hello").read_bytes() == b"hi\n"


def test_token_registry():
    with TokenServer(users={"bob": "pw"}, anonymous_pull=False, expires_in=120) as ts, \
            Registry(auth=("token", ts)) as reg:
        status, headers, _ = http_get(reg.url + "/v2/")
        assert status == 401
        challenge = headers["WWW-Authenticate"]
        assert challenge.startswith("Bearer ") and f'realm="{ts.realm}"' in challenge
        assert f'service="{ts.service}"' in challenge
        assert ts.requests == []          # a registry never calls the token server itself

        digest = push_image(reg, "team/app", "v1", Image([Layer([File("f", b"1")])]))
        # distribution 2.8 names the actions in random order (a Go map): "push,pull" too.
        assert any(r.user == "bob" and scope.startswith("repository:team/app:")
                   and set(scope.rsplit(":", 1)[1].split(",")) == {"pull", "push"}
                   for r in ts.requests for scope in r.query.get("scope", []))

        manifest_url = f"{reg.url}/v2/team/app/manifests/v1"
        assert http_get(manifest_url, {"Accept": ACCEPT_ALL})[0] == 401
        assert http_get(manifest_url, {"Accept": ACCEPT_ALL,
                                       "Authorization": "Bearer abc.def.ghi"})[0] == 401
        # The token server itself: no credentials, wrong ones, right ones.
        token_url = f"{ts.realm}?service={ts.service}&scope=repository:team/app:pull"
        assert http_get(token_url)[0] == 401
        assert http_get(token_url, {"Authorization": basic("bob", "nope")})[0] == 401
        status, _, body = http_get(token_url, {"Authorization": basic("bob", "pw")})
        answer = json.loads(body)
        assert status == 200 and answer["expires_in"] == 120 and answer["token"] == answer["access_token"]
        status, headers, body = http_get(manifest_url, {"Accept": ACCEPT_ALL,
                                                        "Authorization": "Bearer " + answer["token"]})
        assert status == 200 and sha(body) == digest
        assert ts.requests[-1].user == "bob" and ts.requests[-2].user is None
        # A pull token does not allow a push; a token for another repo allows nothing.
        pull_only = answer["token"]
        assert http_get(f"{reg.url}/v2/other/app/manifests/v1",
                        {"Authorization": "Bearer " + pull_only})[0] == 401
        # Tokens never end up in the registry's log.
        log = reg.log_path.read_text()
        assert all(token not in log for token in ts.issued)


@pytest.mark.parametrize("alg,key_hint", [("ES256", "x5c"), ("ES256", "kid"), ("RS256", "both")])
def test_token_signing_variants(alg, key_hint):
    with TokenServer(alg=alg, key_hint=key_hint) as ts, Registry(auth=("token", ts)) as reg:
        push_image(reg, "v/app", "t", Image([Layer([File("f", b"1")])]))
        url = f"{reg.url}/v2/v/app/manifests/t"
        access = [("repository", "v/app", ["pull"])]
        good = ts.make_token("x", access)
        assert http_get(url, {"Accept": ACCEPT_ALL, "Authorization": "Bearer " + good})[0] == 200
        # Anonymous pull is allowed by default, push is not.
        status, _, body = http_get(f"{ts.realm}?service={ts.service}&scope=repository:v/app:pull,push")
        assert status == 200
        claims = json.loads(base64.urlsafe_b64decode(json.loads(body)["token"].split(".")[1] + "=="))
        assert claims["access"] == [{"type": "repository", "name": "v/app", "actions": ["pull"]}]
        with TokenServer(alg=alg, issuer=ts.issuer) as stranger:
            foreign = stranger.make_token("x", access)      # right claims, untrusted key
        # distribution 2.8 allows 60 s of clock leeway past "exp".
        for bad in (ts.make_token("x", access, expires_in=-120),
                    ts.make_token("x", access, issuer="someone-else"),
                    ts.make_token("x", access, audience="other-service"),
                    foreign):
            assert http_get(url, {"Accept": ACCEPT_ALL, "Authorization": "Bearer " + bad})[0] == 401


def test_tls_registry(tmp_path):
    with Registry(tls=True) as reg:
        assert reg.url.startswith("https://127.0.0.1:")
        with pytest.raises(urllib.error.URLError):
            http_get(reg.url + "/v2/")              # unknown CA
        ctx = ssl.create_default_context(cafile=str(reg.ca_file))
        assert http_get(reg.url + "/v2/", context=ctx)[0] == 200
        push_image(reg, "secure/img", "v1", Image([Layer([File("tls", b"ok\n")])]))
        rootfs = umoci_unpack(reg, "secure/img", "v1", tmp_path / "u", insecure=False)
        assert (rootfs / "tls").read_bytes() == b"ok\n"
    ca = TestCA(tmp_path / "ca")
    assert ca.cert_path.exists() and all(p.exists() for p in ca.issue("other"))


def test_a_registry_started_twice_runs_one_server(tmp_path):
    registry = Registry(workdir=tmp_path)
    first = registry.proc
    try:
        assert registry.start() is registry
        assert registry.proc is first and first.poll() is None
    finally:
        registry.stop()
    assert first.poll() is not None


def test_registry_start_failure_is_clear(tmp_path):
    reg = Registry(start=False)
    reg.cert_path = reg.key_path = tmp_path / "missing.pem"     # TLS files that do not exist
    with pytest.raises(RegistryError, match="missing.pem"):
        reg.start(timeout=10)
    reg.stop()
    assert not reg.workdir.exists()


def test_push_errors_are_clear(registry):
    with pytest.raises(RegistryError, match="HTTP 4"):
        registry.push_manifest("test/bad", "v1", b"{not json", "application/vnd.oci.image.manifest.v1+json")


# --------------------------------------------------------------------------
# the oracle


@pytest.mark.skipif(os.geteuid() != 0, reason="device nodes and chown need root")
def test_tree_snapshot_and_diff(tmp_path):
    a = tmp_path / "a"
    (a / "d").mkdir(parents=True)
    (a / "d" / "f").write_bytes(b"data")
    os.link(a / "d" / "f", a / "g")
    os.symlink("/nowhere", a / "s")
    os.mkfifo(a / "p")
    os.mknod(a / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.chown(a / "g", 1000, 1000)        # before chmod: chown clears setuid
    os.chmod(a / "d" / "f", 0o4755)
    os.setxattr(a / "g", "user.k", b"v")
    snap = tree_snapshot(a)
    assert snap["d/f"].type == "file" and snap["d/f"].mode == 0o4755 and snap["d/f"].uid == 1000
    assert snap["d/f"].content == hashlib.sha256(b"data").hexdigest() and snap["d/f"].size == 4
    assert hardlink_groups(snap) == [["d/f", "g"]]
    assert snap["s"] == snap["s"]._replace(type="symlink", content="/nowhere")
    assert snap["null"].type == "chr" and snap["null"].content == (1, 3)
    assert snap["p"].type == "fifo" and snap["d"].size is None and snap["d/f"].mtime is None
    assert snap["g"].xattrs == (("user.k", b"v"),)
    assert tree_snapshot(a, mtimes=True)["d/f"].mtime is not None

    b = tmp_path / "b"
    (b / "d").mkdir(parents=True)
    (b / "d" / "f").write_bytes(b"other")
    (b / "g").write_bytes(b"data")
    os.symlink("/elsewhere", b / "s")
    diff = "\n".join(diff_trees(snap, tree_snapshot(b)))
    assert "only in a: p" in diff and "only in a: null" in diff
    assert "d/f: content" in diff and "d/f: mode 0o4755 (a) != 0o644 (b)" in diff
    assert "g: link 'd/f' (a) != None (b)" in diff and "s: content '/nowhere'" in diff
    assert diff_trees(snap, tree_snapshot(a)) == []
