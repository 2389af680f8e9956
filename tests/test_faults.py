"""Network faults between dkr and a real registry, injected by a loopback proxy.

Resets, stalls, truncated bodies, 5xx, 429 with Retry-After, refused
connections and a server that ignores Range: each is retried for the blob it
hit, resumes with ``Range`` from what already arrived, leaves the other
transfers alone, and, once the attempts run out, ends in one clear error that
names the blob and the cause. A corrupt blob is caught by its digest and never
poisons a later pull.
"""

from __future__ import annotations

import random
import re

import pytest
from helpers import assert_clean_failure, assert_ok, pull
from reliability_helpers import chain_ids, layer_dir, spool_files, visible_layers

from dkr.testing import images
from dkr.testing.faultproxy import FaultProxy
from dkr.testing.images import Dir, File, Image, Layer

SIZE = 400_000


def _layer(seed: int, name: str) -> Layer:
    # Random bytes do not compress: blob offsets are file offsets, give or take a header.
    return Layer([Dir("data"), File(f"data/{name}", random.Random(seed).randbytes(SIZE))])


LAYER_A, LAYER_B = _layer(1, "a"), _layer(2, "b")
IMAGE = Image([LAYER_A, LAYER_B])
A = LAYER_A.digest
B = LAYER_B.digest


@pytest.fixture(scope="module")
def pushed(registry):
    images.push_image(registry, "faults/img", "latest", IMAGE)
    return registry


@pytest.fixture
def proxy(pushed):
    with FaultProxy("127.0.0.1", pushed.port) as p:
        yield p


def blob_requests(proxy, digest):
    return [e for e in proxy.log_for(f"/blobs/{digest}") if e.method == "GET"]


def dkr_pull(proxy, root, *extra):
    # Layer B is staged while A is being built: faults meet both kinds of extraction.
    return pull(proxy, "faults/img", root, "--backend", "dir", "--retries", "2",
                "--stage-ahead", "always", *extra)


def assert_correct(root) -> None:
    machine = root / "img"
    assert (machine / "data" / "a").read_bytes() == random.Random(1).randbytes(SIZE)
    assert (machine / "data" / "b").read_bytes() == random.Random(2).randbytes(SIZE)


def assert_b_untouched(proxy) -> None:
    """The fault hit blob A: blob B was fetched once, start to end, never restarted."""
    requests = blob_requests(proxy, B)
    assert len(requests) == 1 and requests[0].range is None and requests[0].status == 200, requests


def resumed_at(entry) -> int:
    m = re.fullmatch(r"bytes=(\d+)-", entry.range or "")
    assert m, f"not a resume: {entry}"
    return int(m[1])


# --- retried and resumed ----------------------------------------------------------------

def test_reset_resumes_with_range(proxy, image_root):
    proxy.add_fault(f"/blobs/{A}", "reset_after", bytes=150_000)
    run = assert_ok(dkr_pull(proxy, image_root))
    first, second = blob_requests(proxy, A)
    assert first.range is None and first.fault == "reset_after"
    # What the kernel had delivered before the reset, at most what the proxy sent.
    assert 0 < resumed_at(second) <= 150_000 and second.status == 206
    assert re.search(rf"layer {A}: .*trying again in .*from byte {resumed_at(second)}", run.err)
    assert_b_untouched(proxy)
    assert_correct(image_root)
    assert spool_files(image_root) == []


def test_truncated_body_resumes_at_the_exact_byte(proxy, image_root):
    proxy.add_fault(f"/blobs/{A}", "truncate_after", bytes=123_456)
    assert_ok(dkr_pull(proxy, image_root))
    first, second = blob_requests(proxy, A)
    assert first.bytes_sent == 123_456
    assert second.range == "bytes=123456-" and second.status == 206
    assert_b_untouched(proxy)
    assert_correct(image_root)


def test_stall_times_out_and_resumes(proxy, image_root):
    proxy.add_fault(f"/blobs/{A}", "stall_after", bytes=100_000, seconds=60)
    run = assert_ok(dkr_pull(proxy, image_root, "--stall-timeout", "2"))
    first, second = blob_requests(proxy, A)
    assert first.fault == "stall_after"
    assert resumed_at(second) == 100_000
    assert re.search(rf"layer {A}: .*(timed out|too slow|stalled).*trying again", run.err), run.err
    assert_b_untouched(proxy)
    assert_correct(image_root)


def test_server_errors_are_retried(proxy, image_root):
    proxy.add_fault(f"/blobs/{A}", "status", code=502)
    proxy.add_fault(f"/blobs/{A}", "status", code=503)
    run = assert_ok(dkr_pull(proxy, image_root))
    assert [e.status for e in blob_requests(proxy, A)] == [502, 503, 200]
    assert "registry answered 502; trying again" in run.err
    assert "registry answered 503; trying again" in run.err
    assert_b_untouched(proxy)
    assert_correct(image_root)


