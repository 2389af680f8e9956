"""Digests, media types and limits: what a registry says is checked before it is used.

A manifest fetched by digest must have that digest; its mediaType must agree
with the Content-Type; unknown media types and schema versions are refused by
name; JSON bodies are capped at 4 MiB and blob bodies at their descriptor's
size, cut off as soon as they run past; more than 2048 layers are refused
before any download. A full disk fails clearly and leaves the image root as it
was; memory stays bounded however big a layer is.

Manifests a real registry would refuse to store are served by the fault
proxy's ``status`` fault (any body, any headers); bodies that never end come
from a tiny fake registry in this file.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import re
import socket
import stat
import subprocess
import sys
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import Run, assert_clean_failure, assert_ok, pull, temp_entries
from reliability_helpers import (
    BlobLayer,
    check_layers_complete,
    fingerprint,
    layer_dir,
    need,
    visible_layers,
)

from dkr.testing import images, loopfs
from dkr.testing.faultproxy import FaultProxy
from dkr.testing.images import Dir, File, Image, Layer
from dkr.registry.v2 import chain_ids as v2_chain_ids

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+prettyjws"
MiB = 1024 * 1024

IMAGE = Image([Layer([Dir("etc"), File("etc/limits", b"limits\n")])])


@pytest.fixture(scope="module")
def proxy(registry):
    images.push_image(registry, "limits/img", "latest", IMAGE)
    with FaultProxy("127.0.0.1", registry.port) as p:
        yield p


@pytest.fixture(autouse=True)
def fresh_proxy(request):
    if "proxy" in request.fixturenames:
        proxy = request.getfixturevalue("proxy")
        proxy.clear_faults()
        proxy.clear_log()


def dkr_pull(server, root, ref="limits/img", *extra) -> Run:
    return pull(server, ref, root, "--backend", "dir", "--retries", "1", *extra, local="img")


def serve_manifest(proxy, body: bytes, content_type: str, ref: str = "latest") -> None:
    proxy.add_fault(f"/manifests/{ref}$", "status", times=None, code=200, body=body,
                    headers={"Content-Type": content_type})


def manifest(**changes) -> dict:
    doc = json.loads(IMAGE.manifest_bytes)
    doc.update(changes)
    return {k: v for k, v in doc.items() if v is not None}


def body(doc: dict) -> bytes:
    return json.dumps(doc).encode()


def blob_gets(proxy) -> list:
    return [e for e in proxy.log_for("/blobs/") if e.method == "GET"]


def layer_gets(proxy) -> list:
    return [e for e in blob_gets(proxy) if IMAGE.layers[0].digest in e.path]


# --- digests ---------------------------------------------------------------------------------

def test_manifest_by_digest_is_checked(proxy, image_root):
    digest = IMAGE.manifest_digest
    proxy.add_fault(f"/manifests/{digest}", "corrupt", times=None, offset=40)
    run = dkr_pull(proxy, image_root, f"limits/img@{digest}")
    assert_clean_failure(run, image_root, rf"manifest {digest}: content has digest sha256:\w+, "
                                           "not the requested one", "img")
    assert blob_gets(proxy) == []


def test_config_digest_is_checked(proxy, image_root):
    proxy.add_fault(f"/blobs/{IMAGE.config_digest}", "corrupt", times=None, offset=10)
    run = dkr_pull(proxy, image_root)
    assert_clean_failure(run, image_root, rf"config {IMAGE.config_digest}: content does not "
                                           "match its digest", "img")
    assert layer_gets(proxy) == []


def test_a_layer_that_failed_its_digest_is_not_reused(proxy, image_root):
    proxy.add_fault(f"/blobs/{IMAGE.layers[0].digest}", "corrupt", offset=20)
    failed = dkr_pull(proxy, image_root)
    assert_clean_failure(failed, image_root, r"content does not match its digest", "img")
    assert visible_layers(image_root) == []
    assert_ok(dkr_pull(proxy, image_root))
    assert (image_root / "img" / "etc" / "limits").read_bytes() == b"limits\n"


def test_wrong_diff_id_commits_nothing_and_poisons_nothing(registry, image_root):
    """Layer 2's tar is not what the config says: layer 1 may stay, layer 2 never appears.

    Its chain id comes from the (wrong) config, so nothing may be left under
    it; the same blobs with a correct config then pull cleanly.
    """
    base = Layer([Dir("etc"), File("etc/base", b"base\n")])
    top = Layer([File("top", b"top\n")])
    bad = Image([base, top])
    bad.config_json["rootfs"]["diff_ids"][1] = "sha256:" + "1" * 64
    images.push_image(registry, "limits/diffid", "bad", bad)
    run = pull(registry, "limits/diffid:bad", image_root, "--backend", "dir", local="img")
    assert_clean_failure(run, image_root, rf"layer {top.digest}: unpacked content has DiffID "
                                           rf"{top.diff_id}, the config says sha256:1111", "img")
    bad_chain = v2_chain_ids(bad.config_json["rootfs"]["diff_ids"])
    assert visible_layers(image_root) in ([], [layer_dir(image_root, bad_chain[0])])
    assert not layer_dir(image_root, bad_chain[1]).exists()
    good = Image([base, top])
    images.push_image(registry, "limits/diffid", "good", good)
    assert_ok(pull(registry, "limits/diffid:good", image_root, "--backend", "dir", local="img"))
    assert (image_root / "img" / "top").read_bytes() == b"top\n"
    assert not layer_dir(image_root, bad_chain[1]).exists()


# --- media types and schema versions ---------------------------------------------------------

def assert_manifest_refused(proxy, image_root, doc, content_type, message):
    """Served as ``content_type``, ``doc`` fails the pull with ``message``, before any blob."""
    serve_manifest(proxy, body(doc), content_type)
    run = dkr_pull(proxy, image_root)
    assert_clean_failure(run, image_root, message, "img")
    assert blob_gets(proxy) == []


@pytest.mark.parametrize("doc, content_type, message", [
    (manifest(), DOCKER_MANIFEST, re.escape(f"body says {OCI_MANIFEST} but Content-Type says "
                                            f"{DOCKER_MANIFEST}")),
    (manifest(), OCI_INDEX,
     re.escape(f"body says {OCI_MANIFEST} but Content-Type says {OCI_INDEX}")),
    (manifest(mediaType=None), OCI_INDEX, re.escape(f"{OCI_INDEX} has the fields of another kind")),
    ({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}, OCI_MANIFEST,
     re.escape(f"body says {OCI_INDEX} but Content-Type says {OCI_MANIFEST}")),
], ids=["oci-as-docker", "manifest-as-index", "untyped-manifest-as-index", "index-as-manifest"])
def test_media_type_must_match_content_type(proxy, image_root, doc, content_type, message):
    assert_manifest_refused(proxy, image_root, doc, content_type, message)


def test_registry_refuses_such_a_push_too(registry):
    """The real registry will not store a mismatch; that is why the proxy serves them."""
    from dkr.testing.registry import RegistryError
    with pytest.raises(RegistryError, match="MANIFEST_INVALID"):
        registry.push_manifest("limits/mismatch", "latest", IMAGE.manifest_bytes, DOCKER_MANIFEST)


@pytest.mark.parametrize("doc, content_type, message", [
    (manifest(mediaType="application/vnd.example.manifest.v1+json"),
     "application/vnd.example.manifest.v1+json",
     r"unsupported manifest media type 'application/vnd\.example\.manifest\.v1\+json'"),
    ({"schemaVersion": 1, "name": "limits/img", "tag": "latest", "fsLayers": []}, DOCKER_SCHEMA1,
     r"Docker schema1 manifest \(schemaVersion 1\) is not supported"),
    (manifest(schemaVersion=3), OCI_MANIFEST, r"manifest \(schemaVersion 3\) is not supported"),
    (manifest(schemaVersion="2"), OCI_MANIFEST, r"\(schemaVersion '2'\) is not supported"),
], ids=["unknown-manifest-type", "schema1", "schema3", "schema-as-string"])
def test_unknown_types_and_versions_refused_by_name(proxy, image_root, doc, content_type, message):
    assert_manifest_refused(proxy, image_root, doc, content_type, message)


@pytest.mark.parametrize("where, media_type, message", [
    ("layer", "application/vnd.example.layer.v1.tar+lz4",
     r"layer sha256:\w+ has unsupported media type "
     r"'application/vnd\.example\.layer\.v1\.tar\+lz4'"),
    ("config", "application/vnd.example.config.v1+json",
     r"unsupported config media type 'application/vnd\.example\.config\.v1\+json'"),
])
def test_unknown_layer_and_config_types_refused_by_name(registry, proxy, image_root, where,
                                                        media_type, message):
    doc = manifest()
    if where == "layer":
        doc["layers"][0]["mediaType"] = media_type
    else:
        doc["config"]["mediaType"] = media_type
    registry.push_manifest("limits/img", f"odd-{where}", body(doc), OCI_MANIFEST)
    run = dkr_pull(proxy, image_root, f"limits/img:odd-{where}")
    assert_clean_failure(run, image_root, message, "img")
    assert blob_gets(proxy) == []


# --- counts and sizes ---------------------------------------------------------------------------

def test_too_many_layers_refused_before_any_download(registry, proxy, image_root):
    doc = manifest()
    doc["layers"] = doc["layers"] * 2049
    registry.push_manifest("limits/img", "many", body(doc), OCI_MANIFEST)
    run = dkr_pull(proxy, image_root, "limits/img:many")
    assert_clean_failure(run, image_root, r"manifest lists 2049 layers, more than the limit of "
                                           r"2048", "img")
    assert blob_gets(proxy) == []          # not even the config


def test_manifest_over_4_mib_refused(proxy, image_root):
    doc = manifest(annotations={"padding": "x" * (4 * MiB)})
    serve_manifest(proxy, body(doc), OCI_MANIFEST)
    run = dkr_pull(proxy, image_root)
    assert_clean_failure(run, image_root, r"response of \d+ bytes is over the 4194304 byte limit",
                          "img")


def test_blob_announcing_more_than_its_descriptor_is_refused(registry, proxy, image_root):
    doc = manifest()
    real = doc["layers"][0]["size"]
    doc["layers"][0]["size"] = real - 100
    registry.push_manifest("limits/img", "short", body(doc), OCI_MANIFEST)
    run = dkr_pull(proxy, image_root, "limits/img:short")
    assert_clean_failure(run, image_root, rf"server announced {real} bytes, expected {real - 100}",
                          "img")
    assert visible_layers(image_root) == []


def test_config_announcing_more_than_its_descriptor_is_refused(registry, proxy, image_root):
    doc = manifest()
    real = doc["config"]["size"]
    doc["config"]["size"] = real - 1
    registry.push_manifest("limits/img", "shortconfig", body(doc), OCI_MANIFEST)
    run = dkr_pull(proxy, image_root, "limits/img:shortconfig")
    assert_clean_failure(run, image_root, rf"server announced {real} bytes, expected {real - 1}",
                          "img")


# --- bodies that never end: a fake registry -------------------------------------------------------

# An endless body offers 256 MiB; what the server got out before dkr hung up is bounded by
# what dkr read plus what the kernel buffers on the way (socket buffers autotune to MiBs).
ENDLESS_PIECES = 4096
SLACK = 16 * MiB


class _Endless(BaseHTTPRequestHandler):
    """GET /v2/ answers; anything in ``server.routes`` is sent chunked, forever or as given."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path == "/v2/":
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")
            return
        for pattern, (content_type, head, endless) in self.server.routes.items():
            if re.search(pattern, self.path):
                break
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        # A small send buffer keeps what the kernel holds in flight (counted as sent) small.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        sent = self.server.sent
        try:
            for piece in [head, *([b" " * 65536] * (ENDLESS_PIECES if endless else 0))]:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                sent[self.path] = sent.get(self.path, 0) + len(piece)
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass                     # the client hung up: that is the point


