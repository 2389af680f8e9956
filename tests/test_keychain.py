"""Credentials from where podman and docker logins leave them: auth files and helpers."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import assert_clean_failure, assert_ok, run_dkr

from dkr.testing import images
from dkr.testing.images import File, Image, Layer
from dkr import api
from dkr.errors import DkrError
from dkr.registry.keychain import HelperQuestion, auth_files, find_credentials
from dkr.testing.registry import Registry
from dkr.testing.tokenserver import TokenServer


@pytest.fixture(scope="module")
def private_registry():
    with Registry(auth=("htpasswd", {"alice": "wonderland"})) as reg:
        images.push_image(reg, "private/img", "latest", Image([Layer([File("secret", b"s")])]))
        yield reg


@pytest.fixture
def home(tmp_path):
    """An environment whose auth files are all under tmp_path, none of them written yet."""
    env = {**os.environ, "DOCKER_CONFIG": str(tmp_path / "docker"),
           "XDG_RUNTIME_DIR": str(tmp_path / "run"),
           "XDG_CONFIG_HOME": str(tmp_path / "config"),
           "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    env.pop("REGISTRY_AUTH_FILE", None)
    for directory in ("docker", "run/containers", "config/containers", "bin"):
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


@pytest.mark.parametrize("script,pattern", [
    # One that knows no login leaves the pull anonymous.
    ("echo 'credentials not found in native keychain'; exit 1\n", r"requires a login.*--creds"),
    (None, r"credential helper docker-credential-store \(named in .*/docker/config\.json\) "
           r"is not installed"),
    ("printf '\\377\\376 locked'; exit 1\n",          # bytes that are no text
     r"credential helper docker-credential-store failed for .*locked"),
    ("echo 'keyring is locked' >&2; exit 3\n",
     r"credential helper docker-credential-store failed for 127\.0\.0\.1:\d+: keyring is locked"),
    ("echo '{\"Username\": \"<token>\", \"Secret\": \"refresh\"}'\n",
     r"gives an identity token for 127\.0\.0\.1:\d+, which dkr cannot use: pass --creds"),
])
def test_a_helper_that_gives_no_login_is_one_clear_error(private_registry, image_root, home,
                                                         script, pattern):
    tmp, env = home
    if script is not None:
        _helper(tmp / "bin", "store", script)
    (tmp / "docker" / "config.json").write_text(json.dumps({"credsStore": "store"}))
    assert_clean_failure(_pull(private_registry, image_root, env), image_root, pattern, "img")


@pytest.mark.parametrize("auth_file", ["run/containers/auth.json", "config/containers/auth.json"])
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
    (tmp / "run" / "containers" / "auth.json").write_text("{not json")
    assert_clean_failure(_pull(private_registry, image_root, env), image_root,
                         r"cannot read credentials from .*/run/containers/auth\.json", "img")


def test_registry_auth_file_is_the_only_file_read(private_registry, image_root, home):
    """Like podman's --authfile: a robot's auth file without this registry does not
    send the user's own docker login."""
    tmp, env = home
    (tmp / "robot.json").write_text(json.dumps({"auths": {}}))
    (tmp / "docker" / "config.json").write_text(json.dumps(
        {"auths": {private_registry.host: _auth("alice", "wonderland")}}))
    robot = {**env, "REGISTRY_AUTH_FILE": str(tmp / "robot.json")}
    assert_clean_failure(_pull(private_registry, image_root, robot), image_root,
                         r"requires a login.*--creds", "img")
    assert_ok(_pull(private_registry, image_root, env))


def test_without_xdg_runtime_dir_podman_s_file_is_under_run_containers(monkeypatch, tmp_path):
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    assert auth_files()[0] == Path(f"/run/containers/{os.getuid()}/auth.json")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert auth_files()[0] == tmp_path / "containers" / "auth.json"


def test_a_helper_that_knows_no_login_passes_to_the_next_file(private_registry, image_root,
                                                              home):
    tmp, env = home
    _helper(tmp / "bin", "empty", "echo 'credentials not found in native keychain'; exit 1\n")
    (tmp / "config" / "containers" / "auth.json").write_text(json.dumps(
        {"credHelpers": {private_registry.host: "empty"}}))
    (tmp / "docker" / "config.json").write_text(json.dumps(
        {"auths": {private_registry.host: _auth("alice", "wonderland")}}))
    assert_ok(_pull(private_registry, image_root, env))


