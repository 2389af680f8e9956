"""The spool: which blob downloads when (need order, the link's room), and how a
blob moves from its spool file into its extractor's pipe."""

from __future__ import annotations

import asyncio
import os
import time

from dkr.pull.spool import AHEAD_WINDOW, SPOOL_WRITE, YIELD_AFTER, Spool


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 30))


async def settle():
    for _ in range(5):
        await asyncio.sleep(0)


def blobs(spool: Spool, count: int, size: int = 1000):
    return [spool.get(f"sha256:{n:064x}", size)[0] for n in range(count)]


async def turns(spool: Spool, entries) -> list[asyncio.Task]:
    tasks = [asyncio.ensure_future(spool.turn(blob)) for blob in entries]
    await settle()
    return tasks


def test_pieces_are_gathered_before_they_are_written(tmp_path):
    async def main():
        spool = Spool(tmp_path)
        blob, = blobs(spool, 1, 100 * 16384)
        pieces = [os.urandom(16384) for _ in range(100)]
        sizes = []
        for piece in pieces:
            assert blob.sink.write(piece)
            sizes.append(os.fstat(blob.fd).st_size)
        assert all(size % SPOOL_WRITE == 0 for size in sizes)
        blob.sink.flush()
        assert blob.path.read_bytes() == b"".join(pieces)
        assert blob.sink.spooled == blob.sink.taken == len(pieces) * 16384
        spool.release(blob, keep_partial=False)
        assert not blob.path.exists()
    run(main())


def test_blobs_nobody_waits_for_run_ahead_in_order_a_few_at_a_time(tmp_path):
    async def main():
        spool = Spool(tmp_path)
        entries = blobs(spool, 4)
        tasks = await turns(spool, entries)
        assert [task.done() for task in tasks] == [True] * AHEAD_WINDOW + \
            [False] * (4 - AHEAD_WINDOW)
        spool.finished(entries[0])
        await settle()
        assert tasks[AHEAD_WINDOW].done() and not tasks[-1].done()
        for task in tasks:
            task.cancel()
    run(main())


def test_a_needed_blob_starts_at_once_and_the_ones_ahead_yield_the_link_to_it(tmp_path):
    async def main():
        spool = Spool(tmp_path)
        entries = blobs(spool, 4)
        tasks = await turns(spool, entries)
        ahead = entries[0]
        spool.need(entries[3])                 # its extractor is ready: past the window
        await settle()
        assert tasks[3].done() and not tasks[2].done()
        # The ones ahead go on for a moment, then pause until the link has room again.
        assert spool.may_run(ahead)
        time.sleep(YIELD_AFTER * 1.5)
        assert not spool.may_run(ahead) and spool.may_run(entries[3])
        resumed = []
        spool.when_may_run(ahead, lambda: resumed.append(ahead))
        await settle()
        assert resumed == []
        # The needed one's extractor is the limit now (its pipe is full): room again.
        spool.held_back(entries[3], True)
        await settle()
        assert resumed == [ahead] and spool.may_run(ahead)
        for task in tasks:
            task.cancel()
    run(main())


def test_blobs_ahead_start_only_while_no_needed_one_wants_the_link(tmp_path):
    async def main():
        spool = Spool(tmp_path)
        first, *rest = blobs(spool, AHEAD_WINDOW + 2)
        spool.need(first)
        first_turn, = await turns(spool, [first])
        waiting = await turns(spool, rest)
        first.task = first_turn                # (a download that is running)
        assert first_turn.done() and not any(task.done() for task in waiting)
        spool.finished(first)                  # its download is over: the link is free
        await settle()
        started = min(AHEAD_WINDOW, len(waiting))     # (in need order)
        assert [task.done() for task in waiting] == [True] * started + \
            [False] * (len(waiting) - started)
    run(main())


def test_the_limit_bounds_what_is_spooled_ahead_but_never_a_needed_blob(tmp_path):
    async def main():
        spool = Spool(tmp_path, limit=1500)
        entries = blobs(spool, 3)
        tasks = await turns(spool, entries)
        assert [task.done() for task in tasks] == [True, False, False]
        spool.need(entries[2])
        await settle()
        assert tasks[2].done() and not tasks[1].done()
        spool.release(entries[0], keep_partial=False)
        spool.finished(entries[2])             # (until then it wants the link)
        await settle()
        assert tasks[1].done()
    run(main())


def test_a_blob_hands_its_extractor_what_is_spooled_and_streams_the_rest(tmp_path):
    async def main():
        spool = Spool(tmp_path)
        blob, = blobs(spool, 1, 3 * SPOOL_WRITE)
        head, tail = os.urandom(SPOOL_WRITE + 5), os.urandom(2 * SPOOL_WRITE - 5)
        blob.resume_point()
        assert blob.sink.write(head)
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        prefixes = []
        await blob.hand_over(lambda prefix: prefixes.append(prefix) or write_end)
        assert prefixes == [len(head)] and blob.streaming
        assert spool.get(blob.digest, blob.size)[0] is not blob     # a pipe feeds one
        blob.sink.write(tail)
        assert blob.sink.taken == len(head) + len(tail)
        ending = asyncio.ensure_future(blob.sink.end())
        got = bytearray()
        while True:
            await asyncio.sleep(0.001)
            try:
                data = os.read(read_end, 1 << 20)
            except BlockingIOError:
                continue
            if not data:
                break
            got += data
        await ending
        assert blob.path.read_bytes() == head and bytes(got) == tail
        os.close(read_end)
    run(main())


def test_a_shared_blob_is_read_whole_from_the_file_by_each_user(tmp_path):
    async def main():
        spool = Spool(tmp_path)
        blob, _ = spool.get("sha256:" + "ab" * 32, 10)
        assert spool.get(blob.digest, blob.size) == (blob, False)
        prefixes = []

        def start(prefix):
            prefixes.append(prefix)
            return os.open(os.devnull, os.O_WRONLY)
        handing = asyncio.ensure_future(blob.hand_over(start))
        await settle()
        assert prefixes == []                  # not before the download is complete
        blob.done.set_result(None)
        await handing
        assert prefixes == [10] and not blob.streaming
    run(main())


def test_spool_all_reads_every_blob_whole(tmp_path):
    async def main():
        spool = Spool(tmp_path, stream=False)
        blob, = blobs(spool, 1, 10)
        handing = asyncio.ensure_future(blob.hand_over(lambda prefix: os.open(os.devnull,
                                                                              os.O_WRONLY)))
        await settle()
        assert not handing.done()
        blob.done.set_result(None)
        await handing
        assert not blob.streaming
    run(main())
