"""Small asyncio helpers that the engine's modules share."""

from __future__ import annotations

import asyncio
from typing import Awaitable


async def to_the_end(work: Awaitable):
    """Await ``work`` to its end even if we are cancelled meanwhile; then pass that on.

    For clean-ups, and for exchanges that must not stop half-way. Returns
    what ``work`` returned when not cancelled.
    """
    task = asyncio.ensure_future(work)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled = True
    result = task.result()
    if cancelled:
        raise asyncio.CancelledError
    return result


def failed(future: asyncio.Future) -> bool:
    return future.done() and (future.cancelled() or future.exception() is not None)


def retrieved(future: asyncio.Future) -> None:
    """A done-callback for a future nobody may be waiting for: its error is
    reported elsewhere, so asyncio must not log it as never retrieved."""
    if not future.cancelled():
        future.exception()