def test_each_image_of_a_batch_uses_its_own_login(image_root, home):
    """Two teams' logins on one registry, each for its own namespace."""
    tmp, env = home
    owners = {"alice": "team-a/", "bob": "team-b/", "pusher": ""}

    def grant(user, rtype, name, actions):
        return actions if user and name.startswith(owners[user]) else []

    users = {"pusher": "push-secret", "alice": "a-pass", "bob": "b-pass"}  # the first pushes
    with TokenServer(users=users, grant=grant) as tokens, \
            Registry(auth=("token", tokens)) as reg:
        for team in ("team-a", "team-b"):
            images.push_image(reg, f"{team}/app", "latest",
                              Image([Layer([File("team", team.encode())])]))
        (tmp / "run" / "containers" / "auth.json").write_text(json.dumps({"auths": {
            f"{reg.host}/team-a": _auth("alice", "a-pass"),
            f"{reg.host}/team-b": _auth("bob", "b-pass")}}))
        listing = tmp / "images.txt"
        listing.write_text(f"{reg.host}/team-a/app a\n{reg.host}/team-b/app b\n")
        assert_ok(run_dkr("pull", "--insecure", "--image-root", image_root, "--backend", "dir",
                          "--batch", listing, env=env))
    assert (image_root / "a" / "team").read_bytes() == b"team-a"
    assert (image_root / "b" / "team").read_bytes() == b"team-b"


def test_a_failing_helper_is_asked_once_for_a_whole_batch(private_registry, registry,
                                                          image_root, home):
    """Its failure is the answer for every image that needs it; an image on another
    registry, which needs no login, is pulled all the same."""
    tmp, env = home
    _helper(tmp / "bin", "locked", f"echo asked >> {tmp}/asked\n"
            "sleep 1; echo 'keyring is locked' >&2; exit 1\n")
    (tmp / "docker" / "config.json").write_text(json.dumps(
        {"credHelpers": {private_registry.host: "locked"}}))
    images.push_image(registry, "public/img", "latest", Image([Layer([File("open", b"o")])]))
    listing = tmp / "images.txt"
    listing.write_text("".join(f"{private_registry.host}/private/img p{i}\n" for i in range(4))
                       + f"{registry.host}/public/img open\n")
    run = run_dkr("pull", "--insecure", "--image-root", image_root, "--backend", "dir",
                  "--json", "--batch", listing, env=env)
    assert run.rc == 1, run.err
    assert (tmp / "asked").read_text() == "asked\n"
    failures = [e for e in run.events if e["event"] == "error"]
    assert len(failures) == 4 and all("keyring is locked" in e["message"] for e in failures)
    assert (image_root / "open" / "open").read_bytes() == b"o"


