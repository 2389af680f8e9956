"""The parent's side of the extractors: children of the fork server, waited on by pidfd."""

from __future__ import annotations

import asyncio

from helpers import backend_registered_by_hand

from dkr.testing import images
from dkr.unpack.extractors import ExtractorPool


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

    from dkr.unpack.forkserver import ForkServer

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


def _pid_of(pidfd: int) -> int:
    import re
    with open(f"/proc/self/fdinfo/{pidfd}") as f:
        return int(re.search(r"^Pid:\s+(\d+)", f.read(), re.M).group(1))


def _read_to_the_end(pid: int, path: str) -> bool:
    """Whether process ``pid`` has ``path`` open and has read all of it."""
    import os
    import re
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            if os.readlink(f"/proc/{pid}/fd/{fd}") == path:
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    pos = int(re.search(r"^pos:\s+(\d+)", f.read(), re.M).group(1))
                if pos == os.stat(path).st_size:
                    return True
    except OSError:                             # it exited, the fd went meanwhile, or not ours
        pass
    return False


def test_a_job_started_before_its_tree_reads_its_blob_then_fills_the_tree_it_is_given(tmp_path):
    """The extractor of a layer whose tree is still being made (a btrfs snapshot
    of its parent) inflates the spooled blob meanwhile, and extracts it once the
    second line names the tree."""
    import os

    from dkr.unpack.extractors import LayerUnpacker

    members = {f"dir/file{i}": os.urandom(5000) for i in range(50)}
    layer = images.Layer([images.File(name, data) for name, data in members.items()])
    blob = layer.blob
    spool = tmp_path / "blob"
    spool.write_bytes(blob)
    tree = tmp_path / "tree"

    async def main() -> dict:
        pool = ExtractorPool()
        unpacker = LayerUnpacker(None, "stacked", pool)
        try:
            await unpacker.start_ahead(spool, len(blob))
            pid = _pid_of(unpacker.proc.pidfd)
            for _ in range(2000):
                if _read_to_the_end(pid, str(spool)):
                    break
                await asyncio.sleep(0.01)
            assert _read_to_the_end(pid, str(spool)), "the blob was not read before the tree came"
            tree.mkdir()
            os.close(unpacker.into(tree, len(blob)))   # the whole blob is spooled: nothing to come
            return await asyncio.wait_for(unpacker.finish(), 60)
        finally:
            await unpacker.abort()
            await pool.close()

    report = asyncio.run(main())
    assert "error" not in report, report
    assert report["diff_id"] == layer.diff_id
    assert {str(p.relative_to(tree)): p.read_bytes() for p in tree.rglob("file*")} == members


def test_a_job_never_told_its_tree_ends_quietly(tmp_path):
    """A layer that fails before its tree exists closes the job's stdin: the child
    exits with no report, having written nothing."""
    import os

    from dkr.unpack.extractors import LayerUnpacker

    blob = images.Layer([images.File("a", b"x" * 100)]).blob
    spool = tmp_path / "blob"
    spool.write_bytes(blob)

    async def main() -> bytes:
        pool = ExtractorPool()
        unpacker = LayerUnpacker(None, "stacked", pool)
        try:
            await unpacker.start_ahead(spool, len(blob))
            unpacker.proc.close_stdin()
            async with asyncio.timeout(60):
                out = await unpacker.proc.report()
                await unpacker.proc.wait()
            return out
        finally:
            await unpacker.abort()
            await pool.close()

    assert asyncio.run(main()) == b""
    assert sorted(os.listdir(tmp_path)) == ["blob"]


def test_a_pull_inflates_each_layer_while_its_tree_is_made(registry, image_root):
    """The backend's create_layer (a snapshot, on btrfs) runs while the layer's
    extractor already reads the spooled blob: here it waits to see that happen."""
    import os

    from dkr import api
    from dkr_plugins.dir import DirBackend

    partial = image_root / ".dkr" / "partial"
    seen = []

    def spool_read_by_another_process() -> bool:
        spools = [str(p) for p in partial.iterdir()] if partial.is_dir() else []
        return any(_read_to_the_end(int(pid), path) for pid in os.listdir("/proc")
                   if pid.isdigit() and int(pid) != os.getpid() for path in spools)

    class Watching(DirBackend):
        name = "watching"

        def create_layer(self, image_root, key, path, parent):
            import time
            deadline = time.monotonic() + 30
            while not spool_read_by_another_process() and time.monotonic() < deadline:
                time.sleep(0.01)
            seen.append(spool_read_by_another_process())
            super().create_layer(image_root, key, path, parent)

    with backend_registered_by_hand(Watching(), "watching-test"):
        images.push_image(registry, "ahead/img", "latest", images.sample_image())
        api.pull(f"{registry.host}/ahead/img", "ahead", options=api.PullOptions(
            image_root=image_root, backend="watching", insecure=True))
    assert seen == [True] * len(images.sample_image().layers)
    assert (image_root / "ahead").is_dir()
