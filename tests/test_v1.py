"""The Docker Registry v1 protocol, exactly as the seed pulled it (issue #6).

Against ``V1Server``, a faithful v1 index + registry on two TLS ports with a
throw-away CA. End to end through the CLI, so error lines and exit codes are
what a user sees; the Python API where the test needs to hold the loop.
"""

from __future__ import annotations

import asyncio
import json
import os
import re

import pytest
from helpers import assert_clean_failure, assert_ok, pull, run_dkr

from dkr import api
from dkr.errors import DkrError
from dkr.testing import images
from dkr.testing.images import Dir, File, Hardlink, Image, Layer, Opaque, Symlink, Whiteout
from dkr.testing.oracle import diff_trees, tree_snapshot
from dkr.testing.v1server import MAX_ANCESTRY, V1Server
from dkr.registry.v1 import MAX_ANCESTRY as OUR_MAX, TokenAuth, layer_key, parse_ancestry, parse_endpoints

NAME = "library/test"
LOCAL = "test"

BASE = Layer([
    Dir("etc"), File("etc/os-release", b"ID=test\n"), File("etc/motd", b"hello\n"),
    Dir("var/cache/apt"), File("var/cache/apt/pkgcache.bin", b"old cache\n"),
    Dir("usr/share/doc/pkg"), File("usr/share/doc/pkg/README", b"docs\n"),
    File("usr/bin/tool", b"#!/bin/sh\n", mode=0o755),
    Hardlink("usr/bin/tool-alias", "usr/bin/tool"),
    Symlink("bin", "usr/bin"),
])
MIDDLE = Layer([
    Whiteout("etc/motd"),                       # a file deleted
    Whiteout("usr/share/doc"),                  # a whole directory deleted
    Opaque("var/cache/apt"),                    # lower content hidden ...
    File("var/cache/apt/fresh.bin", b"new cache\n"),   # ... but this layer's stays
    File("etc/hostname", b"v1\n"),
])
TOP = Layer([
    File("etc/motd", b"back again\n"),          # re-created after its whiteout
    File("etc/hostname", b"updated\n"),
    Dir("srv/data", mode=0o750, uid=1000, gid=1000),
    File("srv/data/file", b"x" * 5000, uid=1000, gid=1000),
])
LAYERS = [BASE, MIDDLE, TOP]


@pytest.fixture
def srv():
    with V1Server() as server:
        yield server


@pytest.fixture
def root(tmp_path):
    return tmp_path / "machines"


def publish(srv, layers=LAYERS, name=NAME, tag="latest", gzip_layers=True) -> list[str]:
    return srv.add_image(name, tag, [layer.tar for layer in layers], gzip_layers=gzip_layers)


def pull_v1(srv, root, *extra, ref=NAME, local=None, ca=True, retries=0):
    # No retries unless a test asks: the server's faults are permanent, and
    # backing off from them would only make the suite slow.
    args = ["pull", "--v1", "--index-url", srv.index_url, "--image-root", root,
            "--backend", "dir", "--retries", str(retries), *extra, ref]
    if ca:
        args[1:1] = ["--ca-file", srv.ca_file]
    return run_dkr(*args, *([local] if local else []))


def layer_dirs(root) -> list[str]:
    return sorted(p.name for p in root.iterdir() if re.fullmatch(r"\.dkr-(v1-)?[0-9a-f]+", p.name)) \
        if root.exists() else []


def dirs_of(srv, ids) -> list[str]:
    """Where the layers of ``ids`` are kept: under keys of this registry's own."""
    return sorted(f".dkr-{layer_key(srv.registry_host, i)}" for i in ids)


def fetched_layers(requests) -> list[str]:
    return [r.path.split("/")[3] for r in requests if r.path.endswith("/layer")]


# --- the happy path -------------------------------------------------------------------

