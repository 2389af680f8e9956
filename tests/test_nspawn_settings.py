"""IMAGE_ROOT/LOCAL.nspawn from the image's config: the mapping, the quoting, and a
real systemd-nspawn that runs what the image says, as it says."""

from __future__ import annotations

import json
import os

import pytest
from helpers import assert_ok, pull, run_dkr
from nspawn_tree import NSPAWN, nspawn, os_layer

from dkr.store.nspawn import HEADER, quote_word, settings, split_words
from dkr.testing import images
from dkr.testing.images import Image, Layer, File


def exec_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith(("#", "["))]


@pytest.mark.parametrize("word", [
    "plain", "", "two words", "it's", 'say "hi"', "both ' and \"", "back\\slash",
    "$HOME and %h", "tab\there", "'", "''", "#x", ";x", " lead", "trail ", "ünï"])
def test_a_word_reads_back_as_itself(word):
    assert split_words(quote_word(word)) == [word]
    assert split_words(" ".join(quote_word(w) for w in [word, "x y", word])) == [word, "x y", word]


def test_what_importctl_maps():
    text, warnings = settings({"config": {
        "Env": ["PATH=/usr/bin:/bin", "GREETING=hello world", "QUOTED=it's \"so\""],
        "Entrypoint": ["/bin/app", "--flag"], "Cmd": ["an arg", "$NOT_EXPANDED"],
        "WorkingDir": "/srv/app", "User": "app", "StopSignal": "SIGINT",
        "ExposedPorts": {"80/tcp": {}}, "Volumes": {"/data": {}},
        "Healthcheck": {"Test": ["CMD", "true"]}, "Labels": {"a": "b"}}})
    assert text.startswith(HEADER + "\n")
    lines = exec_lines(text)
    assert lines[0] == "Boot=no"
    env = [split_words(line.split("=", 1)[1]) for line in lines if line.startswith("Environment=")]
    assert env == [["PATH=/usr/bin:/bin"], ["GREETING=hello world"], ["QUOTED=it's \"so\""]]
    [params] = [line.split("=", 1)[1] for line in lines if line.startswith("Parameters=")]
    assert split_words(params) == ["/bin/app", "--flag", "an arg", "$NOT_EXPANDED"]
    assert "WorkingDirectory=/srv/app" in lines
    assert "User=app" in lines and "KillSignal=SIGINT" in lines
    assert len(warnings) == 3, warnings
    for field in ("ExposedPorts", "Healthcheck", "Volumes"):
        assert any(f"({field}) has no equivalent" in w for w in warnings), (field, warnings)


@pytest.mark.parametrize("config, absent", [
    ({"WorkingDir": "/", "User": "root"}, ("WorkingDirectory=", "User=")),
    ({"WorkingDir": "", "User": "0:0"}, ("WorkingDirectory=", "User=")),
    ({}, ("Parameters=", "Environment=", "KillSignal=")),
])
def test_defaults_are_left_out(config, absent):
    text, warnings = settings({"config": config})
    assert not [line for line in exec_lines(text) if line.startswith(absent)]
    assert warnings == []


def test_what_a_file_cannot_hold_is_left_out_with_a_warning():
    text, warnings = settings({"config": {
        "Env": ["GOOD=1", "BAD=two\nlines", "NOEQUALS"], "Cmd": ["echo", "a\nb"],
        "WorkingDir": "relative", "User": "app:staff", "StopSignal": "SIGNOPE"}})
    lines = exec_lines(text)
    assert [l for l in lines if l.startswith("Environment=")] == ["Environment=GOOD=1"]
    assert not [l for l in lines if l.startswith(("Parameters=", "WorkingDirectory=",
                                                  "KillSignal="))]
    assert "User=app" in lines
    assert len(warnings) == 6, warnings
    assert not any("two\nlines" in w for w in warnings)


@pytest.mark.parametrize("stop, name", [("15", "SIGTERM"), ("TERM", "SIGTERM"),
                                        ("sigusr1", "SIGUSR1"), (9, "SIGKILL")])
def test_stop_signals(stop, name):
    assert f"KillSignal={name}" in exec_lines(settings({"config": {"StopSignal": stop}})[0])


# --- with a real pull and a real systemd-nspawn ------------------------------------------

ENV = ["PATH=/usr/bin:/bin", "GREETING=hello  world", "QUOTES=it's \"quoted\"",
       "DOLLAR=$HOME%h\\n"]
ARGS = ["first arg", "it's", "\"two\"", "$x", "%n"]
SCRIPT = ('env -0 > /out/env; echo "$PWD" > /out/pwd; '
          'while read k v rest; do [ "$k" = Uid: ] && echo "$v" > /out/uid; '
          'done < /proc/self/status; for a in "$@"; do printf "%s\\0" "$a"; done > /out/args')


