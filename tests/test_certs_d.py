"""certs.d: a registry's own CA and client certificate (mutual TLS), per host."""

from __future__ import annotations

import os
import shutil

import pytest
from helpers import assert_clean_failure, assert_ok, run_dkr

from dkr.testing import images
from dkr.testing.images import File, Image, Layer
from dkr.testing.registry import Registry, TestCA


@pytest.fixture(scope="module")
def mtls(tmp_path_factory):
    """A registry that demands a client certificate its CA signed (http.tls.clientcas)."""
    ca = TestCA(tmp_path_factory.mktemp("ca"))
    client = ca.issue("client", hosts=("dkr-client",), client=True)
    with Registry(tls=ca, client_cas=[ca.cert_path], client_cert=client) as reg:
        images.push_image(reg, "secure/img", "v1",
                          Image([Layer([File("etc/hello", b"hello\n")])]))
        yield reg, ca, client


def _env(home) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("SSL_CERT_FILE",)}
    env.update(HOME=str(home), CONTAINERS_REGISTRIES_CONF=os.devnull)
    return env


def _pull(reg, root, *extra, env):
    return run_dkr("pull", "--image-root", root, "--backend", "dir", *extra,
                   f"{reg.host}/secure/img:v1", env=env)


def _cert_dir(where, ca, client, cert=True, key=True):
    where.mkdir(parents=True)
    shutil.copy(ca.cert_path, where / "ca.crt")
    if cert:
        shutil.copy(client[0], where / "client.cert")
    if key:
        shutil.copy(client[1], where / "client.key")
    return where


def test_without_a_client_certificate_the_pull_fails_clearly(mtls, tmp_path):
    reg, ca, _ = mtls
    run = _pull(reg, tmp_path / "root", "--ca-file", ca.cert_path,
                env=_env(tmp_path))
    assert_clean_failure(run, tmp_path / "root",
                         r"client certificate.*certs\.d/127\.0\.0\.1:\d+")


def test_the_hosts_certs_d_gives_ca_and_client_pair(mtls, tmp_path):
    reg, ca, client = mtls
    home = tmp_path / "home"
    _cert_dir(home / ".config/containers/certs.d" / reg.host, ca, client)
    assert_ok(_pull(reg, tmp_path / "root", env=_env(home)))
    assert (tmp_path / "root/img/etc/hello").read_bytes() == b"hello\n"


def test_cert_dir_names_the_directory_for_every_host(mtls, tmp_path):
    reg, ca, client = mtls
    directory = _cert_dir(tmp_path / "certs", ca, client)
    assert_ok(_pull(reg, tmp_path / "root", "--cert-dir", directory, env=_env(tmp_path)))


def test_a_host_ca_is_trusted_for_that_host_only(mtls, tmp_path):
    reg, ca, client = mtls
    home = tmp_path / "home"
    _cert_dir(home / ".config/containers/certs.d/127.0.0.1:1", ca, client)
    run = _pull(reg, tmp_path / "root", "--retries", "0", env=_env(home))
    assert_clean_failure(run, tmp_path / "root", r"no trusted CA signed the certificate")


def test_a_client_certificate_without_its_key_is_an_error(mtls, tmp_path):
    reg, ca, client = mtls
    directory = _cert_dir(tmp_path / "certs", ca, client, key=False)
    run = _pull(reg, tmp_path / "root", "--cert-dir", directory, env=_env(tmp_path))
    assert_clean_failure(run, tmp_path / "root", r"client certificate client.cert has no key")
