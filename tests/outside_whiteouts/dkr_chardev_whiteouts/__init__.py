"""Whiteouts as overlayfs stores them: a 0/0 character device deletes its name, and a
directory with ``trusted.overlay.opaque=y`` hides what lower layers had in it.

Tars made from an overlay upper directory (``tar --xattrs -C upper``, some
build tools) carry deletions so instead of OCI's ``.wh.`` files. dkr's own
resolver is ``trylast``, so this one is asked first and says nothing about
any other member.
"""

from __future__ import annotations

from dkr.hookspecs import OPAQUE_XATTR, LayerMember, Whiteout, hookimpl


@hookimpl
def dkr_whiteout_resolve(member: LayerMember) -> Whiteout | None:
    if member.kind == "char" and member.devmajor == 0 and member.devminor == 0:
        return Whiteout("delete", member.path)
    if member.kind == "dir" and member.xattrs.get(OPAQUE_XATTR) == b"y":
        return Whiteout("opaque", member.path, keep_member=True)     # the directory stays
    return None