@contextmanager
def fake_registry(routes: dict):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Endless)
    server.daemon_threads = True
    server.routes = routes
    server.sent = {}
    server.host = f"127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_endless_manifest_is_cut_off_at_4_mib(image_root):
    routes = {r"/manifests/": (OCI_MANIFEST, b'{"schemaVersion": 2, "pad": "', True)}
    with fake_registry(routes) as server:
        run = dkr_pull(server, image_root)
        sent = sum(server.sent.values())
    assert_clean_failure(run, image_root, r"response is over the 4194304 byte limit", "img")
    assert sent < 4 * MiB + SLACK, f"the server got {sent} bytes out before dkr hung up"


def _fake_image_routes(layer_endless: bool, config_endless: bool) -> dict:
    layer_blob = IMAGE.layers[0].blob
    config = IMAGE.config_bytes
    return {
        r"/manifests/": (OCI_MANIFEST, IMAGE.manifest_bytes, False),
        rf"/blobs/{IMAGE.config_digest}": ("application/octet-stream", config, config_endless),
        rf"/blobs/{IMAGE.layers[0].digest}": ("application/octet-stream", layer_blob,
                                              layer_endless),
    }


def test_endless_layer_blob_is_cut_off_when_it_runs_past_its_size(image_root):
    with fake_registry(_fake_image_routes(layer_endless=True, config_endless=False)) as server:
        run = dkr_pull(server, image_root)
        sent = sum(n for path, n in server.sent.items() if IMAGE.layers[0].digest in path)
    size = IMAGE.layers[0].size
    assert_clean_failure(run, image_root, rf"body runs past the expected {size} bytes", "img")
    assert sent < size + SLACK, f"the server got {sent} bytes out before dkr hung up"
    assert visible_layers(image_root) == []


