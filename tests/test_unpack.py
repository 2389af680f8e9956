"""The parent's side of the extractors: children of the fork server, waited on by pidfd."""

from __future__ import annotations

import asyncio

from dkr.unpack import ExtractorPool


def test_a_cancelled_wait_leaves_the_next_one_its_watch():
    """Giving up on a child's verdict (cancelling its wait) and then killing and
    waiting for it, as an abort does, must end: both waits watch the same pidfd."""
    async def main() -> None:
        pool = ExtractorPool()
        try:
            child = await pool.take()           # it waits for a job line that never comes
            first = asyncio.ensure_future(child.wait())
            await asyncio.sleep(0.2)
            first.cancel()                      # its clean-up runs on the loop's next turn
            child.kill()
            async with asyncio.timeout(20):     # (in this task: wait_for would start another)
                await child.wait()
            assert child.exited
        finally:
            await pool.close()
    asyncio.run(main())
