"""The command line as users of podman, skopeo and docker write it: options before
or after the command, podman's option names, password prompts, 'dkr version',
help that shows examples and the environment, a readable 'dkr list'."""

from __future__ import annotations

import base64
import json
import os
import platform
import pty
import re
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import (DKR, ELSEWHERE, assert_clean_failure, assert_ok, env_without_logins,
                     run_dkr)

from dkr import __version__
from dkr.testing import images
from dkr.testing.images import File, Image, Layer
from dkr.testing.registry import Registry

SOURCES = Path(__file__).resolve().parent.parent / "dkr"


def _image(text: str) -> Image:
    return Image([Layer([File("etc/which", text.encode()),
                         File("usr/big", text.encode() * 50000)])])


@pytest.fixture(scope="module")
def pushed(registry):
    images.push_image(registry, "habits/app", "1", _image("app"))
    images.push_image(registry, "habits/tool", "1", _image("tool"))
    return registry


@pytest.fixture(scope="module")
def locked():
    with Registry(auth=("htpasswd", {"alice": "wonderland"})) as reg:
        images.push_image(reg, "private/img", "v1", _image("secret"))
        yield reg



def _listed(root) -> list[dict]:
    return json.loads(assert_ok(run_dkr("list", "--json", "--image-root", root)).out)


# --- options before or after the command ---------------------------------------------

def test_common_options_go_before_the_command_as_well_as_after(pushed, tmp_path):
    root = tmp_path / "m"
    before = assert_ok(run_dkr("--image-root", root, "-q", "pull", "--insecure", "--backend",
                               "dir", f"{pushed.host}/habits/app:1"))
    assert before.err == ""                  # -q before the command: only errors
    assert (root / "app/etc/which").read_text() == "app"
    after = assert_ok(run_dkr("pull", "--insecure", "--backend", "dir", "--image-root", root,
                              "-v", f"{pushed.host}/habits/tool:1"))
    assert "Using backend dir" in after.err     # -v after it: more than the default says
    for args in (["--image-root", root, "list", "--json"], ["list", "--json", "--image-root", root],
                 ["-v", "--image-root", root, "list", "--json", "-q"]):
        listed = json.loads(assert_ok(run_dkr(*args)).out)
        assert [m["local"] for m in listed] == ["app", "tool"], args


def test_an_option_after_the_command_wins_over_the_same_before_it(pushed, tmp_path):
    assert_ok(run_dkr("pull", "--insecure", "--backend", "dir", "--image-root", tmp_path / "b",
                      f"{pushed.host}/habits/app:1"))
    run = assert_ok(run_dkr("--image-root", tmp_path / "a", "list", "--json",
                            "--image-root", tmp_path / "b"))
    assert [m["local"] for m in json.loads(run.out)] == ["app"]


def test_version_as_an_option_and_as_a_command():
    assert assert_ok(run_dkr("--version")).out.strip() == f"dkr {__version__}"
    lines = assert_ok(run_dkr("version")).out.splitlines()
    assert lines[0] == f"dkr {__version__}"
    assert lines[1].startswith(f"Python {platform.python_version()} ")
    assert re.search(r"\bPycURL/[0-9.]+ libcurl/[0-9.]+", lines[2]), lines


# --- podman's spellings --------------------------------------------------------------

def test_tls_verify_false_is_podmans_insecure(pushed, tmp_path):
    ref = f"{pushed.host}/habits/app:1"
    refused = run_dkr("pull", "--image-root", tmp_path / "m", "--backend", "dir", ref)
    assert refused.rc == 1 and "dkr: error:" in refused.err
    assert_ok(run_dkr("pull", "--tls-verify=false", "--image-root", tmp_path / "m",
                      "--backend", "dir", ref))
    assert (tmp_path / "m/app/etc/which").read_text() == "app"
    both = run_dkr("pull", "--tls-verify=true", "--insecure", "--image-root", tmp_path / "m", ref)
    assert both.rc == 2 and both.err.startswith("dkr: error: --insecure and --tls-verify=true")
    bad = run_dkr("pull", "--tls-verify=maybe", ref)
    assert bad.rc == 2 and "want true or false" in bad.err


def test_a_docker_transport_prefix_is_accepted(pushed, tmp_path):
    run = assert_ok(run_dkr("pull", "--insecure", "--backend", "dir", "--image-root",
                            tmp_path / "m", "--json", f"docker://{pushed.host}/habits/tool:1"))
    assert (tmp_path / "m/tool/etc/which").read_text() == "tool"
    [resolved] = [e for e in run.events if e["event"] == "resolved"]
    assert resolved["resolved"] == f"{pushed.host}/habits/tool:1"


