"""The Python API: ``dkr.api.pull()`` and its coroutine twin ``pull_async()``.

The CLI is a thin layer over these; other programs may call them directly,
from plain code or from a running asyncio loop.
"""

from __future__ import annotations

import asyncio
import signal

from .errors import DkrError, Interrupted
from .events import Events
from .pull import PullOptions, PullResult, Puller
from .reference import default_machine_name, parse_reference

__all__ = ["PullOptions", "PullResult", "pull", "pull_async", "pull_v1", "pull_v1_async"]


async def pull_async(reference: str, local: str | None = None, *,
                     options: PullOptions | None = None,
                     events: Events | None = None) -> PullResult:
    ref = parse_reference(reference)
    local = local or default_machine_name(ref.name)
    async with Puller(options or PullOptions(), events) as puller:
        return await puller.pull(ref, local)


def pull(reference: str, local: str | None = None, *, options: PullOptions | None = None,
         events: Events | None = None) -> PullResult:
    """Pull one image; raises DkrError (or Interrupted on SIGINT/SIGTERM)."""
    return _run(pull_async(reference, local, options=options, events=events))


async def pull_v1_async(name: str, local: str | None = None, *, index_url: str,
                        options: PullOptions | None = None,
                        events: Events | None = None) -> PullResult:
    """Pull ``NAMESPACE/REPO[:TAG]`` over the Docker Registry v1 protocol."""
    from .v1 import pull_v1 as _pull_v1
    async with Puller(options or PullOptions(), events) as puller:
        return await _pull_v1(puller, name, local, index_url)


def pull_v1(name: str, local: str | None = None, *, index_url: str,
            options: PullOptions | None = None, events: Events | None = None) -> PullResult:
    return _run(pull_v1_async(name, local, index_url=index_url, options=options, events=events))


def _run(coro):
    """Run ``coro``; SIGINT and SIGTERM cancel it so every cleanup path runs."""
    async def main():
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        received: list[int] = []

        def stop(signum: int) -> None:
            received.append(signum)
            task.cancel()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop, signum)
        try:
            return await coro
        except asyncio.CancelledError:
            if received:
                raise Interrupted(received[0]) from None
            raise
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)

    try:
        return asyncio.run(main())
    except DkrError:
        raise