def test_pull_matches_the_same_layers_through_v2(srv, registry, root, tmp_path):
    ids = publish(srv)
    assert_ok(pull_v1(srv, root))
    images.push_image(registry, "v1compare/test", "latest", Image(LAYERS))
    v2_root = tmp_path / "v2"
    assert_ok(pull(registry, "v1compare/test", v2_root, "--backend", "dir", local="test"))

    ours, theirs = tree_snapshot(root / LOCAL), tree_snapshot(v2_root / "test")
    assert diff_trees(theirs, ours, "v2", "v1") == []
    machine = root / LOCAL
    assert not os.path.lexists(machine / "usr/share/doc")
    assert sorted(os.listdir(machine / "var/cache/apt")) == ["fresh.bin"]
    assert (machine / "etc/motd").read_bytes() == b"back again\n"
    assert not [p for p in ours if ".wh." in p]
    assert layer_dirs(root) == dirs_of(srv, ids)


def test_pull_follows_the_seed_protocol(srv, root):
    ids = publish(srv)
    assert_ok(pull_v1(srv, root))
    index, *rest = srv.requests
    assert (index.server, index.path) == ("index", f"/v1/repositories/{NAME}/images")
    assert index.headers["X-Docker-Token"] == "true"
    assert "Authorization" not in index.headers
    top = ids[-1]
    assert [r.path for r in rest[:1]] == [f"/v1/repositories/{NAME}/tags/latest"]
    assert sorted(r.path for r in rest[1:3]) == [f"/v1/images/{top}/ancestry",
                                                 f"/v1/images/{top}/json"]
    assert fetched_layers(rest[3:]) == ids                        # base first
    (token,) = srv.tokens
    assert all(r.server == "registry" and r.headers["Authorization"] == f"Token {token}"
               for r in rest)

    record = json.loads((root / ".dkr/machines" / f"{LOCAL}.json").read_text())
    assert record["reference"] == f"v1:{srv.index_url}/{NAME}:latest"
    assert (record["image_id"], record["ids"]) == (top, ids)
    assert record["layers"] == [layer_key(srv.registry_host, i) for i in ids]
    config = json.loads((root / ".dkr/blobs/sha256" / record["config_digest"][7:]).read_text())
    assert config["id"] == top and config["config"]["Cmd"] == ["/bin/sh"]
    layer = json.loads((root / ".dkr/layers" / f"{record['layers'][1]}.json").read_text())
    assert (layer["v1_id"], layer["parent"]) == (ids[1], ids[0])


def test_without_a_token_every_request_asks_for_one(root):
    with V1Server(require_token=False) as srv:
        publish(srv, gzip_layers=False)
        srv.omit_token = True
        assert_ok(pull_v1(srv, root, ref=f"{NAME}:latest", local="notoken"))
        registry_requests = [r for r in srv.requests if r.server == "registry"]
    assert registry_requests
    assert all(r.headers["X-Docker-Token"] == "true" and "Authorization" not in r.headers
               for r in registry_requests)
    assert (root / "notoken/etc/hostname").read_bytes() == b"updated\n"


def test_insecure_skips_tls_verification(srv, root):
    publish(srv)
    untrusted = pull_v1(srv, root, ca=False)
    assert_clean_failure(untrusted, root, r"Failed to retrieve images list\. \(Wrong index URL\?\)"
                         r".*curl error 60", LOCAL)
    assert_ok(pull_v1(srv, root, "--insecure", ca=False))


# --- reuse -------------------------------------------------------------------------