def test_endless_config_is_cut_off_when_it_runs_past_its_size(image_root):
    with fake_registry(_fake_image_routes(layer_endless=False, config_endless=True)) as server:
        run = dkr_pull(server, image_root)
        sent = sum(n for path, n in server.sent.items() if IMAGE.config_digest in path)
    size = len(IMAGE.config_bytes)
    assert_clean_failure(run, image_root, rf"body runs past the expected {size} bytes", "img")
    assert sent < size + SLACK, f"the server got {sent} bytes out before dkr hung up"


# --- memory and disk ---------------------------------------------------------------------------

RSS_PROBE = ("import resource, subprocess, sys\n"
             "rc = subprocess.call(sys.argv[1:])\n"
             "print('MAXRSS-KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,"
             " file=sys.stderr)\n"
             "sys.exit(rc)\n")


def test_memory_stays_bounded(registry, image_root):
    """128 MiB of tar (zeros, a small gzip) and a 64 MiB uncompressed blob: never held whole.

    ru_maxrss of the children is the largest of dkr and, since dkr waits for
    them, its extractors (each about 40 MiB on its own): holding either whole
    would push it past the limit.
    """
    tar = Layer([File("zeros", bytes(128 * MiB))]).tar
    zeros = BlobLayer(gzip.compress(tar, compresslevel=1, mtime=0), tar)
    noise = Layer([File("noise", random.Random(9).randbytes(64 * MiB))], compression="none")
    images.push_image(registry, "limits/big", "latest", Image([zeros, noise]))
    proc = subprocess.run([sys.executable, "-c", RSS_PROBE, sys.executable, "-m", "dkr", "pull",
                           "--insecure", "--image-root", str(image_root), "--backend", "dir",
                           f"{registry.host}/limits/big"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    maxrss_kb = int(re.search(r"MAXRSS-KB (\d+)", proc.stderr)[1])
    assert maxrss_kb < 96 * 1024, f"a dkr process grew to {maxrss_kb // 1024} MiB"
    assert (image_root / "big" / "zeros").stat().st_size == 128 * MiB


@pytest.fixture
def small_fs():
    need(loopfs.unavailable_reason("ext4"))
    try:
        with loopfs.ext4("24M") as mount:
            yield mount
    except loopfs.LoopFsError as e:
        need(str(e))


def _state(root: Path, keep_out=(".dkr/partial",)) -> dict:
    """fingerprint() of the image root; a directory's own times change as entries come and go."""
    state = {}
    for path, value in fingerprint(root).items():
        if any(path == k or path.startswith(k + "/") for k in keep_out):
            continue
        if stat.S_ISDIR(value[0]):
            value = value[:5]
        state[path] = value
    return state


def _disk_full_run(registry, root: Path, repo: str, image: Image) -> tuple[Run, dict]:
    images.push_image(registry, "limits/img", "latest", IMAGE)
    assert_ok(pull(registry, "limits/img", root, "--backend", "dir", local="before"))
    images.push_image(registry, repo, "latest", image)
    before = _state(root)
    run = pull(registry, repo, root, "--backend", "dir", "--retries", "1", local="full")
    return run, before


BOMB = Image([Layer([File("zeros", bytes(64 * MiB))])])              # a 64 kB gzip
NOISE = Image([Layer([File("noise", random.Random(4).randbytes(40 * MiB))], compression="none")])


@pytest.mark.parametrize("image, where", [(BOMB, "extracting"), (NOISE, "downloading")],
                         ids=["gzip-bomb-fills-the-disk", "spool-fills-the-disk"])
def test_disk_full_fails_clearly_and_changes_nothing_visible(registry, small_fs, image, where):
    root = small_fs / "machines"
    run, before = _disk_full_run(registry, root, f"limits/full-{where}", image)
    assert_clean_failure(run, root, r"(?i)no space left on device", "full")
    after = _state(root)
    visible = lambda state: {p: v for p, v in state.items() if not p.startswith(".dkr/")}  # noqa: E731
    assert visible(after) == visible(before), "layers or machines changed"
    check_layers_complete(root)
    assert temp_entries(root) == []


def test_disk_full_leaves_the_image_root_as_it_was(registry, small_fs):
    """Not even the manifest and config of the failed image are kept (lock files may stay)."""
    root = small_fs / "machines"
    run, before = _disk_full_run(registry, root, "limits/full-asitwas", BOMB)
    assert run.rc != 0
    after = _state(root, keep_out=(".dkr/partial", ".dkr/locks"))
    before = {p: v for p, v in before.items() if not p.startswith(".dkr/locks")}
    added = sorted(set(after) - set(before))
    changed = sorted(p for p in set(after) & set(before) if after[p] != before[p]
                     and os.path.isfile(root / p))
    assert added == [] and changed == [], f"added {added}, changed {changed}"