def test_each_pull_of_a_process_asks_the_helper_anew(private_registry, image_root, home,
                                                     monkeypatch):
    """A login made between two API pulls (or a helper's short-lived token renewed)
    is what the second pull uses."""
    tmp, env = home
    for name in ("DOCKER_CONFIG", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME", "PATH"):
        monkeypatch.setenv(name, env[name])
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    _helper(tmp / "bin", "file", f'cat {tmp}/login 2>/dev/null || '
            '{ echo "credentials not found in native keychain"; exit 1; }\n')
    (tmp / "docker" / "config.json").write_text(json.dumps({"credsStore": "file"}))
    options = api.PullOptions(image_root=image_root, backend="dir", insecure=True, retries=0)
    with pytest.raises(DkrError, match="requires a login"):
        api.pull(f"{private_registry.host}/private/img", "first", options=options)
    (tmp / "login").write_text('{"Username": "alice", "Secret": "wonderland"}')
    api.pull(f"{private_registry.host}/private/img", "second", options=options)
    assert (image_root / "second" / "secret").read_bytes() == b"s"


@pytest.mark.parametrize("config", [{"credHelpers": {"docker.io": "hub"}}, {"credsStore": "hub"}])
def test_a_podman_login_to_docker_hub_in_a_helper_is_found(home, monkeypatch, config):
    """podman keeps Docker Hub's login under docker.io, docker under its v1 URL."""
    tmp, env = home
    for name in ("DOCKER_CONFIG", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME", "PATH"):
        monkeypatch.setenv(name, env[name])
    _helper(tmp / "bin", "hub", 'read server; [ "$server" = docker.io ] || '
            '{ echo "credentials not found in native keychain"; exit 1; }\n'
            'echo \'{"Username": "hubuser", "Secret": "hubpass"}\'\n')
    (tmp / "config" / "containers" / "auth.json").write_text(json.dumps(config))
    assert find_credentials("docker.io", "library/debian") == ("hubuser", "hubpass")


def test_a_helper_name_no_program_can_have_is_one_clear_error(private_registry, image_root,
                                                              home):
    tmp, env = home
    (tmp / "docker" / "config.json").write_text(json.dumps({"credsStore": "pass\u0000word"}))
    assert_clean_failure(_pull(private_registry, image_root, env), image_root,
                         r"credential helper 'docker-credential-pass\\x00word' \(named in "
                         r".*/docker/config\.json\): embedded null byte", "img")


def _pull_asking_a_slow_helper(private_registry, image_root, home):
    """A pull whose credential helper takes 20 s (a keyring prompt), once the helper runs."""
    tmp, env = home
    _helper(tmp / "bin", "slow", f"echo $$ > {tmp}/helper.pid\n"
            f"sleep 20; echo done > {tmp}/finished\n")
    (tmp / "docker" / "config.json").write_text(json.dumps({"credsStore": "slow"}))
    proc = subprocess.Popen([sys.executable, "-m", "dkr", "pull", "--insecure", "--image-root",
                             str(image_root), "--backend", "dir",
                             f"{private_registry.host}/private/img"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    _wait_for(tmp / "helper.pid")
    return tmp, proc


def test_a_pull_stopped_while_a_helper_waits_takes_the_helper_with_it(private_registry,
                                                                      image_root, home):
    """A helper waiting on a keyring prompt must not keep a stopped pull alive."""
    tmp, proc = _pull_asking_a_slow_helper(private_registry, image_root, home)
    proc.send_signal(signal.SIGTERM)
    errors, status = proc.communicate(timeout=60)[1], proc.returncode
    assert status == 128 + signal.SIGTERM, errors
    assert not (tmp / "finished").exists()
    with pytest.raises(ProcessLookupError):
        os.kill(int((tmp / "helper.pid").read_text()), 0)


def test_a_helper_dies_with_a_killed_dkr(private_registry, image_root, home):
    """SIGKILL of dkr alone (the OOM killer) leaves no helper waiting on a keyring."""
    tmp, proc = _pull_asking_a_slow_helper(private_registry, image_root, home)
    proc.kill()
    proc.communicate(timeout=60)
    helper = int((tmp / "helper.pid").read_text())
    for _ in range(100):
        try:
            os.kill(helper, 0)
        except ProcessLookupError:
            break
        time.sleep(0.02)
    with pytest.raises(ProcessLookupError):
        os.kill(helper, 0)


def _wait_for(path, attempts=300):
    for _ in range(attempts):
        if path.exists() and path.read_text().strip():
            return
        time.sleep(0.05)


def test_ctrl_c_during_a_lookup_of_ones_own_takes_the_helper_with_it(home, monkeypatch):
    """An API user's own thread (no pull around it) is interrupted while a helper runs."""
    tmp, env = home
    for name in ("DOCKER_CONFIG", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME", "PATH"):
        monkeypatch.setenv(name, env[name])
    _helper(tmp / "bin", "slow", f"echo $$ > {tmp}/helper.pid\nsleep 5\n")
    (tmp / "docker" / "config.json").write_text(json.dumps({"credsStore": "slow"}))

    def interrupt():
        _wait_for(tmp / "helper.pid")
        os.kill(os.getpid(), signal.SIGINT)
    threading.Thread(target=interrupt, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        find_credentials("reg.example")
    with pytest.raises(ProcessLookupError):
        os.kill(int((tmp / "helper.pid").read_text()), 0)


def test_a_question_put_after_its_pull_stopped_starts_no_helper(tmp_path):
    stopped = threading.Event()
    stopped.set()
    question = HelperQuestion(f"{tmp_path}/never-started", ("reg.example",), tmp_path / "a.json")
    with pytest.raises(DkrError, match="not asked, the pull stopped"):
        question.ask(stopped)