def test_shared_layers_are_skipped(srv, root):
    first_ids = publish(srv)
    other = Layer([File("etc/hostname", b"other\n")])
    second_ids = publish(srv, [BASE, MIDDLE, other], name="library/other")
    assert second_ids[:2] == first_ids[:2] and second_ids[2] != first_ids[2]

    assert_ok(pull_v1(srv, root))
    seen = len(srv.requests)
    run = assert_ok(pull_v1(srv, root, "--json", ref="library/other"))
    assert fetched_layers(srv.requests[seen:]) == [second_ids[2]]
    for shared in first_ids[:2]:
        assert f"Layer {shared[:12]} already exists, skipping." in run.err
    # The events name v1 layers as any other: 12 hex of the id, the key as chain_id.
    phases = [(e["layer"], e.get("phase", "committed"), e.get("chain_id"))
              for e in run.events if e["event"] in ("phase", "layer-done")]
    key = layer_key(srv.registry_host, second_ids[2])
    assert phases[:2] == [(i[:12], "reused", None) for i in second_ids[:2]], phases
    assert (second_ids[2][:12], "committed", key) in phases and \
        phases[-1] == (second_ids[2][:12], "done", None), phases
    assert {e["local"] for e in run.events} == {"other"}
    assert (root / "other/etc/hostname").read_bytes() == b"other\n"
    assert (root / LOCAL / "etc/hostname").read_bytes() == b"updated\n"


def test_a_v1_registry_cannot_plant_a_layer_that_v2_reuses(srv, registry, root, tmp_path):
    """v1 ids are whatever the server says: one that names a v2 base layer's chain id
    must not become that layer for a later v2 pull."""
    images.push_image(registry, "victim/base", "latest",
                      Image([Layer([File("etc/os-release", b"ID=genuine\n")])]))
    elsewhere = tmp_path / "elsewhere"
    assert_ok(pull(registry, "victim/base", elsewhere, "--backend", "dir", local="victim"))
    [chain_key] = json.loads((elsewhere / ".dkr/machines/victim.json").read_text())["layers"]
    evil = Layer([File("etc/os-release", b"ID=evil\n")])
    srv.add_image("evil/img", "latest", [evil.tar], chosen_ids=[chain_key])
    assert_ok(pull_v1(srv, root, ref="evil/img", local="evil"))
    run = assert_ok(pull(registry, "victim/base", root, "--backend", "dir", local="victim"))
    assert "already exists" not in run.err
    assert (root / "victim" / "etc/os-release").read_bytes() == b"ID=genuine\n"
    assert (root / "evil" / "etc/os-release").read_bytes() == b"ID=evil\n"


def test_force_repull_reuses_everything(srv, root):
    ids = publish(srv)
    options = api.PullOptions(image_root=root, backend="dir", ca_file=srv.ca_file, retries=0)
    first = api.pull_v1(NAME, index_url=srv.index_url, options=options)
    assert (first.layers_fetched, first.layers_reused, first.chain) == (3, 0, ids)
    (root / LOCAL / "etc/hostname").write_text("changed by the user\n")

    same = assert_ok(pull_v1(srv, root))
    assert f"Machine {LOCAL} is up to date ({ids[-1]})." in same.err
    assert (root / LOCAL / "etc/hostname").read_bytes() == b"changed by the user\n"
    seen = len(srv.requests)
    options.force = True
    again = api.pull_v1(NAME, index_url=srv.index_url, options=options)
    assert (again.layers_fetched, again.layers_reused) == (0, 3)
    assert fetched_layers(srv.requests[seen:]) == []
    assert (root / LOCAL / "etc/hostname").read_bytes() == b"updated\n"


# --- concurrency -------------------------------------------------------------------

@pytest.mark.parametrize("stalled, failing, message", [
    ("json", "ancestry", "Failed to retrieve ancestry list."),
    ("ancestry", "json", "Failed to retrieve json data."),
])
def test_ancestry_and_json_are_fetched_side_by_side(srv, root, stalled, failing, message):
    """One answer stalls far beyond the test; the other fails at once.

    Only a client that sent both requests together sees the failure while the
    stalled one is still open (one after the other, it would wait for the stall,
    or never send the second request); the stalled transfer is then cancelled.
    """
    top = publish(srv)[-1]
    srv.delay[stalled] = 600
    srv.status[failing] = 500
    options = api.PullOptions(image_root=root, backend="dir", ca_file=srv.ca_file, retries=0)

    async def attempt():
        # A guard against a hang, not a measurement.
        return await asyncio.wait_for(
            api.pull_v1_async(NAME, index_url=srv.index_url, options=options), 60)

    with pytest.raises(DkrError) as failed:
        asyncio.run(attempt())
    assert str(failed.value).startswith(message) and "HTTP 500" in str(failed.value)
    paths = {r.path for r in srv.requests}
    assert {f"/v1/images/{top}/ancestry", f"/v1/images/{top}/json"} <= paths
    assert not os.path.lexists(root / LOCAL) and layer_dirs(root) == []


