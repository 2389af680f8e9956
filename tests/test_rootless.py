"""dkr run by an unprivileged user on an image root that user owns.

The pull works: the extractor enters a user namespace to be allowed its
chroot, so the confinement holds without root. Every file is owned by the user
who pulled; what could not be applied is recorded the way rootless container
storage (containers/storage, fuse-overlayfs) records it, in the
``user.containers.override_stat`` xattr ("UID:GID:MODE:TYPE"): the owners of
entries not owned by root in the image, and device nodes, which become empty
files with the device in the xattr. The log says so. ``security.capability``
cannot be set without privilege and is dropped. No half-applied layer or
machine.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import Run, temp_entries
from reliability_helpers import check_layers_complete, fingerprint, make_sentinel

from dkr.testing import images
from dkr.testing.images import Dir, File, Image, Layer, Symlink

NOBODY = 65534


def need_root_and_userns() -> None:
    if os.geteuid() != 0:
        pytest.skip("switching to an unprivileged user needs root")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is missing")
    probe = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                            "unshare", "-U", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("unprivileged user namespaces are disabled here")


@pytest.fixture
def user_root():
    """An image root owned by nobody, in a directory nobody can reach (pytest's tmp is 0700)."""
    need_root_and_userns()
    base = Path(tempfile.mkdtemp(prefix="dkr-rootless-"))
    try:
        base.chmod(0o755)
        root = base / "machines"
        root.mkdir()
        os.chown(root, NOBODY, NOBODY)
        yield base, root
    finally:
        shutil.rmtree(base, ignore_errors=True)


def run_as_nobody(*args, home: Path | None, uid: int = NOBODY) -> Run:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8",
           **({"HOME": str(home)} if home else {})}
    proc = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                           sys.executable, "-m", "dkr", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300,
                          cwd=Path(__file__).resolve().parent.parent)
    return Run(proc.returncode, proc.stdout, proc.stderr)


OVERRIDE = "user.containers.override_stat"


def override(path: Path) -> str | None:
    try:
        return os.getxattr(path, OVERRIDE, follow_symlinks=False).decode()
    except OSError:
        return None


def test_rootless_pull_works_and_records_what_it_cannot_apply(registry, user_root):
    base, root = user_root
    images.push_image(registry, "rootless/sample", "latest", images.sample_image())
    run = run_as_nobody("pull", "--insecure", "--image-root", root, "--backend", "dir", "--json",
                        f"{registry.host}/rootless/sample", home=base)
    assert run.rc == 0, run.err
    assert "Traceback" not in run.err, run.err
    machine = root / "sample"
    expected = images.sample_expectations()

    owners = {(st.st_uid, st.st_gid) for st in
              (os.lstat(os.path.join(d, n)) for d, ds, fs in os.walk(root) for n in ds + fs)}
    assert owners == {(NOBODY, NOBODY)}, f"ownership was applied in part: {owners}"
    # Owners other than root are recorded where rootless container tools look for them.
    assert override(machine / "home" / "user") == "1000:1000:0750:dir"
    assert override(machine / "home" / "user" / ".profile") == "1000:1000:0600:file"
    assert override(machine / "usr" / "bin" / "wall") == "0:5:2755:file"
    # Device nodes cannot be made: empty files that say what they were; the fifo is made.
    null, loop0 = machine / "dev" / "null", machine / "dev" / "loop0"
    assert stat.S_ISREG(os.lstat(null).st_mode) and null.stat().st_size == 0
    assert override(null) == "0:0:0666:char-1-3"
    assert override(loop0) == "0:6:0660:block-7-0"
    assert stat.S_ISFIFO(os.lstat(machine / "run" / "initctl").st_mode)
    # security.* cannot be set without privilege: dropped; user.* xattrs are kept.
    assert "security.capability" not in os.listxattr(machine / "usr" / "bin" / "ping")
    assert os.getxattr(machine / "etc" / "xattrs", "user.comment") == b"hello"
    # The log says what was not applied.
    warnings = [line for line in run.err.splitlines() if line.startswith("Not running as root")]
    assert len(warnings) == 1 and OVERRIDE in warnings[0], run.err
    # Everything else is as the image says.
    assert os.lstat(machine / "usr" / "bin" / "su").st_mode & 0o7777 == 0o4755
    assert os.lstat(machine / "home" / "user").st_mode & 0o7777 == 0o750
    assert (machine / "etc" / "hostname").read_bytes() == b"updated\n"
    for path in expected["absent"]:
        assert not os.path.lexists(machine / path), path
    for group in expected["hardlinks"]:
        assert len({os.lstat(machine / p).st_ino for p in group}) == 1, group
    check_layers_complete(root)
    assert temp_entries(root) == []


