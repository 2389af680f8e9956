"""A storage backend from a separately installed package, found through the ``dkr`` entry points."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from helpers import (assert_clean_failure, assert_ok, backend_registered_by_hand, example_installed,
                     pull, run_dkr)

from dkr.testing import images
from dkr.testing.images import File, Image, Layer
from dkr.testing.oracle import diff_trees, tree_snapshot, umoci_unpack

PACKAGE = Path(__file__).parent / "outside_plugin"
DIST = "dkr-copy-backend"


@pytest.fixture(scope="module")
def copy_plugin():
    """The example plugin, pip-installed into this venv for the module's tests."""
    with example_installed(PACKAGE, DIST):
        yield "copy"


def test_pull_with_outside_backend(registry, copy_plugin, image_root, tmp_path):
    images.push_image(registry, "outside/sample", "latest", images.sample_image())
    run = assert_ok(pull(registry, "outside/sample", image_root, "--backend", copy_plugin,
                         "-v", "--json"))
    assert [e["name"] for e in run.events if e["event"] == "backend"] == ["copy"]
    record = json.loads((image_root / ".dkr" / "machines" / "sample.json").read_text())
    assert record["backend"] == "copy"
    for key in record["layers"]:
        layer = json.loads((image_root / ".dkr" / "layers" / f"{key}.json").read_text())
        assert layer["backend"] == "copy"
    oracle = tree_snapshot(umoci_unpack(registry, "outside/sample", "latest", tmp_path / "o"))
    assert diff_trees(oracle, tree_snapshot(image_root / "sample"), "umoci", "dkr") == []

    listed = json.loads(assert_ok(run_dkr("list", "--json", "--image-root", image_root)).out)
    assert [(m["local"], m["backend"]) for m in listed] == [("sample", "copy")]
    assert_ok(run_dkr("remove", "--image-root", image_root, "sample"))
    assert_ok(run_dkr("gc", "--image-root", image_root))
    assert [p.name for p in image_root.iterdir()] == [".dkr"]


def test_auto_never_picks_it(registry, copy_plugin, image_root):
    images.push_image(registry, "outside/auto", "latest",
                      images.Image([images.Layer([images.File("f", b"f")])]))
    run = pull(registry, "outside/auto", image_root, "--json")
    try:
        assert_ok(run)
        assert [e["name"] for e in run.events if e["event"] == "backend"] != ["copy"]
    finally:
        # auto may have chosen overlay: leave no mount behind in the temp dir
        run_dkr("remove", "--image-root", image_root, "auto")


def test_layers_of_another_backend_are_refused(registry, copy_plugin, image_root):
    images.push_image(registry, "outside/mixed", "latest",
                      images.Image([images.Layer([images.File("f", b"f")])]))
    assert_ok(pull(registry, "outside/mixed", image_root, "--backend", "copy", local="one"))
    failed = pull(registry, "outside/mixed", image_root, "--backend", "dir", local="two")
    assert_clean_failure(failed, image_root, r"made by backend copy.*--backend copy", "two")


def test_gone_plugin_is_a_clear_error(registry, image_root):
    # Runs after the module's plugin tests: a record naming a backend nobody provides.
    image_root.mkdir(parents=True)
    (image_root / ".dkr" / "machines").mkdir(parents=True)
    (image_root / ".dkr" / "machines" / "old.json").write_text(json.dumps(
        {"local": "old", "backend": "vanished", "layers": []}))
    (image_root / "old").mkdir()
    failed = run_dkr("remove", "--image-root", image_root, "old")
    assert_clean_failure(failed, image_root, r"made by backend 'vanished', which is not installed")
    assert (image_root / "old").is_dir()
    unknown = run_dkr("pull", "--image-root", image_root, "--backend", "vanished", "x/y")
    assert_clean_failure(unknown, image_root, r"unknown backend 'vanished' \(have: .*dir")


