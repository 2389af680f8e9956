"""The dkr plugin API: every hook a plugin may implement, in one place.

Plugins are ordinary pluggy plugins registered through the ``dkr``
entry-point group; dkr's own backends and whiteout resolver (the
``dkr_plugins`` package) are registered exactly that way. A plugin module
implements any of the hooks below with ``@hookimpl`` (from ``dkr.hookspecs``)::

    # setup.cfg of an outside plugin
    [options.entry_points]
    dkr =
        mybackend = mypackage.dkrplugin

Hooks are grouped by the phase of a pull in which dkr calls them.
See docs/plugins.md for a worked example.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, Sequence, runtime_checkable

import pluggy

hookspec = pluggy.HookspecMarker("dkr")
hookimpl = pluggy.HookimplMarker("dkr")


# ---------------------------------------------------------------------------
# Types the hooks exchange
# ---------------------------------------------------------------------------

LayerFormat = Literal["stacked", "diff"]
"""How a backend's layer trees relate to each other.

``stacked``: every layer tree holds all of its parents' files (a btrfs
snapshot or a copy of the parent); whiteouts are applied by deleting.
``diff``: every layer tree holds only what the layer itself adds; whiteouts
are kept as overlay-format markers (a 0/0 character device for a deleted
name, ``trusted.overlay.opaque=y`` on an opaque directory), so layers are
independent and may be extracted side by side.
"""

OPAQUE_XATTR = "trusted.overlay.opaque"
"""The xattr (value ``y``) that marks a directory opaque in a ``diff`` layer, as
overlayfs reads it: what lower layers had below it is hidden."""


@dataclass(frozen=True)
class Whiteout:
    """What a whiteout member means.

    ``kind == "delete"``: ``target`` (a path relative to the layer root) is
    removed from what lower layers provide. ``kind == "opaque"``: everything
    lower layers had below the directory ``target`` is hidden; what the same
    layer adds there stays.
    """

    kind: Literal["delete", "opaque"]
    target: str


@runtime_checkable
class StorageBackend(Protocol):
    """A place to keep layers and machines. All paths are inside the image root.

    dkr itself creates temporary names, renames finished layers into place
    (``IMAGE_ROOT/.dkr-<key>``), writes metadata and holds the locks; a backend
    only knows how to make, seal, copy and remove trees.
    """

    name: str
    layer_format: LayerFormat
    auto_priority: int
    """Order for ``--backend auto`` (higher is tried first; negative: never auto)."""

    def unusable_reason(self, image_root: Path) -> str | None:
        """Why this backend cannot serve ``image_root``, or None when it can."""

    def create_layer(self, path: Path, parent: Path | None) -> None:
        """Make ``path`` (which does not exist) ready to receive a layer.

        ``parent`` is the finished tree of the layer below (None for a base
        layer). A ``stacked`` backend makes ``path`` a writable copy or
        snapshot of it; a ``diff`` backend makes an empty directory.
        """

    def seal_layer(self, path: Path) -> None:
        """The layer at ``path`` is complete: make it read-only if the backend can.

        Runs in a helper process of dkr's (forked from its extractor server),
        which finds the backend by ``name``; other layers are built and
        downloads go on meanwhile, however long the file system takes.
        """

    def create_machine(self, path: Path, layers: Sequence[Path]) -> None:
        """Make the writable machine tree ``path`` from ``layers`` (base first).

        ``path`` is a temporary name; dkr renames it to ``IMAGE_ROOT/LOCAL``
        afterwards. Mount nothing on it here: ``activate_machine`` does.
        """

    def activate_machine(self, path: Path, layers: Sequence[Path]) -> None:
        """Mount what the machine at ``path`` needs, if anything.

        ``path`` is the final name, or, when ``pull --force`` replaces a machine,
        still the temporary one: dkr then swaps it in by one rename, and what is
        mounted on it goes along. Also called by ``dkr mount`` (e.g. after a
        reboot); must be idempotent. If it raises, dkr takes the new machine
        away again (``deactivate_machine``, then ``remove``); the machine it
        was to replace is left as it was.
        """

    def deactivate_machine(self, path: Path) -> None:
        """Undo ``activate_machine`` (before removal or replacement, and by ``dkr umount``)."""

    def remove(self, path: Path) -> None:
        """Remove a layer or machine tree made by this backend (it may be read-only).

        dkr calls it only once the machine is deactivated and nothing else is
        mounted in the tree: a removal may walk the whole tree.
        """


# ---------------------------------------------------------------------------
# Start-up: what plugins provide
# ---------------------------------------------------------------------------

@hookspec
def dkr_storage_backends() -> Sequence[StorageBackend]:
    """Return the storage backends this plugin provides.

    Names must be unique across all plugins; ``--backend NAME`` selects one.
    Called once per process.
    """


@hookspec(firstresult=True)
def dkr_tree_owner(image_root: Path, path: Path) -> str | None:
    """The ``name`` of the backend that made the layer or machine entry ``path``.

    dkr asks where no record says (a machine whose record cannot be read, a
    temporary entry a killed run left, a record that is gone), to know whose
    ``deactivate_machine`` and ``remove`` take it away. ``path`` is an entry
    directly in ``image_root`` and may be half made. Answer only for an entry
    your backend can tell is its own (a mount of yours on it, a mark it keeps
    on it, its file format), else None. The first answer wins; when nobody
    answers, the backend ``--backend auto`` picks for ``image_root`` removes it.
    """


# ---------------------------------------------------------------------------
# Extraction: called in the confined extractor process, once per member
# ---------------------------------------------------------------------------

@hookspec(firstresult=True)
def dkr_whiteout_classify(path: str) -> Whiteout | None:
    """Tell whether the layer member at ``path`` is a whiteout.

    ``path`` is normalised: relative to the layer root, ``/``-separated, no
    ``.`` or ``..`` components (decoded with ``surrogateescape``). Return a
    Whiteout for a marker, None for an ordinary member. The first plugin that
    returns a result wins. A whiteout member itself never appears in a
    machine.
    """
