"""The --force swap's state machine, one transition at a time, on real directories
(and real mounts where the kernel's rules for mount points are the subject)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from dkr.store import swap
from dkr.errors import DkrError
from dkr.store.layout import ImageRoot
from dkr_plugins.dir import DirBackend


class Backend(DirBackend):
    """The dir backend, saying what it was asked to do."""

    def __init__(self):
        self.calls = []

    def activate_machine(self, image_root, local, path, layers):
        self.calls.append(("activate", path.name))

    def deactivate_machine(self, image_root, local, path):
        self.calls.append(("deactivate", path.name))


@pytest.fixture
def root(tmp_path, monkeypatch):
    backend = Backend()
    monkeypatch.setattr(swap, "backends", lambda: {"dir": backend})
    image_root = ImageRoot(tmp_path / "machines")
    image_root.prepare()
    image_root.backend = backend
    return image_root


OLD = {"local": "m", "backend": "dir", "reference": "r/old", "layers": ["aa"]}
NEW = {"local": "m", "backend": "dir", "reference": "r/new", "layers": ["bb"]}


def tree(path, version):
    path.mkdir()
    (path / "version").write_text(version)
    return path


def version(path):
    return (path / "version").read_text()


def record(root):
    return json.loads((root.meta / "machines" / "m.json").read_text())


@pytest.fixture
def machine(root):
    """Machine m (the old one) in place, and a new tree under its temp name."""
    tree(root.machine_path("m"), "old")
    root.write_json("machines/m.json", OLD)
    return root.machine_tmp("m")


def prepared(root, tmp) -> swap.MachineSwap:
    tree(tmp, "new")
    transaction = swap.MachineSwap(root, "m")
    transaction.prepare(tmp, [], root.backend, NEW)
    return transaction


# --- transitions -------------------------------------------------------------------------

def test_prepare_journals_the_new_tree_and_brings_it_up(root, machine):
    transaction = prepared(root, machine)
    journal = record(root).pop("swap")
    assert journal == {"state": "ready", "tree": machine.name, "record": NEW,
                       "new_id": swap.tree_id(machine)}
    assert record(root)["reference"] == "r/old"             # LOCAL still holds the old one
    assert record(root)["swap_layers"] == ["bb"]             # gc keeps both trees' layers
    assert root.backend.calls == [("activate", machine.name)]
    assert version(root.machine_path("m")) == "old" and transaction.state == "ready"


def test_a_record_an_older_dkr_left_mid_swap_keeps_its_other_layers_counted(root, machine):
    root.write_json("machines/m.json", {**OLD, "swap_pending": True, "swap_layers": ["cc"]})
    transaction = prepared(root, machine)
    assert record(root)["swap_layers"] == ["bb", "cc"]
    transaction.exchange()
    assert record(root)["swap_layers"] == ["aa", "cc"]
    transaction.finish()
    assert record(root) == NEW


def test_exchange_puts_the_new_tree_in_place_and_says_so(root, machine):
    transaction = prepared(root, machine)
    transaction.exchange()
    assert version(root.machine_path("m")) == "new" and version(machine) == "old"
    journal = record(root).pop("swap")
    assert journal["state"] == "exchanged" and journal["record"]["reference"] == "r/old"
    assert record(root)["reference"] == "r/new" and record(root)["swap_layers"] == ["aa"]


def test_finish_removes_the_old_tree_and_ends_the_journal(root, machine):
    transaction = prepared(root, machine)
    transaction.exchange()
    assert transaction.finish() is True
    assert not os.path.lexists(machine)
    assert ("deactivate", machine.name) in root.backend.calls
    assert record(root) == NEW and transaction.state is None


def test_finish_that_cannot_remove_the_old_tree_keeps_the_journal(root, machine, monkeypatch):
    transaction = prepared(root, machine)
    transaction.exchange()

    def busy(image_root, local, path):
        raise DkrError(f"machine {path.name} is busy")
    monkeypatch.setattr(root.backend, "deactivate_machine", busy)
    assert transaction.finish() is False
    assert version(machine) == "old" and record(root)["swap"]["state"] == "exchanged"
    monkeypatch.undo()
    assert swap.recover(root, "m") is True                     # later, it is not busy
    assert not os.path.lexists(machine) and record(root) == NEW


def test_roll_back_leaves_the_old_machine_and_its_record_as_they_were(root, machine):
    before = (root.meta / "machines" / "m.json").read_bytes()
    transaction = prepared(root, machine)
    transaction.roll_back()
    assert not os.path.lexists(machine) and version(root.machine_path("m")) == "old"
    assert (root.meta / "machines" / "m.json").read_bytes() == before


def test_run_undoes_an_exchange_whose_journal_cannot_be_written(root, machine, monkeypatch):
    tree(machine, "new")
    write = swap.MachineSwap._write

    def full(self):
        if self.state == swap.EXCHANGED:
            raise OSError(28, "No space left on device")
        write(self)
    monkeypatch.setattr(swap.MachineSwap, "_write", full)
    with pytest.raises(OSError, match="No space"):
        swap.MachineSwap(root, "m").run(machine, [], root.backend, NEW)
    assert version(root.machine_path("m")) == "old" and not os.path.lexists(machine)
    assert record(root) == OLD


# --- recovery from what a kill leaves ------------------------------------------------------

def test_recover_from_ready_before_the_exchange_rolls_back(root, machine):
    prepared(root, machine)
    assert swap.recover(root, "m") is True
    assert version(root.machine_path("m")) == "old" and not os.path.lexists(machine)
    assert record(root) == OLD


def test_recover_from_ready_after_the_exchange_rolls_forward(root, machine):
    prepared(root, machine)
    swap.exchange_paths(machine, root.machine_path("m"))       # killed before the journal
    assert swap.recover(root, "m") is True
    assert version(root.machine_path("m")) == "new" and not os.path.lexists(machine)
    assert record(root) == NEW


def test_recover_from_exchanged_finishes(root, machine):
    prepared(root, machine).exchange()
    assert swap.recover(root, "m") is True
    assert version(root.machine_path("m")) == "new" and not os.path.lexists(machine)
    assert record(root) == NEW


def test_recover_ignores_a_journal_that_names_no_temp_tree_of_the_machine(root, machine):
    tree(root.path / "elsewhere", "keep")
    bogus = {**OLD, "swap": {"state": "exchanged", "tree": "elsewhere", "record": NEW}}
    root.write_json("machines/m.json", bogus)
    assert swap.recover(root, "m") is True
    assert version(root.path / "elsewhere") == "keep" and record(root) == bogus


# --- the system steps ----------------------------------------------------------------------

def test_tree_id_follows_the_directory_and_looks_under_a_mount(tmp_path):
    a, b = tree(tmp_path / "a", "a"), tree(tmp_path / "b", "b")
    ida = swap.tree_id(a)
    assert ida and ida != swap.tree_id(b) and swap.tree_id(tmp_path / "none") is None
    os.rename(a, tmp_path / "c")
    assert swap.tree_id(tmp_path / "c") == ida
    subprocess.run(["mount", "-t", "tmpfs", "cover", str(tmp_path / "c")], check=True)
    try:
        assert swap.tree_id(tmp_path / "c") == ida
    finally:
        subprocess.run(["umount", str(tmp_path / "c")], check=True)


def test_exchange_paths_swaps_mount_points_with_their_mounts(tmp_path):
    a, b = tree(tmp_path / "a", "a"), tree(tmp_path / "b", "b")
    for path in (a, b):
        subprocess.run(["mount", "-t", "tmpfs", path.name, str(path)], check=True)
        (path / "mounted").write_text(path.name)
    try:
        swap.exchange_paths(a, b)
        assert (a / "mounted").read_text() == "b" and (b / "mounted").read_text() == "a"
    finally:
        for path in (a, b):
            subprocess.run(["umount", str(path)], check=True)
    assert version(a) == "b" and version(b) == "a"       # the directories went too
