"""Credentials from where podman and docker logins leave them: auth files and helpers."""

from __future__ import annotations

import base64
import json
import os

import pytest
from helpers import assert_clean_failure, assert_ok, run_dkr

from dkr.testing import images
from dkr.testing.images import File, Image, Layer
from dkr.testing.registry import Registry


@pytest.fixture(scope="module")
def private_registry():
    with Registry(auth=("htpasswd", {"alice": "wonderland"})) as reg:
        images.push_image(reg, "private/img", "latest", Image([Layer([File("secret", b"s")])]))
        yield reg


@pytest.fixture
def home(tmp_path):
    """An environment whose auth files are all under tmp_path, none of them written yet."""
    env = {**os.environ, "DOCKER_CONFIG": str(tmp_path / "docker"),
           "REGISTRY_AUTH_FILE": str(tmp_path / "run" / "auth.json"),
           "XDG_CONFIG_HOME": str(tmp_path / "config"),
           "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    for directory in ("docker", "run", "config/containers", "bin"):
        (tmp_path / directory).mkdir(parents=True)
    return tmp_path, env


def _auth(user: str, password: str) -> dict:
    return {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}


def _helper(bin_dir, name: str, script: str) -> None:
    """A credential helper program, as docker-credential-pass and the others are."""
    program = bin_dir / f"docker-credential-{name}"
    program.write_text("#!/bin/sh\n" + script)
    program.chmod(0o755)


def _pull(reg, root, env):
    return run_dkr("pull", "--insecure", "--image-root", root, "--backend", "dir",
                   f"{reg.host}/private/img", env=env)


def test_a_helper_named_for_the_host_gives_the_login(private_registry, image_root, home):
    tmp, env = home
    _helper(tmp / "bin", "dkrtest", f'echo "$1 $(cat)" >> {tmp}/asked\n'
            'echo \'{"ServerURL": "x", "Username": "alice", "Secret": "wonderland"}\'\n')
    (tmp / "docker" / "config.json").write_text(json.dumps(
        {"auths": {private_registry.host: {}}, "credsStore": "absent",
         "credHelpers": {private_registry.host: "dkrtest"}}))
    assert_ok(_pull(private_registry, image_root, env))
    assert (tmp / "asked").read_text() == f"get {private_registry.host}\n"
    assert (image_root / "img" / "secret").read_bytes() == b"s"


def test_a_helper_that_knows_no_login_leaves_the_pull_anonymous(private_registry, image_root,
                                                                 home):
    tmp, env = home
    _helper(tmp / "bin", "empty", "echo 'credentials not found in native keychain'; exit 1\n")
    (tmp / "docker" / "config.json").write_text(json.dumps({"credsStore": "empty"}))
    assert_clean_failure(_pull(private_registry, image_root, env), image_root,
                         r"requires a login.*--creds", "img")


@pytest.mark.parametrize("script,pattern", [
    (None, r"credential helper docker-credential-store \(named in .*/docker/config\.json\) "
           r"is not installed"),
    ("echo 'keyring is locked' >&2; exit 3\n",
     r"credential helper docker-credential-store failed for 127\.0\.0\.1:\d+: keyring is locked"),
    ("echo '{\"Username\": \"<token>\", \"Secret\": \"refresh\"}'\n",
     r"gives an identity token for 127\.0\.0\.1:\d+, which dkr cannot use: pass --creds"),
])
def test_a_helper_that_cannot_answer_is_one_clear_error(private_registry, image_root, home,
                                                        script, pattern):
    tmp, env = home
    if script is not None:
        _helper(tmp / "bin", "store", script)
    (tmp / "docker" / "config.json").write_text(json.dumps({"credsStore": "store"}))
    assert_clean_failure(_pull(private_registry, image_root, env), image_root, pattern, "img")


@pytest.mark.parametrize("auth_file", ["run/auth.json", "config/containers/auth.json"])
def test_a_podman_login_comes_before_a_docker_login(private_registry, image_root, home,
                                                   auth_file):
    """podman's auth.json is read first; its entry may name the repository's namespace."""
    tmp, env = home
    (tmp / "docker" / "config.json").write_text(json.dumps(
        {"auths": {private_registry.host: _auth("alice", "stale")}}))
    (tmp / auth_file).write_text(json.dumps({"auths": {
        private_registry.host: _auth("alice", "other"),
        f"{private_registry.host}/private": _auth("alice", "wonderland")}}))
    assert_ok(_pull(private_registry, image_root, env))


def test_an_auth_file_that_is_not_json_is_named(private_registry, image_root, home):
    tmp, env = home
    (tmp / "run" / "auth.json").write_text("{not json")
    assert_clean_failure(_pull(private_registry, image_root, env), image_root,
                         r"cannot read credentials from .*/run/auth\.json", "img")
