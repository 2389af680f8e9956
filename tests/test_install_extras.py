"""Installing where users install: ``pip install dkr`` needs no libbtrfsutil headers
(btrfs then works through the btrfs command; the module is the ``dkr[btrfs]``
extra), and the package brings its man page and bash completion."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import sys
import subprocess
from pathlib import Path

import pytest
from helpers import Run, assert_clean_failure, assert_ok, interpreter_with_site_hook, run_dkr
from reliability_helpers import backend_mount

from dkr.testing import images
from dkr.testing.images import Dir, File, Image, Layer

try:
    import btrfsutil
except ImportError:
    btrfsutil = None

CHECKOUT = Path(__file__).resolve().parent.parent
# As on a machine where `pip install dkr` could not build btrfsutil.
WITHOUT_BTRFSUTIL = "import sys\nsys.modules['btrfsutil'] = None\n"


def _requirements() -> dict[str, str]:
    """The installed dkr's requirements: name -> its environment marker ('' if none)."""
    found = {}
    for line in importlib.metadata.requires("dkr") or []:
        name = re.match(r"[A-Za-z0-9_.-]+", line).group(0).lower()
        found[name] = line.partition(";")[2].strip()
    return found


def test_btrfsutil_is_an_extra_that_install_sh_and_ci_install():
    requirements = _requirements()
    assert requirements["btrfsutil"].replace("'", '"') == 'extra == "btrfs"'
    assert requirements["pycurl"] == ""                 # (the rest is still required)
    install = (CHECKOUT / "install.sh").read_text()
    assert re.search(r"pip install .*-e '\.\[[a-z,]*btrfs[a-z,]*\]'", install), install


def _dkr(python: Path, *args, env=None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-m", "dkr", *map(str, args)], capture_output=True,
                          text=True, timeout=300, env=env, cwd=cwd or "/")


@pytest.fixture(scope="module")
def btrfs_mount():
    with backend_mount("btrfs") as mount:
        yield mount


def test_btrfs_without_the_module_works_through_the_btrfs_command(registry, btrfs_mount,
                                                                   tmp_path):
    python = interpreter_with_site_hook(tmp_path / "py", WITHOUT_BTRFSUTIL)
    used = subprocess.run([str(python), "-c", "import dkr_plugins.btrfs as b; "
                           "print(b.btrfsutil, b._subvolumes().name)"],
                          capture_output=True, text=True, check=True, cwd="/")
    assert used.stdout.split() == ["None", "btrfs-progs"]

    image = Image([Layer([Dir("etc"), File("etc/base", b"base\n")]),
                   Layer([File("etc/base", b"changed\n"), File("etc/top", b"top\n")])])
    images.push_image(registry, "extras/nolib", "1", image)
    root = btrfs_mount / "nolib"
    pulled = _dkr(python, "pull", "--insecure", "--backend", "btrfs", "--image-root", root,
                  f"{registry.host}/extras/nolib:1", "box")
    assert pulled.returncode == 0, pulled.stderr
    assert (root / "box/etc/base").read_bytes() == b"changed\n"
    layers = sorted(p for p in root.iterdir() if p.name.startswith(".dkr-"))
    assert len(layers) == 2
    for layer in layers:
        assert btrfsutil.is_subvolume(layer) and btrfsutil.get_subvolume_read_only(layer)
    machine = btrfsutil.subvolume_info(root / "box")
    assert not btrfsutil.get_subvolume_read_only(root / "box")
    assert machine.parent_uuid == btrfsutil.subvolume_info(
        next(p for p in layers if (p / "etc/top").exists())).uuid    # a snapshot of the top

    btrfsutil.create_subvolume(root / "box/nested")          # a user's own, inside
    for args in (["remove", "box"], ["gc"]):
        done = _dkr(python, *args, "--image-root", root)
        assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in root.iterdir() if p.name != ".dkr") == []
    left = [rel for rel, _ in btrfsutil.SubvolumeIterator(btrfs_mount)
            if Path(rel).parts[0] == "nolib"]
    assert left == []


def test_btrfs_without_module_or_command_says_what_to_install(registry, tmp_path):
    python = interpreter_with_site_hook(tmp_path / "py", WITHOUT_BTRFSUTIL)
    programs = tmp_path / "bin"                  # a PATH with everything but btrfs
    programs.mkdir()
    for name in ("mount", "umount", "tar", "systemd-nspawn"):
        if shutil.which(name):
            os.symlink(shutil.which(name), programs / name)
    env = {**os.environ, "PATH": str(programs)}
    run = _dkr(python, "pull", "--insecure", "--backend", "btrfs", "--image-root",
               tmp_path / "m", f"{registry.host}/extras/none:1", env=env)
    assert_clean_failure(Run(run.returncode, run.stdout, run.stderr), tmp_path / "m",
                         r"backend btrfs cannot be used on .*: neither the btrfsutil Python "
                         r"module \(pip install 'dkr\[btrfs\]', which needs libbtrfsutil-dev\) "
                         r"nor the btrfs command \(btrfs-progs\) is installed")


# --- man page and bash completion ------------------------------------------------------

