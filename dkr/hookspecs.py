"""The dkr plugin API: every hook a plugin may implement, in one place.

Plugins are ordinary pluggy plugins registered through the ``dkr``
entry-point group; dkr's own backends and whiteout resolver (the
``dkr_plugins`` package) are registered exactly that way. A plugin module
implements any of the hooks below with ``@hookimpl`` (from ``dkr.hookspecs``)::

    # setup.cfg of an outside plugin
    [options.entry_points]
    dkr =
        mybackend = mypackage.dkrplugin

Hooks are grouped by the phase of a pull in which dkr calls them; a storage
backend is an object that follows the ``StorageBackend`` protocol below.
Besides this module a plugin may use ``dkr.pluginkit`` (errors, tree
operations, mounts, libc), and nothing else of dkr. See docs/plugins.md for
worked examples.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Literal, Mapping, NamedTuple, Protocol, Sequence, runtime_checkable

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


MemberKind = Literal["file", "hardlink", "symlink", "char", "block", "dir", "fifo"]


class LayerMember(NamedTuple):
    """One member of a layer's tar, as a whiteout resolver sees it (all of it but its body).

    ``path`` is normalised: relative to the layer root, ``/``-separated, no
    ``.`` or ``..`` components; it and ``linkname`` are decoded with
    ``surrogateescape``. ``mode`` holds the permission bits (and set-id,
    sticky) only; ``kind`` says the type. ``xattrs`` are the member's pax
    ``SCHILY.xattr.*`` records, by name.
    """

    path: str
    kind: MemberKind
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    size: int = 0
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: Mapping[str, bytes] = MappingProxyType({})


@dataclass(frozen=True)
class Whiteout:
    """What a whiteout member means.

    ``kind == "delete"``: ``target`` (a path relative to the layer root) is
    removed from what lower layers provide. ``kind == "opaque"``: everything
    lower layers had below the directory ``target`` is hidden; what the same
    layer adds there stays.

    ``keep_member``: the member is an entry of the layer as well, and is
    written (without an ``OPAQUE_XATTR`` of its own: dkr marks an opaque
    directory itself, as the backend's ``layer_format`` wants). For a
    directory that a tar made from an overlayfs upper dir marks opaque by
    that xattr. Otherwise the whiteout member never appears in a machine.
    """

    kind: Literal["delete", "opaque"]
    target: str
    keep_member: bool = False


@runtime_checkable
class StorageBackend(Protocol):
    """A place to keep layers and machines, and the owner of what it makes there.

    Every member is told the image root and the layer's key or the machine's
    name (``LOCAL``) outright, never left to read them from a path. dkr picks
    the names (a layer at ``IMAGE_ROOT/.dkr-<key>``, a machine at
    ``IMAGE_ROOT/LOCAL``, each made under a temporary name of dkr's first),
    writes the records and holds the locks; the backend makes, seals, commits,
    mounts and removes its entries. dkr never renames or deletes an entry
    itself: a backend whose layers are not directories (an image file, a
    dataset, a volume) is free to make the final entry whatever it is.
    ``dkr.pluginkit.DirectoryEntries`` implements the commits of a backend
    whose entries are directory trees (atomic ``rename``/``RENAME_EXCHANGE``).
    """

    name: str
    layer_format: LayerFormat
    auto_priority: int
    """Order for ``--backend auto`` (higher is tried first; negative: never auto)."""

    def unusable_reason(self, image_root: Path) -> str | None:
        """Why this backend cannot serve ``image_root``, or None when it can."""

    # --- layers ----------------------------------------------------------------
    def create_layer(self, image_root: Path, key: str, path: Path, parent: Path | None) -> None:
        """Make the directory ``path`` (which does not exist) ready to receive layer ``key``.

        The extractor writes the layer's files into it. ``parent`` is the
        finished layer below (None for a base layer), as ``commit_layer`` left
        it, or still under its temporary name while it is being committed. A
        ``stacked`` backend makes ``path`` a writable copy or snapshot of it; a
        ``diff`` backend makes an empty directory.
        """

    def seal_layer(self, image_root: Path, key: str, path: Path) -> None:
        """The layer at ``path`` is complete and checked: make it read-only if the backend can.

        Runs in a helper process of dkr's (forked from its extractor server),
        which finds the backend by ``name``; other layers are built and
        downloads go on meanwhile, however long the file system takes.
        """

    def commit_layer(self, image_root: Path, key: str, path: Path, final: Path) -> None:
        """Make the sealed layer at ``path`` layer ``key``, found at ``final`` from now on.

        The layer counts as there once ``final`` exists, so it must appear
        whole in one step (a rename), and ``path`` be gone or be removable by
        ``remove_layer`` after. ``final`` is what later pulls pass as
        ``parent`` and as the machine's ``layers``. On failure, leave
        ``final`` absent: dkr then calls ``remove_layer(path)``.
        """

    def remove_layer(self, image_root: Path, key: str, path: Path) -> None:
        """Delete layer ``key``'s entry at ``path``, a temporary name (half made, or
        taken out of its final name by ``withdraw``). A missing ``path`` is no error."""

    # --- machines ----------------------------------------------------------------
    def create_machine(self, image_root: Path, local: str, path: Path,
                       layers: Sequence[Path]) -> None:
        """Make the writable machine ``local`` at the temporary ``path`` from ``layers``
        (base first). Mount nothing on it here: ``activate_machine`` does."""

    def activate_machine(self, image_root: Path, local: str, path: Path,
                         layers: Sequence[Path]) -> None:
        """Mount what machine ``local`` at ``path`` needs, if anything.

        ``path`` is the final name, or, when ``pull --force`` replaces a machine,
        still the temporary one (``exchange_machines`` then swaps it in, and
        what is mounted on it must go along). Also called by ``dkr mount``
        (e.g. after a reboot); must be idempotent. If it raises, dkr takes the
        new machine away again (``deactivate_machine``, then
        ``remove_machine``); the machine it was to replace is left as it was.
        """

    def deactivate_machine(self, image_root: Path, local: str, path: Path) -> None:
        """Undo ``activate_machine`` (before removal or replacement, and by ``dkr
        umount``); must be idempotent."""

    def commit_machine(self, image_root: Path, local: str, path: Path, final: Path) -> None:
        """Give the new machine at ``path`` its final name ``final``, where there is none,
        in one step. dkr has written its record already."""

    def exchange_machines(self, image_root: Path, local: str, path: Path, final: Path) -> None:
        """Swap the entries ``path`` and ``final`` in one step (``pull --force``, and its
        undo): whoever looks up ``final`` finds the one machine or the other, each
        with its mounts. dkr tells afterwards whether it happened by the
        identity (file handle) of the entry at ``final``, so a directory must
        keep its inode: a rename does."""

    def remove_machine(self, image_root: Path, local: str, path: Path) -> None:
        """Delete a machine's entry at ``path``, a temporary name (half made, replaced
        by ``exchange_machines`` or taken out of its final name by
        ``withdraw``), already deactivated. A missing ``path`` is no error."""

    # --- both ----------------------------------------------------------------------
    def withdraw(self, image_root: Path, final: Path, path: Path) -> None:
        """Take a finished layer or machine out of its name ``final`` to the temporary
        name ``path``, in one step, before dkr removes it (``dkr remove``, ``gc``,
        a machine that failed to come up): a removal that stops half-way must
        leave a leftover, never an entry that looks whole and is not."""


# ---------------------------------------------------------------------------
# Start-up: what plugins provide
# ---------------------------------------------------------------------------

@hookspec
def dkr_storage_backends() -> Sequence[StorageBackend]:
    """Return the storage backends this plugin provides.

    Names must be unique across all plugins; ``--backend NAME`` selects one.
    Called once per process.
    """



# ---------------------------------------------------------------------------
# Clean-up: whose is an entry that no record names
# ---------------------------------------------------------------------------

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
def dkr_whiteout_resolve(member: LayerMember) -> Whiteout | None:
    """Decide whether a layer's ``member`` is a whiteout, and what it does.

    Return a Whiteout for a marker: dkr applies it (on a ``stacked`` backend
    by deleting what lower layers had, on a ``diff`` one by writing
    overlayfs's markers) and the member itself never appears in a machine.
    Return None for an ordinary member, which the next resolver is asked
    about. The first answer wins; dkr's own OCI/aufs resolver (``.wh.NAME``,
    ``.wh..wh..opq``) is ``trylast``, so an installed resolver is asked
    first. Runs in the confined extractor process, once per member (so keep
    it cheap): dkr loads the plugins before the process ``chroot``s into the
    layer, so it must be a pure function of ``member``.
    """