def test_429_waits_as_retry_after_says(proxy, image_root):
    proxy.add_fault(f"/blobs/{A}", "status", code=429, retry_after=1)
    run = assert_ok(dkr_pull(proxy, image_root))
    assert [e.status for e in blob_requests(proxy, A)] == [429, 200]
    # The wait comes from Retry-After (1 s), not from the backoff table: the log says so.
    assert re.search(rf"layer {A}: registry answered 429; trying again in 1\.0 s", run.err), run.err
    assert_b_untouched(proxy)
    assert_correct(image_root)


def test_refused_connection_is_retried(proxy, image_root):
    proxy.add_fault(f"/blobs/{A}", "refuse")
    assert_ok(dkr_pull(proxy, image_root))
    assert [e.status for e in blob_requests(proxy, A)] == [None, 200]
    assert_b_untouched(proxy)
    assert_correct(image_root)


def test_server_ignoring_range_still_gives_the_right_bytes(proxy, image_root):
    proxy.add_fault(f"/blobs/{A}", "truncate_after", bytes=200_000)
    proxy.add_fault(f"/blobs/{A}", "ignore_range", times=None)
    assert_ok(dkr_pull(proxy, image_root))
    first, second = blob_requests(proxy, A)
    assert second.range == "bytes=200000-" and "ignore_range" in second.fault
    assert second.status == 200          # the whole body again; dkr skips what it has
    assert_b_untouched(proxy)
    assert_correct(image_root)


def test_faults_on_every_blob_at_once(proxy, image_root):
    """Both transfers break, differently, and each recovers on its own."""
    proxy.add_fault(f"/blobs/{A}", "reset_after", bytes=50_000)
    proxy.add_fault(f"/blobs/{B}", "status", code=503)
    proxy.add_fault(f"/blobs/{B}", "truncate_after", bytes=10_000)
    assert_ok(dkr_pull(proxy, image_root))
    assert [e.status for e in blob_requests(proxy, B)] == [503, 200, 206]
    assert len(blob_requests(proxy, A)) == 2
    assert_correct(image_root)


def test_manifest_and_config_faults_are_retried(proxy, image_root):
    proxy.add_fault("/manifests/", "status", code=502)
    proxy.add_fault(f"/blobs/{IMAGE.config_digest}", "reset_after", bytes=10)
    assert_ok(dkr_pull(proxy, image_root))
    assert_correct(image_root)


# --- the last attempt fails: one clear line ----------------------------------------------

@pytest.mark.parametrize("kind, params, cause", [
    ("reset_after", {"bytes": 100_000}, r"reset|recv|receiv|Connection"),
    ("truncate_after", {"bytes": 100_000}, r"bytes missing|ended after|partial"),
    ("status", {"code": 503}, r"registry answered 503"),
    ("refuse", {}, r"Empty reply|nothing|reply"),
])
def test_gives_up_naming_blob_and_cause(proxy, image_root, kind, params, cause):
    proxy.add_fault(f"/blobs/{A}", kind, times=None, **params)
    run = dkr_pull(proxy, image_root)
    assert_clean_failure(run, image_root, rf"layer {A}: .*({cause})", "img")
    # --retries 2: three attempts in all (libcurl itself may replay a request once on a
    # kept-alive connection that was closed without an answer)
    retries = [line for line in run.err.splitlines()
               if line.startswith(f"layer {A}: ") and "trying again" in line]
    assert len(retries) == 2 and "(attempt 3 of 3" in retries[-1], run.err
    assert len(blob_requests(proxy, A)) >= 3
    assert visible_layers(image_root) == []
    assert not (image_root / "img").exists()


def test_gave_up_after_n_attempts_also_for_status_answers(proxy, image_root):
    """A 5xx to the end says how often it was tried, as a network error does."""
    proxy.add_fault(f"/blobs/{A}", "status", times=None, code=503)
    run = dkr_pull(proxy, image_root)
    assert_clean_failure(run, image_root,
                         rf"layer {A}: registry answered 503 .*gave up after 3 attempts")


def test_failed_download_prints_no_traceback(proxy, image_root):
    """The one error line is all: no asyncio "Task exception was never retrieved" after it."""
    proxy.add_fault(f"/blobs/{A}", "status", times=None, code=404)
    run = dkr_pull(proxy, image_root)
    assert_clean_failure(run, image_root, rf"layer {A}: registry answered 404", "img")


