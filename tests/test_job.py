"""A transfer's states, over real HTTP through libcurl on loopback.

A sink that is full pauses the job (PAUSED: libcurl holds the data, and the
wait is no stall); draining it lets the body flow again (RUNNING); a refused
body (over the size announced) aborts (ABORTING, then FAILED); a whole body
ends DONE.
"""

from __future__ import annotations

import asyncio
import http.server
import threading

import pytest

from dkr.transport.glue import CurlGlue
from dkr.transport.job import Job, JobState, TransferError, TransferOptions

BODY = bytes(range(256)) * 4096          # 1 MiB


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/blob"
    httpd.shutdown()
    httpd.server_close()


class HeldSink:
    """Takes the first chunk, then says it is full until ``release()``."""

    def __init__(self):
        self.data = bytearray()
        self.full = False
        self._drained = None

    def write(self, data: bytes) -> bool:
        self.data += data
        if self.full or len(self.data) > 64 * 1024:
            self.full = True
            return False
        return True

    def on_drain(self, callback) -> None:
        self._drained = callback

    def release(self) -> None:
        self.full = False
        callback, self._drained = self._drained, None
        callback()


def test_a_full_sink_pauses_the_job_and_the_wait_is_no_stall(server):
    async def main():
        glue = CurlGlue()
        sink = HeldSink()
        # A stall timeout of 1 s: the pause below lasts longer, and must not count.
        job = Job(glue, server, sink=sink, expected_size=len(BODY),
                  options=TransferOptions(low_speed_time=1))
        assert job.state is JobState.INIT
        running = asyncio.ensure_future(job.run())
        while not sink.full:
            await asyncio.sleep(0.01)
        assert job.state is JobState.PAUSED
        await asyncio.sleep(2.5)
        assert job.state is JobState.PAUSED and not running.done()
        while job.state is not JobState.DONE:
            if sink.full:
                sink.release()
            await asyncio.sleep(0.01)
        response = await running
        glue.close()
        return response

    response = asyncio.run(main())
    assert response.status == 200 and response.received == len(BODY)


def test_a_body_over_its_size_aborts(server):
    async def main():
        glue = CurlGlue()
        sink = HeldSink()
        sink.write = lambda data: True
        job = Job(glue, server, sink=sink, expected_size=len(BODY) - 1)
        with pytest.raises(TransferError, match="announced"):
            await job.run()
        glue.close()
        return job

    assert asyncio.run(main()).state is JobState.FAILED


def test_a_whole_small_body_is_done(server):
    async def main():
        glue = CurlGlue()
        job = Job(glue, server, max_payload=2 * len(BODY))
        response = await job.run()
        glue.close()
        return job, response

    job, response = asyncio.run(main())
    assert job.state is JobState.DONE and response.body == BODY
