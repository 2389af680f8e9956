"""Reference, digest and machine-name parsing: what becomes a URL or a path."""

import pytest

from dkr.errors import DkrError
from dkr.registry.reference import (default_machine_name, host_is_valid, machine_name_is_valid,
                           parse_reference, validate_digest, validate_existing_machine_name)


@pytest.mark.parametrize("text, host, name, tag, digest", [
    ("debian", "docker.io", "library/debian", "latest", None),
    ("debian:12", "docker.io", "library/debian", "12", None),
    ("index.docker.io/user/app", "docker.io", "user/app", "latest", None),
    ("localhost/a", "localhost", "a", "latest", None),
    ("127.0.0.1:5000/some/image:v1.2_3", "127.0.0.1:5000", "some/image", "v1.2_3", None),
    ("quay.io/org/repo@sha256:" + "a" * 64, "quay.io", "org/repo", None, "sha256:" + "a" * 64),
    ("reg.example:443/x:tag@sha256:" + "b" * 64, "reg.example:443", "x", "tag", "sha256:" + "b" * 64),
    ("[::1]:5000/a", "[::1]:5000", "a", "latest", None),
])
def test_parse_reference(text, host, name, tag, digest):
    ref = parse_reference(text)
    assert (ref.host, ref.name, ref.tag, ref.digest) == (host, name, tag, digest)


def test_docker_hub_is_served_elsewhere():
    assert parse_reference("debian").endpoint == "registry-1.docker.io"
    assert parse_reference("localhost:5000/x").endpoint == "localhost:5000"


@pytest.mark.parametrize("text", [
    "", " debian", "Debian", "a//b", "a/../b", "host:99999/a", "a:" + "t" * 129,
    "a@sha256:xyz", "a@md5:" + "0" * 32, "a/b:tag/c", "a\nb", "-a",
])
def test_bad_references(text):
    with pytest.raises(DkrError, match="invalid reference"):
        parse_reference(text)


def test_a_server_digest_of_another_algorithm_is_refused_by_name():
    with pytest.raises(DkrError, match=r"^layer 1: invalid digest 'sha512:a+' "
                                       r"\(sha512 digests are not supported, only sha256\)$"):
        validate_digest("sha512:" + "a" * 128, "layer 1")
    assert validate_digest("sha256:" + "a" * 64, "layer 1") == "sha256:" + "a" * 64


@pytest.mark.parametrize("name, ok", [
    ("debian", True), ("my-machine.1", True), ("a--b", True), ("x" * 64, True),
    ("dkr-ok", True), ("a_b", False), ("_a", False), ("a-", False), ("a-.b", False),
    ("a.-b", False), ("x" * 65, False), ("", False), ("..", False), (".hidden", False),
    (".dkr-abc", False), ("a/b", False), ("a b", False), ("-lead", False), ("a..b", False),
])
def test_machine_names_are_hostnames_as_systemd_wants(name, ok):
    assert machine_name_is_valid(name) is ok


@pytest.mark.parametrize("name, ok", [
    ("a_b", True), ("a-", True), ("a-.b", True), ("debian", True),
    ("-lead", False), ("../x", False), (".dkr-abc", False), ("a/b", False), ("x" * 65, False),
])
def test_machines_older_names_allowed_are_still_known_by_them(name, ok):
    if ok:
        assert validate_existing_machine_name(name) == name
    else:
        with pytest.raises(DkrError, match="invalid machine name"):
            validate_existing_machine_name(name)


def test_default_machine_name():
    assert default_machine_name("library/debian") == "debian"
    assert default_machine_name("team/my__app_x") == "my--app-x"


@pytest.mark.parametrize("host, ok", [
    ("registry:5000", True), ("a.b.c", True), ("bad host!", False), ("h:0", False),
    ("h:65536", False), ("[::1]:443", True), ("", False),
])
def test_v1_endpoint_hosts(host, ok):
    assert host_is_valid(host) is ok