def test_entry_points_match_importlib_metadata(copy_plugin):
    """dkr's quick reader of entry_points.txt finds what importlib.metadata finds."""
    import importlib.metadata

    from dkr.plugins import entry_points
    expected = {(ep.name, ep.value) for ep in importlib.metadata.entry_points(group="dkr")}
    assert ("copy", "dkr_copy_backend") in expected
    assert set(entry_points("dkr")) == expected


def test_entry_points_file_format(tmp_path, monkeypatch):
    info = tmp_path / "some_dist-1.0.dist-info"
    info.mkdir()
    (info / "entry_points.txt").write_text(
        "[console_scripts]\nnot-ours = x:y\n\n"
        "[dkr]\n# a comment\nfancy = fancy_pkg.hooks:Plugin.instance [extra]\n"
        "plain=plain_pkg\n\n[other]\nalso-not = z\n")
    (tmp_path / "broken.egg-info").mkdir()           # no entry_points.txt: skipped
    (tmp_path / "entry_points.txt").write_text("[dkr]\nstray = nope\n")  # not in a dist
    monkeypatch.setattr(sys, "path", [str(tmp_path / "missing"), str(tmp_path)])

    from dkr.plugins import entry_points
    assert entry_points("dkr") == [("fancy", "fancy_pkg.hooks:Plugin.instance"),
                                   ("plain", "plain_pkg")]
    from dkr.plugins import _load
    assert _load("x", "os:path.join") is os.path.join and _load("x", "os.path") is os.path


def test_a_backend_registered_by_hand_works_in_process(registry, image_root):
    """A backend only this process knows (registered on dkr's plugin manager by a
    program using the API): the helper processes cannot find it, so its calls
    run here instead."""
    from dkr import api
    from dkr_plugins.dir import DirBackend

    calls = []

    class Recording(DirBackend):
        name = "handmade"

        def create_layer(self, image_root, key, path, parent):
            calls.append(("create_layer", os.getpid()))
            super().create_layer(image_root, key, path, parent)

        def seal_layer(self, image_root, key, path):
            calls.append(("seal_layer", os.getpid()))
            super().seal_layer(image_root, key, path)

        def create_machine(self, image_root, local, path, layers):
            calls.append(("create_machine", os.getpid()))
            super().create_machine(image_root, local, path, layers)

    with backend_registered_by_hand(Recording(), "handmade-test"):
        images.push_image(registry, "byhand/img", "latest", images.sample_image())
        api.pull(f"{registry.host}/byhand/img", "byhand", options=api.PullOptions(
            image_root=image_root, backend="handmade", insecure=True))
    layers = len(images.sample_image().layers)
    assert sorted(set(calls)) == [("create_layer", os.getpid()), ("create_machine", os.getpid()),
                                  ("seal_layer", os.getpid())]
    assert [c for c, _ in calls].count("seal_layer") == layers
    assert (image_root / "byhand").is_dir()


def test_a_replaced_machine_that_cannot_be_removed_does_not_fail_the_pull(registry, image_root,
                                                                          caplog):
    """The new machine is in place, active and recorded: that is the pull. The old
    tree stays under a temporary name, for gc, and the log says so."""
    from dkr import api
    from dkr_plugins.dir import DirBackend

    class Stubborn(DirBackend):
        name = "stubborn"

        def remove(self, path):
            raise OSError(16, "Device or resource busy", str(path))

    images.push_image(registry, "byhand/v", "1", Image([Layer([File("version", b"1")])]))
    images.push_image(registry, "byhand/v", "2", Image([Layer([File("version", b"2")])]))
    options = api.PullOptions(image_root=image_root, backend="stubborn", insecure=True)
    with backend_registered_by_hand(Stubborn(), "stubborn-test"):
        api.pull(f"{registry.host}/byhand/v:1", "box", options=options)
        options.backend, options.force = "dir", True
        api.pull(f"{registry.host}/byhand/v:2", "box", options=options)
    assert (image_root / "box" / "version").read_bytes() == b"2"
    record = json.loads((image_root / ".dkr" / "machines" / "box.json").read_text())
    assert (record["backend"], record["reference"]) == ("dir", f"{registry.host}/byhand/v:2")
    [left] = [p for p in image_root.iterdir() if p.name.startswith(".dkr-local-box.tmp-")]
    assert (left / "version").read_bytes() == b"1"
    assert "The machine that box replaced is left at" in caplog.text