GENERATED = {"man": (CHECKOUT / "dkr/data/man/dkr.1", "dkr.cli.manpage"),
             "completion": (CHECKOUT / "dkr/data/bash-completion/dkr", "dkr.cli.completion")}


@pytest.mark.parametrize("kind", sorted(GENERATED))
def test_the_shipped_man_page_and_completion_are_those_the_parser_makes(kind):
    path, module = GENERATED[kind]
    made = subprocess.run([sys.executable, "-m", module], capture_output=True, text=True,
                          check=True, cwd="/").stdout
    assert path.read_text() == made, f"{path} is out of date: python -m {module} > {path}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """dkr pip-installed (not editable) into a prefix of its own, as users install it."""
    prefix = tmp_path_factory.mktemp("prefix")
    # From a copy: building in the checkout would leave a build/ directory in it.
    source = tmp_path_factory.mktemp("source") / "dkr"
    shutil.copytree(CHECKOUT, source, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "*.egg-info", "__pycache__", "bench", "tests"))
    # --ignore-installed: else pip takes the dkr this test runs from out of its venv.
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                           "--ignore-installed", "--disable-pip-version-check",
                           "--prefix", str(prefix), str(source)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return prefix


def test_the_man_page_is_installed_renders_and_lists_every_pull_option(installed):
    page = installed / "share/man/man1/dkr.1"
    assert page.read_text() == GENERATED["man"][0].read_text()
    rendered = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-P-cbou", str(page)],
                              capture_output=True, text=True, check=True)
    assert rendered.stderr == ""                     # no roff warnings
    text = rendered.stdout
    assert re.search(r"^NAME\n\s+dkr - pull container images", text, re.M), text[:300]
    for section in ("SYNOPSIS", "OPTIONS", "COMMANDS", "EXAMPLES", "ENVIRONMENT", "SEE ALSO"):
        assert re.search(rf"^{section}$", text, re.M), section
    from dkr.cli.main import build_parser
    from dkr.cli.manpage import commands, options
    [pull] = [c.parser for c in commands(build_parser()) if c.name == "pull"]
    for action in options(pull):
        for name in action.option_strings:
            assert re.search(rf"(^|\s){re.escape(name)}[ ,\n]", text), f"{name} missing"
    if shutil.which("man"):
        by_man = subprocess.run(["man", "-l", str(page)], capture_output=True, text=True,
                                env={**os.environ, "MANPAGER": "cat", "MANWIDTH": "100"})
        assert by_man.returncode == 0 and "--password-stdin" in by_man.stdout, by_man.stderr


def _complete(script: Path, *words: str) -> list[str]:
    """What bash offers after ``words`` (the last one being typed), with ``script`` loaded."""
    done = subprocess.run(
        ["bash", "-c", 'source "$0"; COMP_WORDS=("$@"); COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); '
         '_dkr; printf "%s\\n" "${COMPREPLY[@]}"', str(script), *words],
        capture_output=True, text=True, check=True)
    assert done.stderr == ""
    return done.stdout.split()


def test_bash_completes_commands_options_and_values(installed, tmp_path):
    script = installed / "share/bash-completion/completions/dkr"
    assert "complete -F _dkr dkr" in script.read_text()
    assert _complete(script, "dkr", "pu") == ["pull"]
    assert _complete(script, "dkr", "--image-root", "/srv", "-v", "pu") == ["pull"]
    assert _complete(script, "dkr", "l") == ["list", "login", "logout"]
    assert _complete(script, "dkr", "pull", "--pass") == ["--password-stdin"]
    assert _complete(script, "dkr", "pull", "--tls-verify", "=", "f") == ["false"]
    assert _complete(script, "dkr", "pull", "--stage-ahead", "") == ["auto", "always", "never"]
    assert _complete(script, "dkr", "pull", "--jobs", "") == []
    (tmp_path / "images.txt").write_text("")
    assert _complete(script, "dkr", "pull", "--batch", f"{tmp_path}/ima") == \
        [f"{tmp_path}/images.txt"]
    assert _complete(script, "dkr", "rm", "--dr") == []
    assert _complete(script, "dkr", "gc", "--dr") == ["--dry-run"]


def test_bash_completes_the_machines_of_the_image_root_given(installed, registry, tmp_path):
    script = installed / "share/bash-completion/completions/dkr"
    images.push_image(registry, "extras/names", "1", Image([Layer([File("a", b"a")])]))
    root = tmp_path / "m"
    for local in ("web", "db"):
        assert_ok(run_dkr("pull", "--insecure", "--backend", "dir", "--image-root", root,
                          f"{registry.host}/extras/names:1", local))
    assert _complete(script, "dkr", "--image-root", str(root), "rm", "") == ["db", "web"]
    assert _complete(script, "dkr", "inspect", "--image-root", "=", str(root), "w") == ["web"]
    assert _complete(script, "dkr", "mount", "--image-root", str(root), "web", "") == \
        ["db", "web"]
    assert _complete(script, "dkr", "--image-root", str(tmp_path / "none"), "rm", "") == []
    assert _complete(script, "dkr", "--image-root", str(root), "pull", "") == []
