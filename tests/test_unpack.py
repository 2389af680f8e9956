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


def test_a_take_cancelled_after_its_request_leaves_the_next_take_its_own_child():
    """The fork server answers requests in order; a take() cancelled after sending
    its request must still read its answer, or the next take() gets another child's
    pidfd and could neither wait for nor kill its own."""
    async def main() -> None:
        pool = ExtractorPool()
        try:
            first = asyncio.ensure_future(pool.take())
            for _ in range(3):                  # its request goes out; the server is still starting
                await asyncio.sleep(0)
            first.cancel()
            child = await asyncio.wait_for(pool.take(), 20)
            try:
                child.kill()                    # it waits for a job: only a kill ends it
                async with asyncio.timeout(20): # its stdout ends only when it is gone
                    assert await child.report() == b""
                    await child.wait()
            finally:
                child.close()                   # (whoever it is then sees EOF and exits)
        finally:
            await pool.close()
    asyncio.run(main())


def test_the_fork_server_keeps_only_its_socket_and_the_standard_streams():
    """Spawned without subprocess, it must still not inherit descriptors that our
    own parent left open to us (a pipe held open there keeps its reader waiting)."""
    import os
    import stat

    from dkr.forkserver import ForkServer

    read_end, write_end = os.pipe()
    os.set_inheritable(write_end, True)
    server = ForkServer()
    try:
        fds = {}
        for _ in range(200):                    # until the interpreter is up
            try:
                fds = {int(n): os.stat(f"/proc/{server.pid}/fd/{n}")
                       for n in os.listdir(f"/proc/{server.pid}/fd")}
            except FileNotFoundError:
                continue
            if len(fds) >= 3:
                break
        assert stat.S_ISSOCK(fds[0].st_mode)
        ours = os.fstat(write_end)
        assert not any((st.st_dev, st.st_ino) == (ours.st_dev, ours.st_ino) for st in fds.values())
    finally:
        server.sock.close()                     # EOF: it exits
        server.wait()
        os.close(read_end)
        os.close(write_end)


def test_forked_children_join_our_process_group_and_the_server_keeps_its_own():
    """A kill of dkr's process group must reach what a child started (a backend's
    helper program, say); the server itself keeps a group of its own, so that a
    Ctrl-C while it starts up is dkr's alone to handle."""
    import os
    import re

    async def main() -> None:
        pool = ExtractorPool()
        child = None
        try:
            child = await pool.take()
            with open(f"/proc/self/fdinfo/{child.pidfd}") as f:
                pid = int(re.search(r"^Pid:\s+(\d+)", f.read(), re.M).group(1))
            for _ in range(500):                # it joins right after the fork
                if os.getpgid(pid) == os.getpgrp():
                    break
                await asyncio.sleep(0.01)
            assert os.getpgid(pid) == os.getpgrp()
            assert os.getpgid(pool._server.pid) == pool._server.pid != os.getpgrp()
        finally:
            if child is not None:               # it waits for a job: only a kill ends it
                child.kill()
                await child.wait()
                child.close()
            await pool.close()
    asyncio.run(main())
