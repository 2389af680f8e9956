"""dkr runs only its installed code, whatever directory it is started from.

A root ``dkr pull`` started in /tmp (or any directory another user can write)
must not import a ``dkr/`` or ``dkr_plugins/`` planted there, nor any module
its children load: each Python process dkr starts ignores the working
directory, PYTHONPATH and the user's site-packages.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from helpers import assert_ok, interpreter_with_site_hook, run_dkr

from dkr.testing import images

# Modules dkr or its extractors' server import by name; each planted copy leaves
# a mark if anything runs it.
PLANTED = ("dkr", "dkr_plugins", "isal", "zstandard", "pluggy", "pycurl", "btrfsutil",
           "json", "tarfile")


def plant(where: Path) -> Path:
    """A working directory holding look-alike packages and an entry point to one."""
    marks = where / "marks"
    marks.mkdir(parents=True)
    for name in PLANTED:
        code = f"open({str(marks / name)!r}, 'w').close()\n"
        if name in ("dkr", "dkr_plugins"):
            (where / name).mkdir()
            (where / name / "__init__.py").write_text(code)
            for sub in ("extract", "cli", "launch", "dir", "overlay", "btrfs"):
                (where / name / f"{sub}.py").write_text(code)
        else:
            (where / f"{name}.py").write_text(code)
    dist = where / "zz_planted-1.0.dist-info"
    dist.mkdir()
    (dist / "entry_points.txt").write_text("[dkr]\nplanted = dkr_plugins.dir\n")
    return marks


@pytest.fixture
def planted(tmp_path):
    where = tmp_path / "cwd"
    return where, plant(where)


def test_pull_list_and_demo_from_a_planted_directory(registry, planted, tmp_path):
    cwd, marks = planted
    images.push_image(registry, "isolation/sample", "latest", images.sample_image())
    for backend in ("dir", "overlay"):
        root = tmp_path / backend
        assert_ok(run_dkr("pull", "--insecure", "--image-root", root, "--backend", backend,
                          f"{registry.host}/isolation/sample", "box", cwd=cwd))
        assert (root / "box" / "etc").is_dir()
        listed = assert_ok(run_dkr("list", "--image-root", root, cwd=cwd))
        assert "box" in listed.out
        assert_ok(run_dkr("remove", "--image-root", root, "box", cwd=cwd))
    assert_ok(run_dkr("demo", "--image-root", tmp_path / "demo", "--backend", "dir", cwd=cwd))
    assert sorted(os.listdir(marks)) == []


SITE_MARK = """\
import os, sys
open(os.path.join(os.path.dirname(__file__), "ran-%d" % os.getpid()), "w").write(" ".join(sys.argv))
"""


def test_children_ignore_pythonpath(registry, tmp_path):
    """PYTHONPATH is the caller's to give dkr itself, never to the extractors run as root."""
    images.push_image(registry, "isolation/env", "latest", images.sample_image())
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITE_MARK)
    env = {**os.environ, "PYTHONPATH": str(hook)}
    assert_ok(run_dkr("pull", "--insecure", "--image-root", tmp_path / "m", "--backend", "dir",
                      f"{registry.host}/isolation/env", "box", env=env))
    ran = [(hook / name).read_text() for name in os.listdir(hook) if name.startswith("ran-")]
    assert len(ran) == 1 and "pull" in ran[0], ran     # dkr itself, and no child of it


SERVER_MARK = """\
import os, sys
if "--fork-server" in sys.argv:
    open(os.environ["MARK"], "w").write(repr(sys.flags.isolated) + " " + repr(sys.path))
"""


def test_the_server_is_isolated_and_runs_this_dkr(registry, tmp_path):
    """The extractors' server runs with -I, and imports the dkr that started it."""
    images.push_image(registry, "isolation/flags", "latest", images.sample_image())
    python = interpreter_with_site_hook(tmp_path / "py", SERVER_MARK)
    mark = tmp_path / "server"
    proc_env = {**os.environ, "MARK": str(mark)}
    run = subprocess.run([str(python), "-m", "dkr", "pull", "--insecure", "--image-root",
                          tmp_path / "m", "--backend", "dir", f"{registry.host}/isolation/flags",
                          "box"], cwd=tmp_path, env=proc_env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    isolated, _, path = mark.read_text().partition(" ")
    assert isolated == "1"
    assert "" not in eval(path) and str(tmp_path) not in eval(path)
