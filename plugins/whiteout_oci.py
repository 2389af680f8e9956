"""OCI / aufs whiteouts: ``.wh.NAME`` deletes NAME, ``.wh..wh..opq`` makes a directory opaque."""

from __future__ import annotations

from dkr.hookspecs import LayerMember, Whiteout, hookimpl

PREFIX = ".wh."
OPAQUE = ".wh..wh..opq"


@hookimpl(trylast=True)         # the image format's own rule: other conventions come first
def dkr_whiteout_resolve(member: LayerMember) -> Whiteout | None:
    parent, _, base = member.path.rpartition("/")
    if not base.startswith(PREFIX):
        return None
    if base == OPAQUE:
        return Whiteout("opaque", parent)
    name = base[len(PREFIX):]
    if name in ("", ".", "..") or name.startswith(PREFIX):
        # ".wh." alone, a whiteout of "..", or of another marker, names nothing
        # a lower layer can have; treat it as a marker for nothing at all.
        return Whiteout("delete", "")
    return Whiteout("delete", f"{parent}/{name}" if parent else name)
