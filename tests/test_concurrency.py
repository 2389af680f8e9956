"""Several ``dkr pull`` processes on one image root at the same time.

The same image to different machines and images that share layers: every
process succeeds, each layer is built exactly once across all of them (the
``layer-done`` events of every process together), the waiting shows in the
log, and nothing is corrupted. The shared base layer is slowed down by the
fault proxy so that the first process still holds its lock when the others
arrive: the waiting is certain, not a race.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections import Counter

import pytest
from helpers import temp_entries
from reliability_helpers import (
    DkrProcess,
    chain_ids,
    check_layers_complete,
    error_lines,
    flock_holders,
    spool_files,
    visible_layers,
)

from dkr.testing import images
from dkr.testing.faultproxy import FaultProxy
from dkr.testing.images import Dir, File, Image, Layer
from dkr.testing.oracle import diff_trees, tree_snapshot

BASE = Layer([Dir("usr"), File("usr/base", random.Random(11).randbytes(600_000))])
X = Image([BASE, Layer([Dir("app"), File("app/x", b"x" * 1000)])])
Y = Image([BASE, Layer([Dir("app"), File("app/y", b"y" * 1000)])])
# A tree of images: A, B and C share the base; B and C (and C2, C's other tag)
# also share a middle layer.
MIDDLE = Layer([Dir("srv"), File("srv/middle", b"m" * 1000)])
TREE = {name: Image(layers) for name, layers in [
    ("a", [BASE, Layer([File("a", b"a\n")])]),
    ("b", [BASE, MIDDLE, Layer([File("b", b"b\n")])]),
    ("c", [BASE, MIDDLE, Layer([File("c", b"c\n")])]),
    ("c2", [BASE, MIDDLE, Layer([File("c", b"c2\n")])])]}


@pytest.fixture(scope="module")
def proxy(registry):
    images.push_image(registry, "conc/x", "latest", X)
    images.push_image(registry, "conc/y", "latest", Y)
    for name, image in TREE.items():
        images.push_image(registry, f"tree/{name}", "latest", image)
    with FaultProxy("127.0.0.1", registry.port) as p:
        yield p


def start(proxy, repo, root, local) -> DkrProcess:
    return DkrProcess("pull", "--insecure", "--image-root", root, "--backend", "dir", "--json",
                      "--retries", "2", f"{proxy.host}/{repo}", local)


def test_parallel_pulls_share_layers_and_build_each_once(proxy, image_root):
    # 600 kB at 250 kB/s: the others start (a Python process each) well within that.
    proxy.add_fault(f"/blobs/{BASE.digest}", "slow", times=1, rate=250_000)
    first = start(proxy, "conc/x", image_root, "x1")
    others = []
    try:
        # The first process holds the base layer's lock once it starts building it.
        first.wait_event(lambda e: e["event"] == "layer-start")
        others = [start(proxy, "conc/x", image_root, "x2"), start(proxy, "conc/y", image_root, "y"),
                  start(proxy, "conc/x", image_root, "x3")]
        results = [p.finish() for p in [first, *others]]
    finally:
        for p in [first, *others]:
            p.stop()
    for rc, err in results:
        assert rc == 0 and "Traceback" not in err and not error_lines(err), err

    built = Counter(e["chain_id"] for p in [first, *others] for e in p.events
                    if e["event"] == "layer-done")
    expected = set(chain_ids(X) + chain_ids(Y))
    assert set(built) == expected and set(built.values()) == {1}, built
    skipped = Counter(e["chain_id"] for p in others for e in p.events if e["event"] == "skipped")
    assert skipped[chain_ids(X)[0]] == 3          # everyone reused the base
    assert all("Waiting for another dkr process building layer" in err
               for _, err in results[1:]), [err for _, err in results[1:]]
    # One download of the base blob for all four processes.
    assert len([e for e in proxy.log_for(f"/blobs/{BASE.digest}") if e.method == "GET"]) == 1

    x1 = tree_snapshot(image_root / "x1")
    for machine in ("x2", "x3"):
        assert diff_trees(x1, tree_snapshot(image_root / machine), "x1", machine) == []
    assert (image_root / "x1" / "usr" / "base").read_bytes() == BASE.entries[1].data
    assert (image_root / "y" / "app" / "y").read_bytes() == b"y" * 1000
    assert not (image_root / "y" / "app" / "x").exists()
    assert len(visible_layers(image_root)) == 3
    check_layers_complete(image_root)
    assert temp_entries(image_root) == [] and spool_files(image_root) == []


def test_two_pulls_to_the_same_machine(proxy, image_root):
    """Same image, same LOCAL, at once: one makes it, the other finds it up to date."""
    proxy.add_fault(f"/blobs/{BASE.digest}", "slow", times=1, rate=400_000)
    a = start(proxy, "conc/x", image_root, "same")
    b = None
    try:
        a.wait_event(lambda e: e["event"] == "layer-start")
        b = start(proxy, "conc/x", image_root, "same")
        (rc_a, err_a), (rc_b, err_b) = a.finish(), b.finish()
    finally:
        a.stop()
        if b:
            b.stop()
    # Either may get to the machine first (b finds the layers done and races a to it).
    assert [rc_a, rc_b] == [0, 0], (err_a, err_b)
    assert "Traceback" not in err_a + err_b and error_lines(err_a + err_b) == [], (err_a, err_b)
    assert (err_a + err_b).count("Created machine same") == 1, (err_a, err_b)
    assert (err_a + err_b).count("Machine same is up to date") == 1, (err_a, err_b)
    assert (image_root / "same" / "app" / "x").read_bytes() == b"x" * 1000
    assert temp_entries(image_root) == []
    check_layers_complete(image_root)


def _lock(root, image, index):
    return root / ".dkr" / "locks" / f"layer-{chain_ids(image)[index].split(':')[1]}.lock"


def _waits(proc) -> bool:
    return "Waiting for another dkr process building layer" in "".join(proc._err)


def test_a_batch_and_a_pull_that_take_over_a_dead_builder_do_not_wait_for_each_other(
        proxy, image_root, tmp_path):
    """A pulls the base slowly; a batch of B and C and a pull of C2 wait for it; A dies.

    The moment that made the two wait for each other for ever, held open: the
    batch is stopped (SIGSTOP) from A's death until C2 has taken the base
    over, so that C2 and not the batch builds it. A batch that had claimed
    the middle layer for C while its B still waited for the base would now
    hold what C2 needs next, and wait for what C2 holds.
    """
    proxy.add_fault(f"/blobs/{BASE.digest}", "slow", times=1, rate=20_000)
    base_lock, middle_lock = _lock(image_root, TREE["b"], 0), _lock(image_root, TREE["b"], 1)
    listing = tmp_path / "batch"
    listing.write_text(f"{proxy.host}/tree/b b\n{proxy.host}/tree/c c\n")
    a = DkrProcess("pull", "--insecure", "--image-root", image_root, "--backend", "dir",
                   "--json", f"{proxy.host}/tree/a", "a")
    procs = [a]
    try:
        a.wait_until(lambda: a.pid in flock_holders(base_lock), what="A holding the base")
        batch = DkrProcess("pull", "--insecure", "--image-root", image_root, "--backend", "dir",
                           "--json", "--batch", listing)
        procs.append(batch)
        for name in ("b", "c"):
            batch.wait_event(lambda e: e["event"] == "resolved" and
                             e["resolved"].endswith(f"tree/{name}:latest"))
        batch.wait_until(lambda: _waits(batch), what="the batch waiting for the base")
        # Wait for the batch to claim what else it may claim now (without the fix: C's
        # middle layer, at once); with the fix it claims nothing more.
        deadline = time.monotonic() + 2
        while batch.pid not in flock_holders(middle_lock) and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(batch.pid, signal.SIGSTOP)
        c2 = DkrProcess("pull", "--insecure", "--image-root", image_root, "--backend", "dir",
                        "--json", f"{proxy.host}/tree/c2", "c2")
        procs.append(c2)
        c2.wait_until(lambda: _waits(c2), what="C2 waiting for the base")
        a.kill_group()
        a.finish()
        c2.wait_until(lambda: c2.pid in flock_holders(base_lock), what="C2 taking the base over")
        os.kill(batch.pid, signal.SIGCONT)
        try:
            (rc_batch, err_batch), (rc_c2, err_c2) = batch.finish(30), c2.finish(30)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"hung: base held by {flock_holders(base_lock)}, middle by "
                f"{flock_holders(middle_lock)} (batch {batch.pid}, C2 {c2.pid})") from None
    finally:
        for proc in procs:
            os.kill(proc.pid, signal.SIGCONT) if proc.proc.poll() is None else None
            proc.stop()
    assert rc_batch == 0 and not error_lines(err_batch), err_batch
    assert rc_c2 == 0 and not error_lines(err_c2), err_c2
    built = Counter(e["chain_id"] for p in (batch, c2) for e in p.events
                    if e["event"] == "layer-done")
    assert set(built.values()) == {1}, built
    for machine, name in (("b", "b"), ("c", "c"), ("c2", "c2")):
        assert (image_root / machine / "srv" / "middle").read_bytes() == b"m" * 1000
    assert (image_root / "c2" / "c").read_bytes() == b"c2\n"
    check_layers_complete(image_root)
