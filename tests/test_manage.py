"""dkr list, inspect, remove, gc, mount and umount (on the dir backend; the btrfs and
overlay specifics are in their own test files)."""

from __future__ import annotations

import array
import fcntl
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from contextlib import contextmanager

import pytest
from helpers import assert_clean_failure, assert_ok, checked_event, pull, run_dkr

from dkr.testing import images, loopfs
from dkr.testing.faultproxy import FaultProxy
from dkr.testing.images import Dir, File, Image, Layer

BASE = [Layer([Dir("etc"), File("etc/base", b"base layer\n")]),
        Layer([Dir("usr"), File("usr/lib.so", b"\x7fELF" * 4000)])]


def family(name: str) -> Image:
    return Image([*BASE, Layer([Dir("app"), File(f"app/{name}", name.encode() * 3000)])])


@pytest.fixture(scope="module")
def pushed(registry):
    """Two images sharing a 2-layer base, and the sample image."""
    found = {"first": family("first"), "second": family("second"), "sample": images.sample_image()}
    for name, image in found.items():
        images.push_image(registry, f"manage/{name}", "latest", image)
    return found


@pytest.fixture(scope="module")
def populated(registry, pushed, tmp_path_factory):
    """An image root with machines "first" and "box" (the sample), for tests that only look."""
    root = tmp_path_factory.mktemp("populated") / "machines"
    pull_dir(registry, "manage/first", root)
    pull_dir(registry, "manage/sample", root, local="box")
    return root


def dkr(root, *args):
    return run_dkr(*args, "--image-root", root)


def layer_keys(root) -> set[str]:
    return {p.name[len(".dkr-"):] for p in root.iterdir()
            if p.name.startswith(".dkr-") and ".tmp-" not in p.name}


def machine_layers(root, local) -> list[str]:
    return json.loads((root / ".dkr" / "machines" / f"{local}.json").read_text())["layers"]