def test_rootless_machines_take_entries_their_owner_cannot_read(registry, user_root):
    """Images ship /etc/shadow with mode 000. Without root, the machine is copied from
    its layer as the user who pulls: such entries stay readable to that user on disk,
    and their true mode is recorded."""
    base, root = user_root
    images.push_image(registry, "rootless/shadow", "latest", Image([
        Layer([File("etc/shadow", b"root:*:19000::::::\n", mode=0o000),
               Dir("locked", mode=0o000), File("locked/inside", b"in")]),
        Layer([File("etc/motd", b"hi\n")])]))
    run = run_as_nobody("pull", "--insecure", "--image-root", root, "--backend", "dir",
                        f"{registry.host}/rootless/shadow", home=base)
    assert run.rc == 0, run.err
    machine = root / "shadow"
    assert override(machine / "etc" / "shadow") == "0:0:0000:file"
    assert os.lstat(machine / "etc" / "shadow").st_mode & 0o7777 == 0o400
    assert override(machine / "locked") == "0:0:0000:dir"
    assert (machine / "locked" / "inside").read_bytes() == b"in"
    assert (machine / "etc" / "motd").read_bytes() == b"hi\n"
    assert temp_entries(root) == []


def test_rootless_extractor_is_still_confined(registry, user_root):
    """Without root the chroot comes from a user namespace: links out still resolve inside."""
    base, root = user_root
    sentinel = make_sentinel(base / "sentinel")
    # Writable for nobody: only the extractor's confinement protects it.
    os.chown(sentinel, NOBODY, NOBODY)
    os.chown(sentinel / "file", NOBODY, NOBODY)
    rel = os.path.relpath(sentinel, root / ".dkr-layer")
    images.push_image(registry, "rootless/hostile", "latest", Image([
        Layer([Symlink("up", rel), Symlink("abs", str(sentinel))]),
        Layer([File("up/file", b"pwned"), File("abs/new", b"pwned")])]))
    before = fingerprint(sentinel)
    run = run_as_nobody("pull", "--insecure", "--image-root", root, "--backend", "dir",
                        f"{registry.host}/rootless/hostile", home=base)
    assert "Traceback" not in run.err, run.err
    assert fingerprint(sentinel) == before
    assert run.rc != 0 and run.err.count("dkr: error: ") == 1, run.err
    assert temp_entries(root) == [] and not os.path.lexists(root / "hostile")


def test_a_user_with_no_home_pulls(registry, user_root):
    """No $HOME and no passwd entry (an arbitrary uid in a CI container): there is
    no home to look for logins in, and the pull goes on without."""
    base, root = user_root
    stranger = 54321
    with pytest.raises(KeyError):
        pwd.getpwuid(stranger)
    os.chown(root, stranger, stranger)
    images.push_image(registry, "rootless/nohome", "latest", Image([Layer([File("f", b"f")])]))
    run = run_as_nobody("pull", "--insecure", "--image-root", root, "--backend", "dir",
                        f"{registry.host}/rootless/nohome", home=None, uid=stranger)
    assert run.rc == 0, run.err
    assert (root / "nohome" / "f").read_bytes() == b"f"
