"""The plugin contract itself: the hooks that let a backend own what it makes."""

from __future__ import annotations

import types

from dkr import plugins
from dkr.hookspecs import hookimpl
from dkr_plugins.dir import DirBackend


def registered(name: str, **hooks):
    plugin = types.SimpleNamespace(**{k: hookimpl(v) for k, v in hooks.items()})
    plugins.manager().register(plugin, name)
    return plugin


def test_the_owner_hook_names_the_backend_of_an_entry(tmp_path):
    """An entry no record names is taken away by the backend that says it is its own,
    not by whatever --backend auto would pick."""
    class Marked(DirBackend):
        name = "marked"

    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / ".marked").touch()
    (tmp_path / "theirs").mkdir()
    registered("marked-test", dkr_storage_backends=lambda: [Marked()],
               dkr_tree_owner=lambda image_root, path:
               "marked" if (path / ".marked").exists() else None)
    try:
        assert plugins.backend_on_disk(tmp_path / "ours", tmp_path).name == "marked"
        assert plugins.backend_on_disk(tmp_path / "theirs", tmp_path).name == \
            plugins.choose_backend("auto", tmp_path)[0].name
    finally:
        plugins.manager().unregister(name="marked-test")
