"""The Docker Registry v1 protocol, as systemd's import-dkr.c pulled it."""

from __future__ import annotations

from .errors import DkrError


async def pull_v1(puller, name: str, local: str | None, index_url: str):
    raise DkrError("v1 pulls are not available yet")
