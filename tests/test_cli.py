"""The command line's own surface: help text and usage errors."""

from __future__ import annotations

import argparse
import os

import pytest
from helpers import assert_clean_failure, run_dkr


def test_help_wraps_to_the_width_columns_gives():
    widest = {}
    for columns in (50, 130):
        run = run_dkr("pull", "--help", env={**os.environ, "COLUMNS": str(columns)})
        assert run.rc == 0, run.err
        assert "--spool-limit" in run.out
        # (The usage block may overrun: argparse does not split one option's part.)
        options = run.out.split("\n\n", 1)[1].split("\nexamples:")[0]
        widest[columns] = max(len(line) for line in options.splitlines())
    assert widest[50] <= 50
    assert widest[130] > 60


def test_a_usage_error_is_one_line_and_status_2():
    run = run_dkr("pull", "--jobs")
    assert run.rc == 2
    assert run.err.splitlines() == [
        "dkr: error: argument --jobs: expected one argument (see 'dkr pull --help')"]


@pytest.mark.parametrize("option, value, message", [
    ("--jobs", "99999999999999999999", r"--jobs: must be 1 to 1024"),
    ("--jobs", "0", r"--jobs: must be 1 to 1024"),
    ("--stall-timeout", "99999999999999999999", r"--stall-timeout: must be 1 to 604800 seconds"),
    ("--retries", "-1", r"--retries: must be 0 to 1000"),
])
def test_numbers_out_of_range_are_one_line_usage_errors(tmp_path, option, value, message):
    run = run_dkr("pull", "--image-root", tmp_path / "root", option, value, "127.0.0.1:1/x/y")
    assert_clean_failure(run, tmp_path / "root", message)
    assert run.rc == 2


def test_an_index_url_that_does_not_parse_is_a_clear_error(tmp_path):
    run = run_dkr("pull", "--image-root", tmp_path / "root", "--v1", "--index-url",
                  "https://[::1", "library/x")
    assert_clean_failure(run, tmp_path / "root", r"invalid index URL")


def _registry_servers() -> set[int]:
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().startswith(b"docker-registry\0serve\0"):
                    found.add(int(pid))
        except OSError:
            pass                          # gone meanwhile
    return found


def test_the_demo_pulls_its_sample_and_leaves_no_registry_running(tmp_path):
    before = _registry_servers()
    run = run_dkr("demo", "--image-root", tmp_path, "--backend", "dir")
    assert run.rc == 0, run.err
    assert (tmp_path / "sample" / "etc").is_dir()
    assert _registry_servers() - before == set()


def test_the_demo_makes_its_sample_for_this_machine(tmp_path, monkeypatch, caplog):
    """On an arm64 host (which this one can only pretend to be) the sample is an
    arm64 image, and nothing warns that it may not run."""
    import json
    import types

    from dkr.cli.main import main

    real_uname = os.uname()
    monkeypatch.setattr(os, "uname", lambda: types.SimpleNamespace(
        **{field: getattr(real_uname, field) for field in
           ("sysname", "nodename", "release", "version")}, machine="aarch64"))
    assert main(["demo", "--image-root", str(tmp_path), "--backend", "dir"]) == 0
    assert "may not run here" not in caplog.text
    monkeypatch.undo()
    inspected = run_dkr("inspect", "--image-root", tmp_path, "sample")
    assert json.loads(inspected.out)["machine"]["platform"] == "linux/arm64"


def test_log_lines_show_control_characters_escaped(capsys):
    """Log lines carry server text too (a redirect's host, a record's field)."""
    import logging

    from dkr.cli.main import _setup_logging

    root = logging.getLogger("dkr")
    saved = root.handlers[:], root.level, root.propagate
    try:
        _setup_logging(argparse.Namespace(verbose=False, quiet=False))
        logging.getLogger("dkr.test").warning("from %s", "server\ndkr: error: forged\x1b[2J")
    finally:
        root.handlers[:], root.level, root.propagate = saved
    assert capsys.readouterr().err == "from server\\ndkr: error: forged\\x1b[2J\n"