@pytest.fixture(scope="module")
def pushed(registry):
    image = Image([os_layer()], config={
        "Env": ENV, "Entrypoint": ["/bin/sh", "-c", SCRIPT, "sh"], "Cmd": ARGS,
        "WorkingDir": "/srv/work dir", "User": "app", "StopSignal": "SIGINT",
        "ExposedPorts": {"8080/tcp": {}}})
    images.push_image(registry, "nspawn/settings", "latest", image)
    return image


def test_written_with_the_machine_shown_replaced_and_removed(registry, pushed, image_root):
    run = assert_ok(pull(registry, "nspawn/settings", image_root, "--backend", "dir",
                         local="app"))
    assert "ExposedPorts" in run.err and "not applied" in run.err
    written = (image_root / "app.nspawn").read_text()
    assert written.startswith(HEADER)
    shown = json.loads(assert_ok(run_dkr("inspect", "--image-root", image_root, "app")).out)
    assert shown["nspawn"] == written

    images.push_image(registry, "nspawn/other", "latest", Image([Layer([File("x", b"x")])],
                                                                 config={"Cmd": ["/x"]}))
    assert_ok(pull(registry, "nspawn/other", image_root, "--backend", "dir", "--force",
                   local="app"))
    assert "Parameters=/x" in (image_root / "app.nspawn").read_text()
    assert_ok(pull(registry, "nspawn/settings", image_root, "--backend", "dir", "--force",
                   "--no-settings", local="app"))
    assert not (image_root / "app.nspawn").exists()

    assert_ok(pull(registry, "nspawn/other", image_root, "--backend", "dir", local="two"))
    assert (image_root / "two.nspawn").exists()
    assert_ok(run_dkr("remove", "--image-root", image_root, "two"))
    assert not (image_root / "two.nspawn").exists()
    assert [p.name for p in image_root.iterdir() if ".tmp-" in p.name] == []


def test_a_settings_file_dkr_did_not_write_is_kept(registry, pushed, image_root):
    image_root.mkdir(parents=True)
    (image_root / "mine.nspawn").write_text("[Exec]\nBoot=yes\n")
    run = assert_ok(pull(registry, "nspawn/settings", image_root, "--backend", "dir",
                         local="mine"))
    assert "was not written by dkr" in run.err
    assert (image_root / "mine.nspawn").read_text() == "[Exec]\nBoot=yes\n"
    assert_ok(run_dkr("remove", "--image-root", image_root, "mine"))
    assert (image_root / "mine.nspawn").read_text() == "[Exec]\nBoot=yes\n"


@pytest.mark.skipif(NSPAWN is None, reason="needs systemd-nspawn (install.sh installs it)")
@pytest.mark.parametrize("backend", ["dir", "overlay"])
def test_nspawn_runs_the_image_as_it_says(registry, pushed, image_root, backend):
    assert_ok(pull(registry, "nspawn/settings", image_root, "--backend", backend, local="app"))
    machine = image_root / "app"
    try:
        proc = nspawn(machine)
        out, err = proc.communicate(timeout=120)
        _check_what_it_saw(proc, out, err, machine)
    finally:
        assert_ok(run_dkr("remove", "--image-root", image_root, "app"))


def _check_what_it_saw(proc, out, err, machine):
    assert proc.returncode == 0, (out, err)
    env = (machine / "out" / "env").read_bytes().decode().split("\0")[:-1]
    for entry in ENV:
        assert entry in env, (entry, env)
    args = (machine / "out" / "args").read_bytes().decode().split("\0")[:-1]
    assert args == ARGS
    assert (machine / "out" / "pwd").read_text() == "/srv/work dir\n"
    assert (machine / "out" / "uid").read_text() == "1000\n"
    assert os.stat(machine / "out" / "env").st_uid == 1000


def test_gc_removes_settings_a_killed_pull_left(registry, pushed, image_root):
    assert_ok(pull(registry, "nspawn/settings", image_root, "--backend", "dir", local="app"))
    left = image_root / ".#app.nspawn.tmp-0123abcd"
    left.write_text("half")
    gc = assert_ok(run_dkr("gc", "--image-root", image_root))
    assert not left.exists(), gc.err
    assert (image_root / "app.nspawn").read_text().startswith(HEADER)


def test_gc_removes_settings_whose_machine_is_gone(registry, pushed, image_root):
    """A machine taken away without dkr (its tree and record gone): gc removes the
    settings dkr wrote for it, never a file of the user's, nor one a machine still has."""
    for local in ("gone", "kept"):
        assert_ok(pull(registry, "nspawn/settings", image_root, "--backend", "dir", local=local))
    os.rename(image_root / "gone", image_root / "elsewhere")
    (image_root / ".dkr" / "machines" / "gone.json").unlink()
    (image_root / "users.nspawn").write_text("[Exec]\nBoot=yes\n")
    gc = assert_ok(run_dkr("gc", "--image-root", image_root))
    assert not (image_root / "gone.nspawn").exists(), gc.err
    assert "settings file gone.nspawn" in gc.err
    assert (image_root / "kept.nspawn").read_text().startswith(HEADER)
    assert (image_root / "users.nspawn").read_text() == "[Exec]\nBoot=yes\n"
