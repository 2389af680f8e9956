"""Pulls over HTTPS: HTTP/2 on one connection, whom dkr trusts, and what it says when not."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
import time

import pytest
from helpers import assert_clean_failure, assert_ok, run_dkr, storage_server

from dkr.testing import images
from dkr.testing.images import File, Image, Layer
from dkr.testing.oracle import diff_trees, tree_snapshot, umoci_unpack
from dkr.testing.registry import Registry, TestCA, free_port


def _image(layers: int = 4) -> Image:
    return Image([Layer([File(f"layer{i}/data", bytes([i]) * 300_000, mode=0o644)])
                  for i in range(layers)])


def _pull(reg: Registry, repo: str, root, *extra, env=None):
    ref = f"{reg.url.removeprefix('https://')}/{repo}"
    return run_dkr("pull", "--image-root", root, "--backend", "dir", *extra, ref, env=env)


def _requests_since(reg: Registry, offset: int, timeout: float = 5.0) -> list[tuple[str, str]]:
    """(protocol, client address) of each request the registry logged after ``offset``."""
    deadline = time.monotonic() + timeout
    while True:
        log = reg.log_path.read_text()[offset:]
        addresses = re.findall(r'http\.request\.remoteaddr="([^"]+)"', log)
        protocols = re.findall(r'"(?:GET|HEAD) \S+ (HTTP/[\d.]+)"', log)
        if len(protocols) == len(addresses) or time.monotonic() > deadline:
            return list(zip(protocols, addresses))
        time.sleep(0.1)


def test_pull_over_https_multiplexes_on_one_http2_connection(image_root, tmp_path):
    with Registry(tls=True) as reg:
        images.push_image(reg, "secure/img", "v1", _image())
        offset = len(reg.log_path.read_text())
        assert_ok(_pull(reg, "secure/img:v1", image_root, "--ca-file", reg.ca_file))
        requests = _requests_since(reg, offset)
        oracle = umoci_unpack(reg, "secure/img", "v1", tmp_path / "oracle", insecure=False)
    assert len(requests) >= 6, requests           # /v2/, manifest, config, four layers
    assert {protocol for protocol, _ in requests} == {"HTTP/2.0"}, requests
    assert len({address for _, address in requests}) == 1, requests
    assert diff_trees(tree_snapshot(oracle), tree_snapshot(image_root / "img")) == []


def test_a_certificate_no_trusted_ca_signed_is_one_error_at_once(image_root):
    with Registry(tls=True) as reg:
        images.push_image(reg, "secure/img", "v1", _image(1))
        run = _pull(reg, "secure/img:v1", image_root)
    assert_clean_failure(run, image_root, r"certificate of 127.0.0.1:\d+: give its CA with --ca-file",
                         local="img")
    assert "trying again" not in run.err                 # another attempt cannot help


@pytest.mark.parametrize("content,pattern", [
    (None, r"CA file .*/missing\.pem: No such file or directory"),
    (b"not a certificate\n", r"CA file .*/missing\.pem: no PEM certificate in it"),
])
def test_a_ca_file_that_cannot_serve_is_named_before_the_pull(image_root, tmp_path,
                                                            content, pattern):
    ca_file = tmp_path / "missing.pem"
    if content is not None:
        ca_file.write_bytes(content)
    with Registry(tls=True) as reg:
        images.push_image(reg, "secure/img", "v1", _image(1))
        offset = len(reg.log_path.read_text())
        run = _pull(reg, "secure/img:v1", image_root, "--ca-file", ca_file)
        requests = _requests_since(reg, offset, timeout=0)
    assert_clean_failure(run, image_root, pattern, local="img")
    assert requests == []


@pytest.fixture
def registry_with_blobs_elsewhere(tmp_path):
    """A registry on one CA whose blob GETs redirect to a store on another CA."""
    store_ca = TestCA(tmp_path / "store-ca", name="public CA stand-in")
    port = free_port()
    with Registry(tls=True, redirect_blobs_to=f"https://localhost:{port}/") as reg, \
            storage_server(reg, port, store_ca.server_context()) as seen:
        yield reg, store_ca, seen


def test_ca_file_adds_to_the_system_bundle(registry_with_blobs_elsewhere, image_root):
    """--ca-file trusts the registry's private CA; blobs from storage with a
    certificate the system trusts still come (SSL_CERT_FILE stands in for the
    system's bundle here)."""
    reg, store_ca, served = registry_with_blobs_elsewhere
    images.push_image(reg, "private/img", "v1", _image(2))
    env = dict(os.environ, SSL_CERT_FILE=str(store_ca.cert_path))
    assert_ok(_pull(reg, "private/img:v1", image_root, "--ca-file", reg.ca_file, env=env))
    assert len([path for path, _ in served if path.endswith("/data")]) == 3, served
    assert (image_root / "img" / "layer1" / "data").read_bytes() == bytes([1]) * 300_000


def test_without_the_system_bundle_the_blob_store_is_not_trusted(
        registry_with_blobs_elsewhere, image_root, tmp_path):
    reg, store_ca, served = registry_with_blobs_elsewhere
    images.push_image(reg, "private/img", "v1", _image(2))
    unrelated = TestCA(tmp_path / "unrelated", name="unrelated CA")
    env = dict(os.environ, SSL_CERT_FILE=str(unrelated.cert_path))
    run = _pull(reg, "private/img:v1", image_root, "--ca-file", reg.ca_file, env=env)
    assert_clean_failure(run, image_root, r"certificate of localhost:\d+: give its CA with --ca-file",
                         local="img")
    assert served == []


def test_a_stale_ssl_cert_file_is_warned_about_and_the_system_bundle_used(image_root, tmp_path):
    with Registry(tls=True) as reg:
        images.push_image(reg, "secure/img", "v1", _image(1))
        env = dict(os.environ, SSL_CERT_FILE=str(tmp_path / "gone.pem"))
        run = assert_ok(_pull(reg, "secure/img:v1", image_root, "--ca-file", reg.ca_file,
                              env=env))
    assert re.search(r"SSL_CERT_FILE .*/gone\.pem: No such file or directory; trusting the "
                     r"system's CA bundle instead", run.err), run.err


def test_a_certificate_for_another_name_is_not_blamed_on_the_ca(image_root, tmp_path):
    """curl error 60 also means a name that does not match: the CA hint would mislead."""
    ca = TestCA(tmp_path / "ca")
    context = ca.server_context(hosts=("other.example",))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve():
            with contextlib.suppress(OSError):       # the client hangs up on the handshake
                while True:
                    with context.wrap_socket(listener.accept()[0], server_side=True) as conn:
                        conn.recv(1)
        threading.Thread(target=serve, daemon=True).start()
        run = run_dkr("pull", "--image-root", image_root, "--backend", "dir", "--ca-file",
                      ca.cert_path, f"127.0.0.1:{port}/secure/img")
    assert_clean_failure(run, image_root, r"subject name.*curl error 60\)$", local="img")