def test_a_plugin_that_fails_to_load_gets_one_error_line(registry, image_root, tmp_path):
    """An installed plugin that raises on import: dkr says which, in one line, with
    no traceback from dkr or from its extractors' server (which loads it too)."""
    images.push_image(registry, "outside/broken", "latest", images.sample_image())
    site = tmp_path / "site"
    (site / "zz_broken-0.1.dist-info").mkdir(parents=True)
    (site / "zz_broken-0.1.dist-info" / "entry_points.txt").write_text(
        "[dkr]\nbroken = zz_broken_plugin\n")
    (site / "zz_broken_plugin.py").write_text("raise RuntimeError('this plugin is broken')\n")
    run = run_dkr("pull", "--insecure", "--image-root", image_root,
                  f"{registry.host}/outside/broken", env={**os.environ, "PYTHONPATH": str(site)})
    assert run.rc == 1
    assert run.err.splitlines() == ["dkr: error: plugin 'broken' (zz_broken_plugin) cannot be "
                                    "loaded: RuntimeError: this plugin is broken"], run.err
    assert [p.name for p in image_root.iterdir()] in ([], [".dkr"])


def test_backends_are_asked_for_once_per_process():
    """``dkr_storage_backends`` once, as documented; again only when plugins change."""
    import types

    from dkr import plugins
    from dkr.hookspecs import hookimpl
    asked = []
    counting = types.SimpleNamespace(
        dkr_storage_backends=hookimpl(lambda: asked.append(1) or []))
    plugins.manager().register(counting, "counting-test")
    try:
        for _ in range(5):
            assert "dir" in plugins.backends()
        assert len(asked) == 1
    finally:
        plugins.manager().unregister(name="counting-test")
    assert "dir" in plugins.backends() and len(asked) == 1


@pytest.mark.parametrize("backend", ["dir", "overlay"])
def test_an_outside_whiteout_resolver_is_asked_before_the_oci_one(registry, image_root, backend):
    """A resolver that sees the whole member: a 0/0 character device (overlayfs's own
    whiteout) deletes its name, while .wh. files still go to dkr's OCI resolver."""
    from dkr.testing.images import Device, Dir
    images.push_image(registry, "outside/chardev", "latest", Image([
        Layer([File("gone", b"1"), Dir("d"), File("d/x", b"2"), File("oci-gone", b"3"),
               File("kept", b"4"), Device("dev-kept", "c", 1, 3), Dir("o", mode=0o700),
               File("o/old", b"5")]),
        Layer([Device("gone", "c", 0, 0), Device("d", "c", 0, 0),
               images.Whiteout("oci-gone"),
               Dir("o", mode=0o750, xattrs={"trusted.overlay.opaque": b"y"}),
               File("o/new", b"6")]),
    ]))
    with example_installed(Path(__file__).parent / "outside_whiteouts", "dkr-chardev-whiteouts"):
        assert_ok(pull(registry, "outside/chardev", image_root, "--backend", backend))
        try:
            machine = image_root / "chardev"
            assert sorted(os.listdir(machine)) == ["dev-kept", "kept", "o"]
            assert os.listdir(machine / "o") == ["new"]
            assert os.stat(machine / "o").st_mode & 0o7777 == 0o750     # the member, applied
            assert "trusted.overlay.opaque" not in os.listxattr(machine / "o")
        finally:
            assert_ok(run_dkr("remove", "--image-root", image_root, "chardev"))
