"""The parent's side of extraction: a pipe into the confined extractor child.

``LayerUnpacker`` starts ``python -m dkr.extract`` on a layer tree and offers
a ``Sink`` for the blob's bytes: a non-blocking pipe with a large kernel
buffer. When the pipe is full the remainder waits in one small buffer and the
transfer pauses until the loop sees the pipe writable again.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import sys
from pathlib import Path
from typing import Callable

from .errors import DkrError
from .plugins import modules_for_children

F_SETPIPE_SZ = 1031
PIPE_SIZE = 1024 * 1024


class PipeSink:
    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int):
        self.loop = loop
        self.fd = fd
        self.pending = b""
        self._drained: Callable[[], None] | None = None
        self._watching = False

    def write(self, data: bytes) -> bool:
        if self.pending:
            self.pending += data
            return False
        try:
            written = os.write(self.fd, data)
        except BlockingIOError:
            written = 0
        if written < len(data):
            self.pending = bytes(memoryview(data)[written:])
            return False
        return True

    def on_drain(self, callback: Callable[[], None]) -> None:
        self._drained = callback
        if not self._watching:
            self._watching = True
            self.loop.add_writer(self.fd, self._flush)

    def _flush(self) -> None:
        try:
            written = os.write(self.fd, self.pending)
        except BlockingIOError:
            return
        except OSError:
            written = len(self.pending)     # the reader is gone; the child reports why
        self.pending = self.pending[written:]
        if self.pending:
            return
        self.loop.remove_writer(self.fd)
        self._watching = False
        callback, self._drained = self._drained, None
        if callback:
            callback()

    async def flush(self) -> None:
        while self.pending:
            done = self.loop.create_future()
            self.on_drain(lambda: done.done() or done.set_result(None))
            await done

    def close(self) -> None:
        if self._watching:
            self.loop.remove_writer(self.fd)
            self._watching = False
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class WarmExtractor:
    """An extractor child that has started and loaded everything, waiting for a job.

    Its stdin is a pipe we hold the (non-blocking) write end of: first the job
    as one JSON line, then either the blob's bytes or, for a spool file,
    wake-ups whenever the file grew.
    """

    def __init__(self, proc: asyncio.subprocess.Process, control_fd: int):
        self.proc = proc
        self.control_fd = control_fd

    @classmethod
    async def spawn(cls) -> "WarmExtractor":
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        try:
            fcntl.fcntl(write_fd, F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass                      # a smaller pipe only costs a few more wakeups
        try:
            # A process group of its own: a terminal's Ctrl-C goes to dkr, which
            # stops its children itself, never to a child still starting up.
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "dkr.extract", "--serve", "--parent", str(os.getpid()),
                stdin=read_fd, env={**os.environ, **modules_for_children()},
                stdout=asyncio.subprocess.PIPE, process_group=0)
        except BaseException:
            os.close(write_fd)
            raise
        finally:
            os.close(read_fd)
        return cls(proc, write_fd)

    def send(self, job: dict) -> None:
        line = (json.dumps(job) + "\n").encode()
        view = memoryview(line)
        while view:                   # an empty pipe: this never waits
            view = view[os.write(self.control_fd, view):]
        os.set_blocking(self.control_fd, False)

    async def dismiss(self) -> None:
        """Not needed after all: EOF before a job makes the child exit quietly."""
        if self.control_fd >= 0:
            os.close(self.control_fd)
            self.control_fd = -1
        await self.proc.wait()


class ExtractorPool:
    """Extractor children started ahead of need, so no layer waits for Python to start.

    A child costs a fraction of a second to start (interpreter, decompressors,
    plugins); a chain of btrfs layers would pay that once per layer, in series,
    without a warm one ready.
    """

    def __init__(self, size: int):
        self.size = size
        self._ready: list[asyncio.Task] = []

    def warm(self, count: int) -> None:
        while len(self._ready) < min(count, self.size):
            self._ready.append(asyncio.ensure_future(WarmExtractor.spawn()))

    async def take(self) -> WarmExtractor:
        task = self._ready.pop(0) if self._ready else asyncio.ensure_future(WarmExtractor.spawn())
        self.warm(1)                   # the next layer's child starts now
        return await task

    async def close(self) -> None:
        ready, self._ready = self._ready, []
        for task in ready:
            try:
                extractor = await task
            except (OSError, asyncio.CancelledError):
                continue
            await extractor.dismiss()


class LayerUnpacker:
    """One extractor child for one layer tree."""

    def __init__(self, root: Path, layer_format: str, max_bytes: int | None = None,
                 pool: ExtractorPool | None = None):
        self.root = root
        self.layer_format = layer_format
        self.max_bytes = max_bytes
        self.pool = pool
        self.proc: asyncio.subprocess.Process | None = None
        self.sink: PipeSink | None = None

    async def _begin(self, **job) -> WarmExtractor:
        extractor = await (self.pool.take() if self.pool else WarmExtractor.spawn())
        self.proc = extractor.proc
        extractor.send({"root": str(self.root), "format": self.layer_format,
                        "max_bytes": self.max_bytes, **job})
        return extractor

    async def start(self) -> PipeSink:
        """Extract from a pipe: the returned Sink takes the blob's bytes."""
        extractor = await self._begin()
        self.sink = PipeSink(asyncio.get_running_loop(), extractor.control_fd)
        return self.sink

    async def start_following(self, spool: Path, size: int) -> int:
        """Extract from a spool file that is still growing (see dkr.spool).

        Returns the fd to write a byte to whenever the file grew, and to close
        when no more will come; the caller owns it from then on.
        """
        extractor = await self._begin(spool=str(spool), size=size)
        return extractor.control_fd

    async def finish(self) -> dict:
        """End of blob: close the pipe and collect the child's verdict."""
        assert self.proc is not None
        if self.sink is not None:
            try:
                await self.sink.flush()
            finally:
                self.sink.close()
        out = await self.proc.stdout.read()
        await self.proc.wait()
        try:
            result = json.loads(out.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise DkrError(f"extractor for {self.root.name} died "
                           f"(exit status {self.proc.returncode})") from None
        return result

    async def abort(self) -> None:
        if self.sink is not None:
            self.sink.close()
        if self.proc is not None and self.proc.returncode is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
            await self.proc.wait()
