"""The parent's side of extraction: a pipe into the confined extractor child.

``ExtractorPool`` gets extractor children forked from one warm server
(``dkr.unpack.extract --fork-server``). ``LayerUnpacker`` runs one on a layer
tree. Its input is the blob: what of it is in a spool file, then the rest
through its stdin, which ``PipeSink`` feeds (a non-blocking pipe with a large
kernel buffer: when it is full the remainder waits in one small buffer and
the transfer pauses until the loop sees the pipe writable again). For a
staged layer, a second child replays the stage.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import signal
import socket
from pathlib import Path
from typing import Callable

from dkr.errors import DkrError
from dkr.plugins import modules_for_children
from dkr.tasks import failed, to_the_end
from dkr.treeops import write_all
from dkr.unpack.forkserver import ForkServer, adopt_early

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


class ExtractorChild:
    """One extractor process, forked for us by the fork server.

    Its stdin is a pipe we hold the (non-blocking) write end of: first the job
    as one JSON line (two for a job started before its tree), then the blob's
    bytes that the spool file does not hold. Its
    stdout is a pipe for the one-line report. It is not our child: a pidfd
    lets us wait for it and kill it.
    """

    def __init__(self, pidfd: int, control_fd: int, report_fd: int):
        self.pidfd = pidfd
        self.control_fd = control_fd
        self.report_fd = report_fd
        self.exited = False
        self._exit: asyncio.Future | None = None

    def send(self, job: dict) -> None:
        line = (json.dumps(job) + "\n").encode()
        # A pipe with room for many lines: this never waits.
        write_all(self.control_fd, memoryview(line))
        os.set_blocking(self.control_fd, False)

    def hand_over_stdin(self) -> int:
        """Its stdin, which the caller owns (and closes) from now on."""
        control_fd, self.control_fd = self.control_fd, -1
        return control_fd

    def close_stdin(self) -> None:
        if self.control_fd >= 0:
            os.close(self.control_fd)
            self.control_fd = -1

    async def report(self) -> bytes:
        """Everything it prints, once it closed its stdout (normally: exited)."""
        chunks = []
        os.set_blocking(self.report_fd, False)
        while True:
            try:
                data = os.read(self.report_fd, 65536)
            except BlockingIOError:
                await _readable(self.report_fd)
                continue
            if not data:
                return b"".join(chunks)
            chunks.append(data)

    async def verdict(self, what: str) -> dict:
        """Its one-line JSON report, once it has exited; ``what`` names it if it has none."""
        out = await self.report()
        await self.wait()
        try:
            return json.loads(out.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise DkrError(f"{what} died without a report") from None

    async def wait(self) -> None:
        if not self.exited:
            # One watch on the pidfd, however many wait: a waiter that is cancelled
            # (a verdict given up on) must not take the watch from the next (abort).
            if self._exit is None:
                self._exit = asyncio.ensure_future(_readable(self.pidfd))
            await asyncio.shield(self._exit)
            self.exited = True
        self.close()

    def kill(self) -> None:
        if not self.exited and self.pidfd >= 0:
            try:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        for name in ("control_fd", "report_fd", "pidfd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)


async def _readable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_reader(fd)


class ExtractorPool:
    """Extractor children forked from one warm server (``dkr.unpack.extract --fork-server``).

    Starting Python with the decompressors and plugins costs a fraction of a
    second of CPU; a pull that runs one or two extractors per layer would pay
    it every time. The server pays it once, ahead of need (the CLI starts it
    first thing, see ``dkr.forkserver``), and forks a child per job in
    milliseconds.
    """

    def __init__(self):
        self._server: ForkServer | None = None
        self._asking = asyncio.Lock()

    def warm(self) -> None:
        if self._server is None:
            self._server = adopt_early() or ForkServer({**os.environ, **modules_for_children()})

    async def take(self) -> ExtractorChild:
        self.warm()
        job_r, job_w = os.pipe2(os.O_CLOEXEC)
        report_r, report_w = os.pipe2(os.O_CLOEXEC)
        try:
            fcntl.fcntl(job_w, F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass                      # a smaller pipe only costs a few more wakeups
        exchange = None
        try:
            async with self._asking:  # answers come in the order of the requests
                exchange = asyncio.ensure_future(self._exchange(job_r, report_w))
                # A request sent is answered even if we are cancelled: else the next
                # take() would read this one's answer, and another child's pidfd.
                pidfd = await to_the_end(exchange)
        except BaseException as e:
            os.close(job_w)           # the child, if there is one, sees EOF and exits
            os.close(report_r)
            if exchange is None:
                os.close(job_r)
                os.close(report_w)
            elif not failed(exchange):
                os.close(exchange.result())
            if isinstance(e, OSError):    # it died (the next line says why, on stderr)
                raise DkrError(f"the extractor fork server is gone ({e.strerror or e})") from None
            raise
        return ExtractorChild(pidfd, job_w, report_r)

    async def _exchange(self, job_r: int, report_w: int) -> int:
        """One request to the server (it takes the child's ends of the pipes); the pidfd."""
        server = self._server.sock
        try:
            socket.send_fds(server, [b"x"], [job_r, report_w])
        finally:
            os.close(job_r)
            os.close(report_w)
        while True:
            try:
                answer, fds, _, _ = socket.recv_fds(server, 32, 1)
                break
            except BlockingIOError:
                await _readable(server.fileno())
        if not answer or not fds:
            raise DkrError("the extractor fork server is gone")
        return fds[0]

    async def start_job(self, job: dict) -> ExtractorChild:
        """A child on a job that needs no input beyond its JSON line."""
        child = await self.take()
        child.send(job)
        child.close_stdin()
        return child

    async def run_job(self, job: dict) -> dict:
        child = await self.start_job(job)
        try:
            return await child.verdict(f"a helper process for {job}")
        except BaseException:
            child.kill()
            await child.wait()
            raise

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.sock.close()           # EOF: the server exits
        pidfd = os.pidfd_open(server.pid)
        try:
            await _readable(pidfd)
        finally:
            os.close(pidfd)
        server.wait()


class LayerUnpacker:
    """One extractor child for one layer tree.

    With ``stage`` (a directory), the blob is only staged there (pass 1 of
    ``dkr.staging``); ``replay(root)`` applies it to the layer tree later,
    once that tree can exist.
    """

    def __init__(self, root: Path | None, layer_format: str, pool: ExtractorPool,
                 max_bytes: int | None = None, stage: Path | None = None):
        self.root = root
        self.layer_format = layer_format
        self.max_bytes = max_bytes
        self.pool = pool
        self.stage = stage
        self.proc: ExtractorChild | None = None
        self.sink: PipeSink | None = None

    async def _begin(self, **job) -> int:
        """Start a child on the job; returns its stdin, which the caller owns from then on."""
        extractor = await self.pool.take()
        self.proc = extractor
        if self.stage is not None:
            job["stage"] = str(self.stage)
        extractor.send({"root": str(self.root), "format": self.layer_format,
                        "max_bytes": self.max_bytes, **job})
        return extractor.hand_over_stdin()

    async def start(self) -> PipeSink:
        """Extract from a pipe: the returned Sink takes the blob's bytes."""
        self.sink = PipeSink(asyncio.get_running_loop(), await self._begin())
        return self.sink

    async def take(self) -> None:
        """Get the child now; ``stream`` tells it its job."""
        self.proc = await self.pool.take()

    def stream(self, spool: Path, size: int, prefix: int) -> int:
        """Extract (or stage) the blob of ``size`` bytes whose first ``prefix`` are in
        the spool file; returns the child's stdin, which takes the rest of the
        blob and which the caller owns from then on."""
        assert self.proc is not None
        job = {"root": str(self.root), "format": self.layer_format,
               "max_bytes": self.max_bytes, "spool": str(spool), "size": size,
               "prefix": prefix}
        if self.stage is not None:
            job["stage"] = str(self.stage)
        self.proc.send(job)
        return self.proc.hand_over_stdin()

    async def start_ahead(self, spool: Path, size: int) -> None:
        """Start inflating what is spooled before the tree exists; ``into`` names it later."""
        self.proc = await self.pool.take()
        self.proc.send({"format": self.layer_format, "max_bytes": self.max_bytes,
                        "spool": str(spool), "size": size})

    def into(self, root: Path, prefix: int) -> int:
        """The tree of a ``start_ahead`` job is there, and the spool file holds the
        blob's first ``prefix`` bytes; returns the child's stdin, as ``stream`` does."""
        assert self.proc is not None
        self.root = root
        try:
            self.proc.send({"root": str(root), "prefix": prefix})
        except BrokenPipeError:
            pass                      # it died: its verdict says why
        return self.proc.hand_over_stdin()

    async def replay(self, root: Path) -> dict:
        """Pass 2 of a staged layer: apply it to ``root``; returns the child's report."""
        assert self.stage is not None
        self.sink, self.root = None, root
        self.proc = await self.pool.start_job({"root": str(root), "format": self.layer_format,
                                               "replay": str(self.stage)})
        return await self.finish()

    async def finish(self) -> dict:
        """End of blob: close the pipe and collect the child's verdict."""
        assert self.proc is not None
        if self.sink is not None:
            try:
                await self.sink.flush()
            finally:
                self.sink.close()
        where = self.stage.name if self.root is None else self.root.name
        return await self.proc.verdict(f"extractor for {where}")

    async def abort(self) -> None:
        if self.sink is not None:
            self.sink.close()
        if self.proc is not None:
            self.proc.kill()
            await self.proc.wait()
