"""Whiteouts as overlayfs stores them: a 0/0 character device deletes its name.

Tars made from an overlay upper directory (``tar -C upper``, some build
tools) carry deletions so instead of OCI's ``.wh.NAME`` files. dkr's own
resolver is ``trylast``, so this one is asked first and says nothing about
any other member.
"""

from __future__ import annotations

from dkr.hookspecs import LayerMember, Whiteout, hookimpl


@hookimpl
def dkr_whiteout_resolve(member: LayerMember) -> Whiteout | None:
    if member.kind == "char" and member.devmajor == 0 and member.devminor == 0:
        return Whiteout("delete", member.path)
    return None