# --- every way the seed could fail ---------------------------------------------------

def _other_repos_image(srv, ids):
    srv.payload["tags"] = publish(srv, [Layer([File("secret", b"s")])], name="other/repo")[-1]


FAULTS = {
    # index
    "images-404": (lambda s, i: s.status.update(images=404),
                   r"Failed to retrieve images list\. \(Wrong index URL\?\) GET https://.*"
                   r"/images: HTTP 404: injected HTTP 404"),
    "no-endpoints": (lambda s, i: setattr(s, "omit_endpoints", True),
                     r"Didn't get registry information\."),
    "empty-endpoints": (lambda s, i: setattr(s, "endpoints", ""),
                        r"Didn't get registry information\."),
    "bad-endpoint": (lambda s, i: setattr(s, "endpoints", "evil host/x"),
                     r"Registry hostname is not valid: 'evil host/x'"),
    "one-bad-endpoint": (lambda s, i: setattr(s, "endpoints", f"{s.registry_host},bad_host"),
                         r"Registry hostname is not valid: 'bad_host'"),
    "no-token-401": (lambda s, i: setattr(s, "omit_token", True),
                     r"Failed to retrieve tags list\. GET .*/tags/latest: HTTP 401 "
                     r"\(the registry wants a token, and the index gave none\)"),
    # tags
    "tags-500": (lambda s, i: s.status.update(tags=500),
                 r"Failed to retrieve tags list\. GET https://.*/tags/latest: HTTP 500"),
    "tag-not-hex": (lambda s, i: s.payload.update(tags="ABCDEF"), r"Invalid tag id .*'ABCDEF'"),
    "tag-path": (lambda s, i: s.payload.update(tags="../../etc"), r"Invalid tag id .*'\.\./\.\./etc'"),
    "tag-not-string": (lambda s, i: s.payload.update(tags=["a" * 64]), r"Invalid tag id"),
    "tag-malformed": (lambda s, i: s.malformed.add("tags"),
                      r"Failed to parse JSON tag latest: malformed JSON"),
    "tag-nul": (lambda s, i: s.nul_byte.add("tags"),
                r"Failed to parse JSON tag latest: the payload contains NUL bytes"),
    "token-refused-401": (_other_repos_image,
                          r"Failed to retrieve .* HTTP 401 \(the registry refused the index's token\)"),
    # ancestry
    "ancestry-503": (lambda s, i: s.status.update(ancestry=503),
                     r"Failed to retrieve ancestry list\. GET https://.*/ancestry: HTTP 503"),
    "ancestry-duplicate": (lambda s, i: setattr(s, "ancestry_fault", "duplicate"),
                           r"Ancestry has duplicate entries"),
    "ancestry-empty": (lambda s, i: setattr(s, "ancestry_fault", "empty"), r"Ancestry is empty"),
    "ancestry-too-long": (lambda s, i: setattr(s, "ancestry_fault", "too_long"),
                          rf"Too many layers in ancestry of [0-9a-f]+: {MAX_ANCESTRY + 1}, "
                          rf"at most {MAX_ANCESTRY}"),
    "ancestry-foreign": (lambda s, i: setattr(s, "ancestry_fault", "foreign_first"),
                         r"Ancestry doesn't end in main layer\."),
    "ancestry-reversed": (lambda s, i: setattr(s, "ancestry_fault", "reversed"),
                          r"Ancestry doesn't end in main layer\."),
    "ancestry-bad-id": (lambda s, i: s.payload.update(ancestry=[i[-1], "NOT-HEX", i[0]]),
                        r"Invalid id in ancestry of [0-9a-f]+: 'NOT-HEX'"),
    "ancestry-object": (lambda s, i: s.payload.update(ancestry={"id": i[-1]}),
                        r"Failed to parse JSON ancestry of [0-9a-f]+: not a JSON array"),
    "ancestry-malformed": (lambda s, i: s.malformed.add("ancestry"),
                           r"Failed to parse JSON ancestry of [0-9a-f]+: malformed JSON"),
    "ancestry-nul": (lambda s, i: s.nul_byte.add("ancestry"), r"ancestry .*NUL bytes"),
    # json
    "json-403": (lambda s, i: s.status.update(json=403),
                 r"Failed to retrieve json data\. GET https://.*/json: HTTP 403"),
    "json-malformed": (lambda s, i: s.malformed.add("json"),
                       r"Failed to parse JSON json of [0-9a-f]+: malformed JSON"),
    "json-nul": (lambda s, i: s.nul_byte.add("json"), r"json of [0-9a-f]+: .*NUL bytes"),
    "json-not-object": (lambda s, i: s.payload.update(json=[1, 2]),
                        r"Invalid json data for image [0-9a-f]+: not a JSON object"),
    "json-other-image": (lambda s, i: s.payload.update(json={"id": i[0]}),
                         r"Invalid json data for image [0-9a-f]+: it describes image"),
    "json-truncated": (lambda s, i: s.truncate.update(json=10),
                       r"Failed to retrieve json data\. GET .*/json: .*\(curl error 18\)"),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_metadata_faults_fail_cleanly(srv, root, fault):
    setup, pattern = FAULTS[fault]
    setup(srv, publish(srv))
    assert_clean_failure(pull_v1(srv, root), root, pattern, LOCAL)
    assert layer_dirs(root) == []        # no layer was even started


@pytest.mark.parametrize("fault, pattern", [
    ("status", r"Failed to retrieve layer data\. \(layer 2/3 (?P<id>[0-9a-f]+)\) "
               r"GET https://.*/v1/images/(?P=id)/layer: HTTP 500"),
    ("truncate", r"Failed to retrieve layer data\. \(layer 2/3 (?P<id>[0-9a-f]+)\) "
                 r"GET https://.*/v1/images/(?P=id)/layer: .*\(curl error 18\)"),
    ("garbage", r"Failed to unpack layer 2/3 [0-9a-f]+: "),
])
def test_layer_faults_fail_cleanly(srv, root, fault, pattern):
    # Plain tar: a cut at a block boundary looks like a whole archive, so only
    # the transfer itself can tell that bytes are missing.
    ids = publish(srv, gzip_layers=False)
    if fault == "status":
        srv.status[ids[1]] = 500
    elif fault == "truncate":
        srv.truncate[ids[1]] = 1024
    else:
        srv.images[ids[1]].layer = b"\x1f\x8b" + b"not a gzip stream" * 10
    failed = pull_v1(srv, root)
    assert_clean_failure(failed, root, pattern, LOCAL)
    assert ids[1] in failed.err
    assert layer_dirs(root) == dirs_of(srv, ids[:1])      # the finished base layer stays
    srv.reset_faults()
    srv.images[ids[1]].layer = srv.images[ids[1]].tar
    retry = assert_ok(pull_v1(srv, root))
    assert f"Layer {ids[0][:12]} already exists, skipping." in retry.err


@pytest.mark.parametrize("fault, pattern", [
    ("status", r"\(layer 2/3 (?P<id>[0-9a-f]+)\) GET https://.*/v1/images/(?P=id)/layer: (HTTP|registry answered) 503"),
    ("truncate", r"\(layer 2/3 (?P<id>[0-9a-f]+)\) GET https://.*/v1/images/(?P=id)/layer: "
                 r".*\(curl error 18\) \(gave up after 2 attempts\)"),
])
def test_layer_faults_are_retried(srv, root, fault, pattern):
    ids = publish(srv, gzip_layers=False)
    if fault == "status":
        srv.status[ids[1]] = 503
    else:
        srv.truncate[ids[1]] = 1024
    failed = pull_v1(srv, root, retries=1)
    assert_clean_failure(failed, root, r"Failed to retrieve layer data\. " + pattern, LOCAL)
    assert fetched_layers(srv.requests) == [ids[0], ids[1], ids[1]]


@pytest.mark.parametrize("args, pattern", [
    (["library"], r"invalid v1 name 'library'"),
    (["a/b/c"], r"invalid v1 name"),
    (["library/.."], r"invalid v1 name"),
    (["library/test:bad tag!"], r"invalid v1 tag"),
    ([NAME, ".dkr-evil"], r"invalid machine name '\.dkr-evil'"),
    ([NAME, "../escape"], r"invalid machine name '\.\./escape'"),
    (["library/x_y..z"], r"invalid machine name"),
])
def test_bad_names_are_refused_before_any_request(srv, root, args, pattern):
    failed = pull_v1(srv, root, ref=args[0], local=(args[1:] or [None])[0])
    assert_clean_failure(failed, root, pattern)
    assert srv.requests == []


@pytest.mark.parametrize("url, extra, pattern", [
    ("ftp://127.0.0.1/", [], r"invalid index URL 'ftp://127\.0\.0\.1/'"),
    ("https://user:pw@127.0.0.1/", [], r"invalid index URL"),
    ("https://127.0.0.1/?q=1", [], r"invalid index URL"),
    ("http://127.0.0.1:1", [], r"plain http.*--insecure"),
    ("https://127.0.0.1:1", [], r"Failed to retrieve images list\. \(Wrong index URL\?\) "
                                r"GET https://127\.0\.0\.1:1/v1/repositories/library/test/images: "
                                r".*\(curl error 7\)"),
])
def test_bad_index_urls(root, url, extra, pattern):
    failed = run_dkr("pull", "--v1", "--index-url", url, "--image-root", root,
                     "--backend", "dir", *extra, NAME)
    assert_clean_failure(failed, root, pattern, LOCAL)


# --- the checks themselves ---------------------------------------------------------------

def test_ancestry_rules():
    a, b, c = "a" * 64, "b" * 64, "c" * 64
    assert parse_ancestry([c, b, a], c) == [a, b, c]
    assert OUR_MAX == MAX_ANCESTRY
    ids = [f"{n:064x}" for n in range(1, MAX_ANCESTRY + 1)]
    assert parse_ancestry(ids, ids[0])[-1] == ids[0]           # exactly at the limit is fine
    for value, message in [([], "Ancestry is empty"), ([c, b, b, a], "duplicate entries"),
                           ([b, a], "doesn't end in main layer"), ([c, None], "Invalid id"),
                           ([c, "C" * 64], "Invalid id"), ("c", "not a JSON array")]:
        with pytest.raises(DkrError, match=message):
            parse_ancestry(value, c)


def test_endpoint_rules():
    assert parse_endpoints(["reg.example.com:5000, mirror.example.com"]) == \
        ["reg.example.com:5000", "mirror.example.com"]
    assert parse_endpoints(["127.0.0.1:443"]) == ["127.0.0.1:443"]
    for bad in ["a,,b", "https://reg", "reg/path", "reg:port", "-reg", "a b"]:
        with pytest.raises(DkrError, match="Registry hostname is not valid"):
            parse_endpoints([bad])
    with pytest.raises(DkrError, match="Didn't get registry information"):
        parse_endpoints([])


def test_token_auth():
    auth = TokenAuth("signature=abc")
    assert asyncio.run(auth.headers("tags")) == ["Authorization: Token signature=abc"]
    assert asyncio.run(TokenAuth(None).headers("tags")) == ["X-Docker-Token: true"]
    with pytest.raises(DkrError, match=r"HTTP 401 \(the registry refused the index's token\)"):
        asyncio.run(auth.answer(None, "tags"))