@pytest.mark.parametrize("code, header, message", [
    (307, ("Location", "http://[::1/elsewhere"), r"redirected to an invalid URL"),
    (401, ("WWW-Authenticate", 'Bearer realm="https://[::1/token",service="x"'),
     r"token realm .* is not an http\(s\) URL"),
])
def test_a_url_from_the_registry_that_does_not_parse_is_a_clear_error(proxy, image_root,
                                                                       code, header, message):
    proxy.add_fault(f"/blobs/{A}", "status", times=None, code=code, headers=dict([header]))
    run = dkr_pull(proxy, image_root)
    assert_clean_failure(run, image_root, message, "img")


# --- verification: a bad blob fails, and never poisons the next pull -------------------------

def test_corrupt_blob_fails_then_a_clean_pull_succeeds(proxy, image_root):
    proxy.add_fault(f"/blobs/{A}", "corrupt", offset=300_000)
    proxy.add_fault(f"/blobs/{A}", "slow", rate=400_000)
    run = dkr_pull(proxy, image_root)
    assert_clean_failure(run, image_root, rf"layer {A}: content does not match its digest", "img")
    assert visible_layers(image_root) == []
    # What is kept must not be the corrupt bytes. B's download may have begun once A's
    # was over, and be cut by the failure: it rightly keeps its true part for the next pull.
    blobs = {layer.digest.split(":")[1]: layer.blob for layer in (LAYER_A, LAYER_B)}
    for spool in spool_files(image_root):
        kept = spool.read_bytes()
        assert blobs[spool.name].startswith(kept), spool
        assert spool.name != A.split(":")[1] or kept == b"", spool
    assert_ok(dkr_pull(proxy, image_root))
    assert_correct(image_root)


def test_corrupt_staged_layer_fails_cleanly(proxy, image_root):
    """B is staged (its blob comes once A's has the link no more); its bad blob fails
    the pull, and its stage is not left behind. A's tree, whole and committed before
    B's digest is checked or not, may stay: the next pull reuses it."""
    proxy.add_fault(f"/blobs/{B}", "corrupt", offset=1000)
    proxy.add_fault(f"/blobs/{A}", "slow", times=None, rate=200_000)
    run = dkr_pull(proxy, image_root, "--json")
    assert_clean_failure(run, image_root, rf"layer {B}: content does not match its digest", "img")
    first, second = chain_ids(IMAGE)
    assert visible_layers(image_root) in ([], [layer_dir(image_root, first)])
    assert not layer_dir(image_root, second).exists()
    assert [e["digest"] for e in run.events if e["event"] == "layer-staged"] == [], run.err
    assert_ok(dkr_pull(proxy, image_root))
    assert_correct(image_root)


def test_corrupt_partial_download_is_not_trusted_on_resume(proxy, image_root):
    """A corrupt byte lands in the spool, then the connection dies (no retries left).

    The next pull resumes from the spool with Range, finds the digest wrong,
    throws the spool away and starts the layer over from byte 0.
    """
    proxy.add_fault(f"/blobs/{A}", "corrupt", offset=1000)
    proxy.add_fault(f"/blobs/{A}", "truncate_after", bytes=250_000)
    first = pull(proxy, "faults/img", image_root, "--backend", "dir", "--retries", "0",
                 "--spool-all")
    assert_clean_failure(first, image_root, rf"layer {A}:", "img")
    assert A.split(":")[1] in [s.name for s in spool_files(image_root)]
    run = assert_ok(dkr_pull(proxy, image_root))
    requests = blob_requests(proxy, A)
    assert [e.range for e in requests[1:]] == ["bytes=250000-", None], requests
    assert "starting this layer over" in run.err
    assert_correct(image_root)
    assert spool_files(image_root) == []


def test_a_blob_used_twice_starts_over_once_its_resume_goes_wrong(pushed, proxy, image_root):
    """The same blob is layers 1 and 3: the fresh start after a bad resume is a new
    download, not the failed one that layer 3 still holds."""
    images.push_image(pushed, "faults/twice", "latest", Image([LAYER_A, LAYER_B, LAYER_A]))
    proxy.add_fault(f"/blobs/{A}", "corrupt", offset=1000)
    proxy.add_fault(f"/blobs/{A}", "truncate_after", bytes=250_000)
    first = pull(proxy, "faults/twice", image_root, "--backend", "dir", "--retries", "0")
    assert_clean_failure(first, image_root, rf"layer {A}:", "twice")
    run = assert_ok(pull(proxy, "faults/twice", image_root, "--backend", "dir"))
    assert "starting this layer over" in run.err
    assert (image_root / "twice" / "data" / "a").read_bytes() == random.Random(1).randbytes(SIZE)
    assert (image_root / "twice" / "data" / "b").read_bytes() == random.Random(2).randbytes(SIZE)
    assert spool_files(image_root) == []
