"""Installing where users install: ``pip install dkr`` needs no libbtrfsutil headers
(btrfs then works through the btrfs command; the module is the ``dkr[btrfs]``
extra), and the package brings its man page and bash completion."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
from contextlib import ExitStack
from pathlib import Path

import pytest
from helpers import Run, assert_clean_failure, interpreter_with_site_hook
from reliability_helpers import need

from dkr.testing import images, loopfs
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
    need("the btrfsutil module is missing (the test checks with it)" if btrfsutil is None
         else loopfs.unavailable_reason("btrfs"))
    with ExitStack() as stack:
        try:
            mount = stack.enter_context(loopfs.btrfs("256M"))
        except loopfs.LoopFsError as e:
            need(str(e))
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
