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


class LayerUnpacker:
    """One extractor child for one layer tree."""

    def __init__(self, root: Path, layer_format: str, max_bytes: int | None = None):
        self.root = root
        self.layer_format = layer_format
        self.max_bytes = max_bytes
        self.proc: asyncio.subprocess.Process | None = None
        self.sink: PipeSink | None = None

    def _args(self) -> list[str]:
        args = [sys.executable, "-m", "dkr.extract", "--root", str(self.root),
                "--format", self.layer_format]
        if self.max_bytes:
            args += ["--max-bytes", str(self.max_bytes)]
        return args

    async def start(self) -> PipeSink:
        """Extract from a pipe: the returned Sink takes the blob's bytes."""
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        try:
            fcntl.fcntl(write_fd, F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass                      # a smaller pipe only costs a few more wakeups
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self._args(), stdin=read_fd, stdout=asyncio.subprocess.PIPE)
        finally:
            os.close(read_fd)
        os.set_blocking(write_fd, False)
        self.sink = PipeSink(asyncio.get_running_loop(), write_fd)
        return self.sink

    async def start_following(self, spool: Path, size: int, wake_fd: int) -> None:
        """Extract from a spool file that is still growing (see dkr.spool)."""
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self._args(), "--spool", str(spool), "--size", str(size),
                "--wake-fd", str(wake_fd), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, pass_fds=(wake_fd,))
        finally:
            os.close(wake_fd)

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
