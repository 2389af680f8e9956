"""dkr login / logout: podman's auth.json, checked against a real htpasswd registry."""

from __future__ import annotations

import base64
import json
import os

import pytest
from helpers import assert_clean_failure, assert_ok, env_without_logins, run_dkr

from dkr.testing import images
from dkr.testing.images import File, Image, Layer
from dkr.testing.registry import Registry


@pytest.fixture(scope="module")
def locked():
    with Registry(auth=("htpasswd", {"alice": "wonderland"})) as reg:
        images.push_image(reg, "private/img", "v1",
                          Image([Layer([File("etc/secret", b"s3cret\n")])]))
        yield reg



def _login(reg, env, password="wonderland", *extra):
    return run_dkr("login", "--username", "alice", "--password-stdin", "--tls-verify=false",
                   *extra, reg.host, input=password + "\n", env=env)


def _pull(reg, root, env):
    return run_dkr("pull", "--insecure", "--image-root", root, "--backend", "dir",
                   f"{reg.host}/private/img:v1", env=env)


def test_login_then_pull_without_creds_then_logout(locked, tmp_path):
    env = env_without_logins(tmp_path)
    run = assert_ok(_login(locked, env))
    auth_json = tmp_path / "run/containers/auth.json"      # where podman login writes
    assert str(auth_json) in run.err
    entry = json.loads(auth_json.read_text())["auths"][locked.host]
    assert base64.b64decode(entry["auth"]) == b"alice:wonderland"
    assert auth_json.stat().st_mode & 0o077 == 0
    assert_ok(_pull(locked, tmp_path / "root", env))
    assert (tmp_path / "root/img/etc/secret").read_bytes() == b"s3cret\n"

    assert_ok(run_dkr("logout", locked.host, env=env))
    assert json.loads(auth_json.read_text())["auths"] == {}
    run = _pull(locked, tmp_path / "again", env)
    assert_clean_failure(run, tmp_path / "again", "requires a login")
    run = run_dkr("logout", locked.host, env=env)
    assert run.rc != 0 and run.err.startswith("dkr: error: not logged in to")


def test_a_wrong_password_is_not_stored(locked, tmp_path):
    env = env_without_logins(tmp_path)
    authfile = tmp_path / "auth.json"
    authfile.write_text(json.dumps({"auths": {"other.example": {"auth": "eDp5"}},
                                    "credHelpers": {}}))
    run = _login(locked, env, "queen-of-hearts", "--authfile", authfile)
    assert run.rc != 0 and "Traceback" not in run.err
    assert run.err.strip().splitlines()[-1] == \
        "dkr: error: login to " + locked.host + " failed: the registry refused the " \
        "credentials for 'alice'"
    assert json.loads(authfile.read_text())["auths"] == {"other.example": {"auth": "eDp5"}}
    # The right one is added beside what the file held.
    assert_ok(_login(locked, env, "wonderland", "--authfile", authfile))
    config = json.loads(authfile.read_text())
    assert set(config["auths"]) == {"other.example", locked.host} and "credHelpers" in config
    assert_ok(run_dkr("logout", "--all", "--authfile", authfile, env=env))
    assert json.loads(authfile.read_text()) == {"auths": {}, "credHelpers": {}}


def test_login_without_a_password_and_no_terminal_is_an_error(locked, tmp_path):
    run = run_dkr("login", "-u", "alice", locked.host, env=env_without_logins(tmp_path), input="")
    assert run.rc != 0
    assert run.err.strip() == "dkr: error: no password: give it on a terminal, or with " \
                              "--password-stdin"


def test_login_through_a_token_server(tmp_path):
    from dkr.testing.tokenserver import TokenServer

    with TokenServer(users={"bob": "builder"}, anonymous_pull=False) as tokens, \
            Registry(auth=("token", tokens)) as reg:
        images.push_image(reg, "team/app", "v1", Image([Layer([File("etc/a", b"a")])]))
        env = env_without_logins(tmp_path)
        run = run_dkr("login", "-u", "bob", "--password-stdin", "--tls-verify", "false",
                      reg.host, input="wrong\n", env=env)
        assert run.rc != 0 and "Traceback" not in run.err
        assert run.err.strip().splitlines()[-1].startswith(
            f"dkr: error: login to {reg.host} failed: token server")
        assert not (tmp_path / "run/containers/auth.json").exists()
        assert_ok(run_dkr("login", "-u", "bob", "--password-stdin", "--tls-verify", "false",
                          reg.host, input="builder\n", env=env))
        assert tokens.requests and tokens.requests[-1].user == "bob"
        assert_ok(run_dkr("pull", "--insecure", "--image-root", tmp_path / "root", "--backend",
                          "dir", f"{reg.host}/team/app:v1", env=env))


def test_login_to_a_host_registries_conf_marks_insecure(locked, tmp_path):
    conf = tmp_path / "registries.conf"
    conf.write_text(f'[[registry]]\nlocation = "upstream.example"\n'
                    f'[[registry.mirror]]\nlocation = "{locked.host}"\ninsecure = true\n')
    env = {**env_without_logins(tmp_path), "CONTAINERS_REGISTRIES_CONF": str(conf)}
    assert_ok(run_dkr("login", "-u", "alice", "--password-stdin", locked.host,
                      input="wonderland\n", env=env))
    env["CONTAINERS_REGISTRIES_CONF"] = os.devnull
    run = run_dkr("login", "-u", "alice", "--password-stdin", locked.host,
                  input="wonderland\n", env=env)
    assert run.rc != 0 and run.err.startswith("dkr: error: cannot reach registry"), run.err
