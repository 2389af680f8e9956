"""A layer that can be built streams from the transfer into its extractor's pipe.

Here the extractor is made slow (stopped with SIGSTOP, as a busy disk would
hold it) while a blob several times the pipe's buffer arrives: the pipe fills,
the transfer pauses and resumes, and nothing of the blob is written to the
spool. A blob that must wait meanwhile goes to the spool, and a pull killed
then resumes it with ``Range``.
"""

from __future__ import annotations

import os
import random
import signal
import time

import pytest
from helpers import assert_ok, pull
from reliability_helpers import DkrProcess, extractor_pids, sent, spool_size

from dkr.testing import images
from dkr.testing.faultproxy import FaultProxy
from dkr.testing.images import Dir, File, Image, Layer
from dkr.unpack.extractors import PIPE_SIZE

BIG_BYTES = 6 * PIPE_SIZE
BIG = Layer([Dir("big"), File("big/blob", random.Random(11).randbytes(BIG_BYTES))])
WAITING = Layer([Dir("waiting"), File("waiting/blob", random.Random(12).randbytes(1_000_000))])


@pytest.fixture(scope="module")
def pushed(registry):
    images.push_image(registry, "stream/one", "latest", Image([BIG]))
    images.push_image(registry, "stream/two", "latest", Image([BIG, WAITING]))
    return registry


@pytest.fixture
def proxy(pushed):
    with FaultProxy("127.0.0.1", pushed.port) as p:
        yield p


def start(proxy, repo, root, local) -> DkrProcess:
    return DkrProcess("pull", "--insecure", "--image-root", root, "--json", "--backend", "dir",
                      "--stage-ahead", "never", f"{proxy.host}/{repo}", local)


def stop_extraction(proc: DkrProcess, proxy) -> list[int]:
    """Once the big blob flows and its extractor runs: stop the extractors."""
    proc.wait_until(lambda: sent(proxy, BIG) >= PIPE_SIZE and extractor_pids(proc.pid),
                    what="the big blob flowing into its extractor")
    stopped = extractor_pids(proc.pid)
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    return stopped


def resume(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def test_a_full_pipe_pauses_the_transfer_and_no_byte_goes_to_disk(proxy, image_root):
    proxy.add_fault(f"/blobs/{BIG.digest}", "slow", times=None, rate=4 * PIPE_SIZE)
    proc = start(proxy, "stream/one", image_root, "one")
    try:
        stopped = stop_extraction(proc, proxy)
        time.sleep(1.5)                        # 6 MB arrive meanwhile; the pipe holds 1
        resume(stopped)
        rc, err = proc.finish()
    finally:
        proc.stop()
    assert rc == 0, err
    done, = [e for e in proc.events if e["event"] == "download-done"]
    assert done["pauses"] >= 1, done           # the write callback returned PAUSE
    assert done["spooled"] == 0, done          # and the bytes never touched the spool
    assert (image_root / "one" / "big" / "blob").read_bytes() == \
        random.Random(11).randbytes(BIG_BYTES)


def test_a_blob_that_must_wait_is_spooled_and_a_killed_pull_resumes_it(proxy, image_root):
    """While the base layer's extractor holds its transfer back, the link has room:
    the next blob runs ahead into the spool. Killed then, the next pull asks
    for the rest of it only, and for the base layer's streamed part again."""
    proxy.add_fault(f"/blobs/{BIG.digest}", "slow", times=None, rate=4 * PIPE_SIZE)
    proxy.add_fault(f"/blobs/{WAITING.digest}", "slow", times=None, rate=250_000)
    proc = start(proxy, "stream/two", image_root, "two")
    try:
        stop_extraction(proc, proxy)
        proc.wait_until(lambda: spool_size(image_root, WAITING) >= 100_000,
                        what="the waiting blob spooled ahead")
        proc.kill_group()
        proc.finish()
    finally:
        proc.stop()
    have = spool_size(image_root, WAITING)
    assert 0 < have < WAITING.size
    # Of the base layer, only what came while its tree was being made (its
    # extractor was reading the spool by then); the rest went into the pipe.
    big_have = spool_size(image_root, BIG)
    assert big_have < PIPE_SIZE < sent(proxy, BIG)

    proxy.clear_faults()
    proxy.clear_log()
    run = assert_ok(pull(proxy, "stream/two", image_root, "--backend", "dir", local="two"))
    ranges = {layer.digest: [e.range for e in proxy.log_for(f"/blobs/{layer.digest}")
                             if e.method == "GET"] for layer in (BIG, WAITING)}
    assert ranges == {BIG.digest: [f"bytes={big_have}-" if big_have else None],
                      WAITING.digest: [f"bytes={have}-"]}, ranges
    assert f"resuming at byte {have}" in run.err
    assert (image_root / "two" / "waiting" / "blob").read_bytes() == \
        random.Random(12).randbytes(1_000_000)