def test_authfile_names_the_one_file_logins_come_from(locked, tmp_path):
    env = env_without_logins(tmp_path)
    authfile = tmp_path / "elsewhere.json"
    authfile.write_text(json.dumps({"auths": {locked.host: {
        "auth": base64.b64encode(b"alice:wonderland").decode()}}}))
    ref = f"{locked.host}/private/img:v1"
    without = run_dkr("pull", "--insecure", "--image-root", tmp_path / "m", ref, env=env)
    assert_clean_failure(without, tmp_path / "m", "login")
    assert_ok(run_dkr("pull", "--insecure", "--authfile", authfile, "--image-root",
                      tmp_path / "m", "--backend", "dir", ref, env=env))
    assert (tmp_path / "m/img/etc/which").read_text() == "secret"
    missing = run_dkr("pull", "--insecure", "--authfile", tmp_path / "nosuch.json", ref, env=env)
    assert missing.rc == 2 and "nosuch.json: no such file" in missing.err


def _on_a_terminal(args: list, answer: str, env: dict, timeout: float = 120) -> tuple[int, str]:
    """Run dkr on a pseudo-terminal of its own, answering its password prompt."""
    pid, fd = pty.fork()
    if pid == 0:                                  # (the child: only exec, or leave)
        try:
            os.chdir(ELSEWHERE)
            os.execve(DKR, [DKR, *map(str, args)], env)
        finally:
            os._exit(127)
    output, answered = b"", False
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not select.select([fd], [], [], 1)[0]:
                continue
            try:
                chunk = os.read(fd, 4096)
            except OSError:                       # EIO: the child is gone
                break
            if not chunk:
                break
            output += chunk
            if not answered and b"Password for alice: " in output:
                os.write(fd, answer.encode() + b"\n")
                answered = True
        else:
            os.kill(pid, signal.SIGKILL)
    finally:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), output.decode(errors="replace")


def test_creds_without_a_password_asks_for_it_on_the_terminal(locked, tmp_path):
    status, output = _on_a_terminal(
        ["pull", "--tls-verify=false", "--creds", "alice", "--image-root", tmp_path / "m",
         "--backend", "dir", f"{locked.host}/private/img:v1"], "wonderland",
        env_without_logins(tmp_path))
    assert status == 0, output
    assert "wonderland" not in output             # not echoed
    assert (tmp_path / "m/img/etc/which").read_text() == "secret"


def test_password_stdin_reads_the_password_for_creds(locked, tmp_path):
    env, ref = env_without_logins(tmp_path), f"{locked.host}/private/img:v1"
    assert_ok(run_dkr("pull", "--insecure", "--creds", "alice", "--password-stdin",
                      "--image-root", tmp_path / "m", "--backend", "dir", ref,
                      input="wonderland\n", env=env))
    assert (tmp_path / "m/img/etc/which").read_text() == "secret"
    wrong = run_dkr("pull", "--insecure", "--creds", "alice", "--password-stdin",
                    "--image-root", tmp_path / "n", ref, input="queen\n", env=env)
    assert_clean_failure(wrong, tmp_path / "n", "alice")
    # A password on the command line still works (scripts that have one).
    assert_ok(run_dkr("pull", "--insecure", "--creds", "alice:wonderland", "--image-root",
                      tmp_path / "o", "--backend", "dir", ref, env=env))
    no_terminal = run_dkr("pull", "--insecure", "--creds", "alice", ref, input="", env=env)
    assert no_terminal.rc == 2
    assert no_terminal.err == "dkr: error: no password: give it on a terminal, or with " \
                              "--password-stdin\n"
    assert run_dkr("pull", "--password-stdin", "--creds", "alice:x", ref, env=env).rc == 2


# --- help ----------------------------------------------------------------------------

def test_help_shows_examples_and_only_environment_variables_dkr_reads():
    text = assert_ok(run_dkr("--help")).out
    examples = text.split("\nexamples:\n")[1].split("\n\n")[0]
    assert "dkr pull debian:12" in examples
    listed = re.findall(r"^  ([A-Z][A-Z0-9_]+)  ", text.split("\nenvironment:\n")[1], re.M)
    assert {"CONTAINERS_REGISTRIES_CONF", "REGISTRY_AUTH_FILE", "DOCKER_CONFIG",
            "XDG_RUNTIME_DIR"} <= set(listed)
    sources = "\n".join(p.read_text() for p in SOURCES.rglob("*.py")
                        if "testing" not in p.parts)
    for name in listed:
        named = re.findall(rf'"{name}"|ENV = "{name}"', sources)
        assert named, f"help lists {name}, which dkr does not read"
    pull_help = assert_ok(run_dkr("pull", "--help")).out
    assert "\nexamples:\n" in pull_help and "--password-stdin" in pull_help
    assert "\nenvironment:\n" in pull_help