@contextmanager
def held_lock(root, name):
    """Hold one of dkr's flocks, as a running pull would."""
    fd = os.open(root / ".dkr" / "locks" / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def pull_dir(registry, repo, root, local=None):
    return assert_ok(pull(registry, repo, root, "--backend", "dir", local=local))


# --- list and inspect ------------------------------------------------------------------

def test_list_and_inspect(registry, pushed, populated):
    image_root = populated
    table = assert_ok(dkr(image_root, "list")).out.splitlines()
    assert table[0].split() == ["LOCAL", "REFERENCE", "DIGEST", "BACKEND", "SIZE", "CREATED",
                                "STATE"]
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert sorted(rows) == ["box", "first"]
    assert rows["box"][1] == f"{registry.host}/manage/sample:latest"
    assert rows["box"][2] == pushed["sample"].manifest_digest.split(":")[1][:12]
    assert rows["box"][3] == "dir" and rows["box"][-1] == "ready"

    listed = {m["local"]: m for m in json.loads(assert_ok(dkr(image_root, "list", "--json")).out)}
    box = listed["box"]
    assert box["digest"] == pushed["sample"].manifest_digest
    assert box["backend"] == "dir" and box["present"] is True and box["state"] == "ready"
    assert box["size"] == sum(len(layer.tar) for layer in pushed["sample"].layers)
    assert box["created"].endswith("Z")

    out = json.loads(assert_ok(dkr(image_root, "inspect", "box")).out)
    assert out["machine"]["local"] == "box"
    assert out["machine"]["manifest_digest"] == pushed["sample"].manifest_digest
    assert out["manifest"] == pushed["sample"].manifest_json
    assert out["config"] == pushed["sample"].config_json
    stored = image_root / ".dkr" / "blobs" / "sha256" / pushed["sample"].config_digest.split(":")[1]
    config_digest = out["machine"]["config_digest"]
    assert f"sha256:{hashlib.sha256(stored.read_bytes()).hexdigest()}" == config_digest


def _with_stdout_unread(*args) -> subprocess.CompletedProcess:
    """dkr ARGS writing into a pipe whose reader has gone (`dkr ... | head -1`)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}   # as a user has it
    try:
        return subprocess.run([sys.executable, "-m", "dkr", *map(str, args)], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=60, env=env)
    finally:
        os.close(write_end)


@pytest.mark.parametrize("command", [["inspect", "box"], ["list", "--json"], ["list"],
                                     ["gc", "--dry-run"]])
def test_a_reader_that_stops_reading_ends_dkr_without_a_word(populated, command):
    """`dkr inspect box | head -1`: no error line, and the exit status of SIGPIPE."""
    proc = _with_stdout_unread(command[0], "--image-root", populated, *command[1:])
    assert (proc.returncode, proc.stderr) == (128 + signal.SIGPIPE, "")


def test_a_pull_whose_event_reader_left_still_says_why_it_failed(registry, image_root):
    """The reader takes the first event and goes; the pull then fails (its manifest
    comes late, and is unknown): the error event cannot be written, the error line is."""
    host, port = registry.host.split(":")
    with FaultProxy(host, int(port)) as proxy:
        proxy.add_fault("/no/such/manifests/", "stall_after", bytes=0, seconds=1)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
        proc = subprocess.Popen([sys.executable, "-m", "dkr", "pull", "--insecure", "--json",
                                 "--image-root", str(image_root), "--backend", "dir",
                                 f"{proxy.host}/no/such:tag"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)
        first = proc.stdout.readline()
        proc.stdout.close()
        errors, status = proc.stderr.read(), proc.wait(timeout=60)
    assert checked_event(json.loads(first))["event"] == "backend"
    assert status == 1
    assert re.search(r"^dkr: error: .*no/such:tag: manifest unknown", errors, re.M), errors


def test_list_of_an_empty_or_missing_root(image_root):
    assert assert_ok(dkr(image_root, "list")).out.split() == [
        "LOCAL", "REFERENCE", "DIGEST", "BACKEND", "SIZE", "CREATED", "STATE"]
    assert json.loads(assert_ok(dkr(image_root, "list", "--json")).out) == []
    assert_ok(dkr(image_root, "gc"))
    assert not image_root.exists()            # read-only commands create nothing


def test_unknown_machine_is_an_error(populated):
    for command in ("inspect", "remove", "mount", "umount"):
        failed = dkr(populated, command, "nope")
        assert_clean_failure(failed, populated, rf"no machine 'nope' in {populated}")
        bad = dkr(populated, command, "../first")
        assert_clean_failure(bad, populated, r"invalid machine name '\.\./first'")
    assert (populated / "first" / "etc" / "base").exists()


def test_a_record_that_is_not_an_object_is_skipped_and_named(image_root):
    records = image_root / ".dkr" / "machines"
    records.mkdir(parents=True)
    (records / "odd.json").write_text("[1]")
    listed = assert_ok(dkr(image_root, "list"))
    assert re.search(r"unreadable metadata .*odd\.json: not a JSON object; its machine is "
                     r"listed as unreadable", listed.err)
    assert listed.out.splitlines()[1].split()[0] == "odd"
    assert listed.out.splitlines()[1].endswith("record unreadable")
    failed = dkr(image_root, "inspect", "odd")
    assert_clean_failure(failed, image_root, r"unreadable metadata .*odd\.json: not a JSON")
    assert (records / "odd.json").read_text() == "[1]"
    removed = assert_ok(dkr(image_root, "remove", "odd"))      # the way out of it
    assert re.search(r"odd\.json: not a JSON object; removing machine odd as found on disk",
                     removed.err), removed.err
    assert not (records / "odd.json").exists()


@pytest.mark.parametrize("field, ignored", [
    ('"manifest_digest": "nocolon"', 'manifest_digest "nocolon"'),
    ('"created": null', "created null"),
    ('"layers": "abc"', 'layers "abc"'),
])
def test_a_record_field_of_the_wrong_type_is_ignored(image_root, field, ignored):
    """A hand-edited record: the field is left out (and the log says so); list,
    inspect and remove still work, and nothing ends in a traceback."""
    records = image_root / ".dkr" / "machines"
    records.mkdir(parents=True)
    (records / "odd.json").write_text('{"local": "odd", "backend": "dir", %s}' % field)
    listed = assert_ok(dkr(image_root, "list"))
    assert "odd" in listed.out and f"ignoring its {ignored}" in listed.err
    assert "odd" in assert_ok(dkr(image_root, "inspect", "odd")).out
    assert_ok(dkr(image_root, "remove", "odd"))
    assert not (records / "odd.json").exists()


def test_mount_all_goes_on_past_a_machine_whose_backend_is_gone(registry, pushed, image_root):
    pull_dir(registry, "manage/first", image_root, local="aa")
    pull_dir(registry, "manage/second", image_root, local="bb")
    record = image_root / ".dkr" / "machines" / "aa.json"
    record.write_text(record.read_text().replace('"backend": "dir"', '"backend": "gone-plugin"'))
    for command in ("mount", "umount"):
        run = dkr(image_root, command, "--all")
        assert run.rc == 1
        errors = [line for line in run.err.splitlines() if line.startswith("dkr: error: ")]
        assert errors == ["dkr: error: machine 'aa' was made by backend 'gone-plugin', "
                          "which is not installed"], run.err
        assert "bb" in run.err.replace(errors[0], ""), run.err     # and bb was done


def test_mount_all_names_a_machine_whose_record_cannot_be_read(registry, pushed, image_root):
    """A boot script runs 'dkr mount --all': a machine it could not even look at is a
    failure, not a warning."""
    pull_dir(registry, "manage/first", image_root, local="aa")
    pull_dir(registry, "manage/second", image_root, local="bb")
    (image_root / ".dkr" / "machines" / "aa.json").write_text('{"local": ')
    for command in ("mount", "umount"):
        run = dkr(image_root, command, "--all")
        assert run.rc == 1
        errors = [line for line in run.err.splitlines() if line.startswith("dkr: error: ")]
        assert len(errors) == 1 and re.search(r"unreadable metadata .*aa\.json", errors[0]), run.err
        assert "bb" in run.err.replace(errors[0], ""), run.err     # and bb was done


def test_mount_needs_a_name(image_root):
    assert_clean_failure(dkr(image_root, "mount"), image_root, r"give LOCAL or --all")
    assert_clean_failure(dkr(image_root, "umount", "--all", "x"), image_root, r"not both")


def test_dir_machine_needs_no_mount(populated):
    assert "needs no mount" in assert_ok(dkr(populated, "mount", "first")).err
    assert "not mounted" in assert_ok(dkr(populated, "umount", "--all")).err
    assert (populated / "first" / "app" / "first").exists()


# --- remove ---------------------------------------------------------------------------

def test_remove(registry, pushed, image_root):
    pull_dir(registry, "manage/first", image_root)
    pull_dir(registry, "manage/second", image_root)
    layers = layer_keys(image_root)
    run = assert_ok(dkr(image_root, "rm", "first"))
    assert "Removed machine first." in run.err
    assert not os.path.lexists(image_root / "first")
    assert not (image_root / ".dkr" / "machines" / "first.json").exists()
    assert layer_keys(image_root) == layers               # layers wait for gc
    listed = json.loads(assert_ok(dkr(image_root, "list", "--json")).out)
    assert [m["local"] for m in listed] == ["second"]


def test_machine_names_are_hostnames_and_older_ones_still_work(registry, pushed, image_root):
    """New machines get names machinectl accepts; one an older dkr named with '_' is
    still known by it."""
    images.push_image(registry, "manage/my_app", "latest", pushed["first"])
    assert_ok(pull(registry, "manage/my_app", image_root, "--backend", "dir"))
    assert (image_root / "my-app" / "app" / "first").exists()          # '_' became '-'
    refused = pull(registry, "manage/first", image_root, "--backend", "dir", local="my_box")
    assert_clean_failure(refused, image_root, r"invalid machine name 'my_box': .*hostname")
    pull_dir(registry, "manage/first", image_root, local="older")
    records = image_root / ".dkr" / "machines"
    os.rename(image_root / "older", image_root / "old_box")
    record = json.loads((records / "older.json").read_text())
    (records / "old_box.json").write_text(json.dumps({**record, "local": "old_box"}))
    (records / "older.json").unlink()
    assert "old_box" in assert_ok(dkr(image_root, "list")).out
    assert_ok(dkr(image_root, "inspect", "old_box"))
    assert_ok(dkr(image_root, "remove", "old_box"))
    assert not (image_root / "old_box").exists() and not (records / "old_box.json").exists()


def test_removing_a_machine_leaves_the_temp_entries_of_another_alone(registry, pushed,
                                                                    image_root):
    """Machine "web.tmp-1" is being made (its temp tree, its lock held) while "web" is
    removed and pulled again: its temp tree starts like web's would, and is not web's."""
    pull_dir(registry, "manage/first", image_root, local="web")
    making = image_root / ".dkr-local-web.tmp-1.tmp-0badcafe"
    (making / "etc").mkdir(parents=True)
    with held_lock(image_root, "machine-web.tmp-1"):
        assert_ok(dkr(image_root, "remove", "web"))
        assert (making / "etc").is_dir()
        pull_dir(registry, "manage/first", image_root, local="web")
        assert (making / "etc").is_dir()
        assert_ok(dkr(image_root, "gc"))
        assert (making / "etc").is_dir()
    assert_ok(dkr(image_root, "gc"))
    assert not making.exists()


def test_remove_is_all_or_nothing(registry, pushed, image_root):
    pull_dir(registry, "manage/first", image_root)
    pull_dir(registry, "manage/second", image_root)
    failed = dkr(image_root, "remove", "first", "nope", "second")
    assert_clean_failure(failed, image_root, r"no machine 'nope'")
    assert (image_root / "first").is_dir() and (image_root / "second").is_dir()
    with held_lock(image_root, "machine-second"):
        busy = dkr(image_root, "remove", "first", "second")
        assert_clean_failure(busy, image_root, r"machine 'second' is busy")
    assert (image_root / "first").is_dir() and (image_root / "second").is_dir()
    assert_ok(dkr(image_root, "remove", "first", "second"))
    assert not (image_root / "first").exists() and not (image_root / "second").exists()


@contextmanager
def bind_mounted(source, target, root):
    """``source`` on ``target``; afterwards nothing stays mounted in ``root`` (the
    mount goes along when its machine is moved)."""
    subprocess.run(["mount", "--bind", str(source), str(target)], check=True)
    try:
        yield
    finally:
        loopfs.unmount_below(root)


def test_a_machine_with_a_mount_inside_is_not_removed_through_it(registry, pushed, image_root,
                                                                tmp_path):
    """A bind mount into a machine (the host's /dev, a data directory) is the user's:
    removing or replacing the machine must not delete what it shows."""
    host = tmp_path / "host-data"
    host.mkdir()
    (host / "precious").write_text("keep me\n")
    pull_dir(registry, "manage/first", image_root)
    first_top = machine_layers(image_root, "first")[-1]
    (image_root / "first" / "mnt").mkdir()
    pull_dir(registry, "manage/second", image_root)
    with bind_mounted(host, image_root / "first" / "mnt", image_root):
        refused = dkr(image_root, "remove", "second", "first")
        assert_clean_failure(refused, image_root, rf"{image_root / 'first'} has a file system "
                                                  rf"mounted in it \(.*/first/mnt\): unmount it first")
        assert (host / "precious").read_text() == "keep me\n"
        assert (image_root / "first" / "app" / "first").exists()
        assert (image_root / "second" / "app" / "second").exists()     # all or nothing
        replaced = assert_ok(pull(registry, "manage/second", image_root, "--backend", "dir",
                                  "--force", local="first"))
        assert "The machine that first replaced is left at" in replaced.err
        assert (host / "precious").read_text() == "keep me\n"
        assert (image_root / "first" / "app" / "second").exists()
        [left] = [p for p in image_root.iterdir() if p.name.startswith(".dkr-local-first.tmp-")]
        # The swap cannot end while the old tree has a mount in it: it stays, and so
        # do the layers it may stand on; gc says why.
        gc = assert_ok(dkr(image_root, "gc"))
        assert f"The machine that first replaced is left at {left}: {left} has a file " \
            "system mounted in it" in gc.err, gc.err
        assert first_top in layer_keys(image_root) and left.is_dir()
        assert (host / "precious").read_text() == "keep me\n"
        subprocess.run(["umount", str(left / "mnt")], check=True)   # the mount went along
    assert_ok(dkr(image_root, "gc"))
    assert not left.exists() and (host / "precious").read_text() == "keep me\n"
    assert first_top not in layer_keys(image_root)


# --- gc -------------------------------------------------------------------------------

def test_gc_removes_only_unreferenced_layers(registry, pushed, image_root):
    pull_dir(registry, "manage/first", image_root)
    pull_dir(registry, "manage/second", image_root)
    first, second = machine_layers(image_root, "first"), machine_layers(image_root, "second")
    assert first[:2] == second[:2] and first[2] != second[2]

    assert "Freed about 0 B (nothing to remove)." in assert_ok(dkr(image_root, "gc")).err
    assert layer_keys(image_root) == set(first) | set(second)

    assert_ok(dkr(image_root, "remove", "first"))
    dry = assert_ok(dkr(image_root, "gc", "--dry-run"))
    assert f"would remove layer {first[2][:12]}" in dry.out
    assert dry.out.count("would remove layer") == 1
    assert "would remove blob" in dry.out                 # first's manifest and config
    assert layer_keys(image_root) == set(first) | set(second)     # a dry run removes nothing

    run = assert_ok(dkr(image_root, "gc"))
    assert f"Removed layer {first[2][:12]}" in run.err
    image = pushed["first"]
    freed = len(image.layers[2].tar) + len(image.manifest_bytes) + len(image.config_bytes)
    assert f"Freed about {freed / 1000:.1f} kB (1 layer, 2 blobs)." in run.err
    assert layer_keys(image_root) == set(second)
    assert not (image_root / ".dkr" / "layers" / f"{first[2]}.json").exists()
    assert (image_root / "second" / "app" / "second").read_bytes() == b"second" * 3000
    assert json.loads(assert_ok(dkr(image_root, "inspect", "second")).out)["config"]

    assert_ok(dkr(image_root, "remove", "second"))
    assert_ok(dkr(image_root, "gc"))
    assert layer_keys(image_root) == set()
    meta = image_root / ".dkr"
    assert not list((meta / "layers").iterdir()) and not list((meta / "blobs" / "sha256").iterdir())


@contextmanager
def immutable(path):
    """``path`` cannot be unlinked (FS_IMMUTABLE_FL, as chattr +i): a removal fails there.
    (Held by descriptor: the flag comes off wherever the file has been moved to.)"""
    fd = os.open(path, os.O_RDONLY)

    def set_flag(on: bool):
        flags = array.array("l", [0])
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, flags, True)
        flags[0] = flags[0] | FS_IMMUTABLE_FL if on else flags[0] & ~FS_IMMUTABLE_FL
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, flags)
    try:
        set_flag(True)
        try:
            yield
        finally:
            set_flag(False)
    finally:
        os.close(fd)


FS_IOC_GETFLAGS, FS_IOC_SETFLAGS, FS_IMMUTABLE_FL = 0x80086601, 0x40086602, 0x10


def test_a_layer_gc_fails_to_remove_is_never_reused_half_removed(registry, pushed, image_root):
    """A gc that stops inside a layer's removal (an error here; a kill does the same)
    has deleted some of its files: the layer must not keep its name, or the next pull
    takes it as it is."""
    pull_dir(registry, "manage/first", image_root)
    top = machine_layers(image_root, "first")[-1]
    assert_ok(dkr(image_root, "remove", "first"))
    layer = image_root / f".dkr-{top}"
    for n in range(40):
        (layer / "app" / f"extra{n}").write_bytes(b"x")          # something to delete first
    with immutable(layer / "app" / "first"):
        failed = dkr(image_root, "gc")
        assert failed.rc == 1 and "dkr: error: cannot remove layer " in failed.err, failed.err
        assert not layer.exists()
        [doomed] = [p for p in image_root.iterdir() if p.name.startswith(f".dkr-{top}.tmp-")]
        assert 0 < len(os.listdir(doomed / "app")) < 41             # half removed
    again = pull_dir(registry, "manage/first", image_root)
    assert "already exists" not in " ".join(l for l in again.err.splitlines() if top[:12] in l)
    assert (image_root / "first" / "app" / "first").read_bytes() == b"first" * 3000
    assert not doomed.exists()                     # the pull cleared what gc left


def test_a_broken_layer_record_does_not_stop_gc_or_list(registry, pushed, image_root):
    pull_dir(registry, "manage/first", image_root)
    pull_dir(registry, "manage/second", image_root)
    first, second = machine_layers(image_root, "first"), machine_layers(image_root, "second")
    assert_ok(dkr(image_root, "remove", "first"))
    records = image_root / ".dkr" / "layers"
    (records / f"{first[2]}.json").write_text('{"backend": {"x": 1}, "tar_bytes": "many"}')
    (records / f"{second[2]}.json").write_text("")              # needed by "second"
    listed = assert_ok(dkr(image_root, "list"))
    assert "second" in listed.out and f"{second[2]}.json" in listed.err
    run = assert_ok(dkr(image_root, "gc"))
    assert "ignoring its backend {" in run.err and "ignoring its tar_bytes" in run.err
    assert layer_keys(image_root) == set(second)
    assert (image_root / "second" / "app" / "second").read_bytes() == b"second" * 3000


def test_gc_leaves_what_a_pull_holds_and_clears_leftovers(registry, pushed, image_root):
    pull_dir(registry, "manage/first", image_root)
    assert_ok(dkr(image_root, "remove", "first"))
    keys = sorted(layer_keys(image_root))
    assert len(keys) == 3
    held_key = keys[0]
    layer_tmp = image_root / f".dkr-{'ab' * 32}.tmp-0123abcd"
    held_tmp = image_root / f".dkr-{'cd' * 32}.tmp-4567ef01"
    machine_tmp = image_root / ".dkr-local-crashed.tmp-89abcdef"
    for leftover in (layer_tmp, held_tmp, machine_tmp):
        (leftover / "etc").mkdir(parents=True)
        (leftover / "etc" / "half").write_text("half written")

    with held_lock(image_root, f"layer-{held_key}"), held_lock(image_root, f"layer-{'cd' * 32}"):
        run = assert_ok(dkr(image_root, "gc"))
    assert layer_keys(image_root) == {held_key}            # a pull is working on it
    assert "in use by a pull" in run.err
    assert not layer_tmp.exists() and not machine_tmp.exists()
    assert held_tmp.exists()
    assert run.err.count("Removed leftover") == 2

    assert_ok(dkr(image_root, "gc"))
    assert layer_keys(image_root) == set() and not held_tmp.exists()
    with held_lock(image_root, "gc"):
        assert_clean_failure(dkr(image_root, "gc"), image_root, r"is busy: another dkr gc")


def test_gc_removes_abandoned_partial_downloads_but_not_live_ones(tmp_path):
    import fcntl
    from helpers import assert_ok, run_dkr
    root = tmp_path / "machines"
    partial = root / ".dkr" / "partial"
    partial.mkdir(parents=True)
    (partial / ("a" * 64)).write_bytes(b"x" * 1000)         # a crashed download
    live = partial / ("b" * 64)
    live.write_bytes(b"y" * 10)
    with open(live, "rb") as held:                          # a download in progress
        fcntl.flock(held, fcntl.LOCK_EX)
        dry = assert_ok(run_dkr("gc", "--dry-run", "--image-root", root))
        assert f"would remove partial download {'a' * 12}" in dry.out
        assert (partial / ("a" * 64)).exists()
        assert_ok(run_dkr("gc", "--image-root", root))
    assert not (partial / ("a" * 64)).exists()
    assert live.exists()


def test_gc_runs_beside_a_pull_and_takes_only_what_nobody_needs(registry, pushed, image_root):
    """gc does not wait for a pull to end, nor refuse: it removes a layer nobody needs,
    and leaves the layers a running pull has decided to reuse (no record names them
    yet) and the one it builds."""
    import random
    from reliability_helpers import DkrProcess, chain_ids
    slow_top = Layer([Dir("app"), File("app/slow", random.Random(24).randbytes(400_000))])
    images.push_image(registry, "manage/slowpoke", "latest", Image([*BASE, slow_top]))
    pull_dir(registry, "manage/first", image_root)
    assert_ok(dkr(image_root, "remove", "first"))
    unneeded = chain_ids(pushed["first"])[-1].split(":")[1]
    assert unneeded in layer_keys(image_root)

    with FaultProxy("127.0.0.1", registry.port) as proxy:
        proxy.add_fault(f"/blobs/{slow_top.digest}", "slow", times=None, rate=100_000)
        proc = DkrProcess("pull", "--insecure", "--image-root", image_root, "--backend", "dir",
                          "--json", f"{proxy.host}/manage/slowpoke", "slowpoke")
        try:
            proc.wait_event(lambda e: e["event"] == "skipped" and e["digest"] == BASE[1].digest)
            run = assert_ok(dkr(image_root, "gc"))
            assert proc.proc.poll() is None, "the pull was over before gc ran"
            rc, err = proc.finish()
        finally:
            proc.stop()
    assert rc == 0, err
    assert "Removed layer " + unneeded[:12] in run.err
    assert layer_keys(image_root) == set(machine_layers(image_root, "slowpoke"))
    assert (image_root / "slowpoke" / "etc" / "base").read_bytes() == b"base layer\n"
    assert len((image_root / "slowpoke" / "app" / "slow").read_bytes()) == 400_000
    assert_ok(dkr(image_root, "gc"))
    assert layer_keys(image_root) == set(machine_layers(image_root, "slowpoke"))