# --- list --------------------------------------------------------------------------------

def test_list_is_by_name_with_disk_use_and_relative_times(pushed, tmp_path):
    root = tmp_path / "m"
    for local in ("zeta", "alpha", "mid"):
        assert_ok(run_dkr("pull", "--insecure", "--backend", "dir", "--image-root", root,
                          f"{pushed.host}/habits/app:1", local))
    listed = _listed(root)
    assert [m["local"] for m in listed] == ["alpha", "mid", "zeta"]
    du = subprocess.run(["du", "-s", "-B1", root / "alpha"], capture_output=True, text=True,
                        check=True)
    assert listed[0]["disk_use"] == int(du.stdout.split()[0])
    assert listed[0]["disk_use"] > 50000 * 3            # the file's blocks, not its name
    lines = assert_ok(run_dkr("list", "--image-root", root)).out.splitlines()
    assert [line.split()[0] for line in lines[1:]] == ["alpha", "mid", "zeta"]
    size_at, created_at = lines[0].index("SIZE"), lines[0].index("CREATED")
    for line in lines[1:]:
        assert re.fullmatch(r"\d+(\.\d)? (B|kB|MB|GB) *", line[size_at:created_at]), line
        assert re.match(r"(just now|\d+ seconds? ago|1 minute ago) ", line[created_at:]), line


# --- the index digest -------------------------------------------------------------------

def test_a_pull_through_an_index_records_and_shows_its_digest(registry, tmp_path):
    def arch_image(arch):
        return Image([Layer([File("arch", arch.encode())])], arch=arch)
    index = images.push_index(registry, "habits/multi", "latest",
                              {"linux/amd64": arch_image("amd64"),
                               "linux/arm64": arch_image("arm64")})
    root = tmp_path / "m"
    run = assert_ok(run_dkr("pull", "--insecure", "--backend", "dir", "--json", "--image-root",
                            root, "--platform", "linux/arm64", f"{registry.host}/habits/multi"))
    [resolved] = [e for e in run.events if e["event"] == "resolved"]
    assert resolved["index_digest"] == index and resolved["digest"] != index
    [machine_event] = [e for e in run.events if e["event"] == "machine"]
    assert machine_event["index_digest"] == index
    assert re.search(rf"\(linux/arm64, 1 layers, [0-9.]+ MB, from index {index}\)\.", run.err), \
        run.err
    machine = json.loads(assert_ok(run_dkr("inspect", "--image-root", root, "multi")).out)
    assert machine["machine"]["index_digest"] == index
    assert machine["machine"]["manifest_digest"] == resolved["digest"]
    assert _listed(root)[0]["index_digest"] == index

    images.push_image(registry, "habits/single", "1", arch_image("amd64"))
    run = assert_ok(run_dkr("pull", "--insecure", "--backend", "dir", "--json", "--image-root",
                            root, f"{registry.host}/habits/single:1"))
    assert [e["index_digest"] for e in run.events if e["event"] == "resolved"] == [None]
    single = json.loads(assert_ok(run_dkr("inspect", "--image-root", root, "single")).out)
    assert "index_digest" not in single["machine"]


# --- usage errors ---------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["pull"], "a REFERENCE (or --batch FILE) is required"),
    (["pull", "--jobs", "0", "x/y"], "argument --jobs: must be 1 to 1024"),
    (["pull", "--batch", "f", "x/y"], "--batch takes the images from FILE"),
    (["pull", "--v1", "x/y"], "--v1 needs --index-url URL"),
    (["pull", "--password-stdin", "x/y"], "--password-stdin needs --creds USER"),
    (["mount", "--all", "box"], "give machine names or --all, not both"),
    (["umount"], "which machine?"),
    (["logout"], "give a REGISTRY or --all"),
    (["nosuch"], "argument COMMAND: invalid choice"),
])
def test_usage_errors_exit_2_with_one_line(tmp_path, args, message):
    run = run_dkr(*args[:1], "--image-root", tmp_path, *args[1:]) if args[0] in (
        "pull", "mount", "umount") else run_dkr(*args, input="")
    assert run.rc == 2, run.err
    assert len(run.err.splitlines()) == 1 and run.err.startswith("dkr: error: "), run.err
    assert message in run.err
