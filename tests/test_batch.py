"""Many images over one engine: shared layers fetched and unpacked once."""

from __future__ import annotations

import fcntl
import os
from collections import Counter

import pytest
from helpers import assert_downloads_wait_for_extraction, assert_ok, run_dkr
from reliability_helpers import DkrProcess

from dkr.testing import images
from dkr.testing.faultproxy import FaultProxy
from dkr.testing.images import File, Image, Layer
from dkr.registry.v2 import chain_ids


@pytest.fixture(scope="module")
def shared_base(registry):
    base = [Layer([File(f"base/{i}", bytes([i]) * 5000) for i in range(50)]),
            Layer([File(f"lib/{i}", bytes([i]) * 3000) for i in range(30)], compression="zstd")]
    for n in range(4):
        images.push_image(registry, f"batch/app{n}", "latest",
                          Image(base + [Layer([File(f"app{n}", f"app {n}".encode())])]))
    return base


@pytest.fixture
def proxy(registry):
    host, port = registry.host.split(":")
    with FaultProxy(host, int(port)) as p:
        yield p


def _blob_gets(proxy) -> Counter:
    return Counter(e.path.rsplit("/", 1)[-1] for e in proxy.log
                   if "/blobs/sha256:" in e.path and e.method == "GET")


def _app_layer(n: int) -> Layer:
    return Layer([File(f"app{n}", f"app {n}".encode())])


def test_a_failed_image_is_told_when_it_fails_while_the_others_go_on(shared_base, proxy,
                                                                     image_root, tmp_path):
    proxy.add_fault(f"/blobs/{_app_layer(1).digest}", "slow", rate=_app_layer(1).size / 3)
    listing = tmp_path / "images.txt"
    listing.write_text(f"{proxy.host}/batch/app1 slow\n{proxy.host}/batch/missing\n")
    run = run_dkr("pull", "--insecure", "--image-root", image_root, "--backend", "dir",
                  "--json", "--batch", listing)
    assert run.rc == 1, run.err
    kinds = [(e["event"], e.get("local")) for e in run.events]
    assert kinds.index(("error", "missing")) < kinds.index(("done", "slow")), kinds
    lines = run.err.splitlines()
    [error_at] = [i for i, line in enumerate(lines) if line.startswith("dkr: error: ")]
    [pulled_at] = [i for i, line in enumerate(lines) if "Pulled " in line and " as slow " in line]
    assert error_at < pulled_at, run.err
    assert (image_root / "slow" / "app1").read_bytes() == b"app 1"


def test_the_layers_of_a_failed_pull_end_failed(shared_base, proxy, image_root):
    top = _app_layer(2).digest
    proxy.add_fault(f"/blobs/{top}", "status", times=None, code=404)
    run = run_dkr("pull", "--insecure", "--image-root", image_root, "--backend", "dir",
                  "--json", "--retries", "0", f"{proxy.host}/batch/app2", "m")
    assert run.rc == 1, run.err
    last_phase = {}
    for e in run.events:
        if e["event"] == "phase":
            last_phase[e["digest"]] = e["phase"]
    assert last_phase[top] == "failed", last_phase
    assert {last_phase[layer.digest] for layer in shared_base} <= {"done", "failed"}
    assert [e["event"] for e in run.events][-1] == "error"
    assert not any(line.startswith("Layer ") and "failed" in line
                   for line in run.err.splitlines()), run.err     # the error line says it


def test_batch_shares_layers_and_reports_each_image(shared_base, proxy, image_root, tmp_path):
    listing = tmp_path / "images.txt"
    listing.write_text("# three apps on one base, and one that does not exist\n"
                       + "".join(f"{proxy.host}/batch/app{n}  machine{n}\n" for n in range(3))
                       + f"\n{proxy.host}/batch/missing\n")
    run = run_dkr("pull", "--insecure", "--image-root", image_root, "--backend", "dir",
                  "--json", "--batch", listing)
    assert run.rc == 1, run.err
    errors = [line for line in run.err.splitlines() if line.startswith("dkr: error: ")]
    assert len(errors) == 1 and "batch/missing" in errors[0] and "manifest unknown" in errors[0]
    [error] = [e for e in run.events if e["event"] == "error"]
    assert error["reference"] == f"{proxy.host}/batch/missing" and "manifest unknown" in error["message"]
    assert "Pulled 3 of 4 images; 1 failed: missing." in run.err
    for n in range(3):
        assert (image_root / f"machine{n}" / f"app{n}").read_bytes() == f"app {n}".encode()
        assert (image_root / f"machine{n}" / "base" / "7").read_bytes() == bytes([7]) * 5000
    built = Counter(e["chain_id"] for e in run.events if e["event"] == "layer-done")
    assert len(built) == 2 + 3 and set(built.values()) == {1}     # each layer unpacked once
    gets = _blob_gets(proxy)
    base_digests = {layer.digest.split(":")[1] for layer in shared_base}
    assert all(gets[f"sha256:{d}"] == 1 for d in base_digests), gets    # and fetched once
    assert list((image_root / ".dkr" / "partial").iterdir()) == []     # spool freed


def test_batch_from_stdin_all_good(shared_base, registry, image_root):
    run = assert_ok(run_dkr("pull", "--insecure", "--image-root", image_root, "--backend",
                            "dir", "--batch", "-", input=f"{registry.host}/batch/app3\n"))
    assert "Pulled 1 of 1 images." in run.err
    assert (image_root / "app3" / "app3").exists()


@pytest.mark.parametrize("content, message", [
    ("a b c\n", r"line 1: want REFERENCE \[LOCAL\]"),
    ("# nothing\n\n", r"no images listed"),
    ("x/a same\ny/b same\n", r"machine name 'same' is used for both"),
])
def test_bad_batch_files(image_root, tmp_path, content, message):
    from helpers import assert_clean_failure
    listing = tmp_path / "bad.txt"
    listing.write_text(content)
    run = run_dkr("pull", "--image-root", image_root, "--batch", listing)
    assert_clean_failure(run, image_root, message)


def test_batch_excludes_reference(image_root, tmp_path):
    from helpers import assert_clean_failure
    run = run_dkr("pull", "--image-root", image_root, "--batch", tmp_path / "x", "some/ref")
    assert_clean_failure(run, image_root, r"--batch takes the images from FILE")


def test_stats_summary(shared_base, registry, image_root):
    run = assert_ok(run_dkr("pull", "--insecure", "--image-root", image_root, "--backend",
                            "dir", "--stats", f"{registry.host}/batch/app0"))
    assert "Stats: 3 layers" in run.err
    for phase in ("network", "spool", "prepare", "extract", "commit", "machine"):
        assert f"  {phase} " in run.err


def test_spool_limit_keeps_downloads_behind_extraction(shared_base, registry, image_root):
    """With room for one blob, downloads run at most one blob ahead of extraction."""
    run = assert_ok(run_dkr("pull", "--insecure", "--image-root", image_root, "--backend",
                            "dir", "--json", "--spool-limit", "1", f"{registry.host}/batch/app1"))
    assert_downloads_wait_for_extraction(run, 3)
    assert list((image_root / ".dkr" / "partial").iterdir()) == []


@pytest.fixture(scope="module")
def apps_apart(registry):
    """More images than extractor slots, two layers each, none shared."""
    count = (os.cpu_count() or 2) + 1
    for n in range(count):
        images.push_image(registry, f"apart/app{n}", "latest", Image([
            Layer([File(f"a{n}/{i}", bytes([n, i]) * 4000) for i in range(20)]),
            Layer([File(f"b{n}", f"app {n}".encode())])]))
    return count


def test_a_tight_spool_limit_does_not_stall_a_batch(apps_apart, registry, image_root, tmp_path):
    """Blobs ahead wait for room in the spool, layers for an extractor slot: a
    layer that has its slot gets its blob at once, so none holds a slot while its
    blob waits for room that the others hold."""
    listing = tmp_path / "images.txt"
    listing.write_text("".join(f"{registry.host}/apart/app{n} m{n}\n" for n in range(apps_apart)))
    assert_ok(run_dkr("pull", "--insecure", "--image-root", image_root, "--backend",
                      "dir", "--json", "--spool-limit", "1", "--batch", listing, timeout=60))
    for n in range(apps_apart):
        assert (image_root / f"m{n}" / f"b{n}").read_bytes() == f"app {n}".encode()
        assert (image_root / f"m{n}" / f"a{n}" / "7").read_bytes() == bytes([n, 7]) * 4000
    assert list((image_root / ".dkr" / "partial").iterdir()) == []


def test_bad_spool_limit(image_root):
    from helpers import assert_clean_failure
    run = run_dkr("pull", "--image-root", image_root, "--spool-limit", "lots", "x/y")
    assert_clean_failure(run, image_root, r"invalid size 'lots'")


def test_an_image_that_comes_late_builds_on_the_committed_base(shared_base, proxy, image_root,
                                                                tmp_path):
    """Its manifest arrives after the other image's base layers were committed, under
    their final names: its own layer must be copied from the base where it is now."""
    proxy.add_fault("/batch/app1/manifests/", "stall_after", times=1, bytes=0, seconds=2)
    listing = tmp_path / "images.txt"
    listing.write_text(f"{proxy.host}/batch/app0 early\n{proxy.host}/batch/app1 late\n")
    run = assert_ok(run_dkr("pull", "--insecure", "--image-root", image_root, "--backend", "dir",
                            "--json", "--batch", listing))
    events = [(e["event"], e.get("resolved", ""), e.get("chain_id")) for e in run.events]
    late = events.index(("resolved", f"{proxy.host}/batch/app1:latest", None))
    base_done = [i for i, (event, _, _) in enumerate(events) if event == "layer-done"][:2]
    assert len(base_done) == 2 and max(base_done) < late, events       # the case at hand
    assert (image_root / "late" / "app1").read_bytes() == b"app 1"
    assert (image_root / "late" / "base" / "7").read_bytes() == bytes([7]) * 5000
    built = Counter(e["chain_id"] for e in run.events if e["event"] == "layer-done")
    assert len(built) == 2 + 2 and set(built.values()) == {1}


def _batch_where_app0_cannot_claim(image_root, listing, base_key, top_key):
    """Pull ``listing`` (app0 first, then app1 whose manifest comes late) while the
    base layer's lock is held from outside until app1 is resolved, so that app0
    waits at the base and app1 joins its build; app0's top layer has no lock to
    be had. The DkrProcess (its events), the exit status and stderr."""
    locks = image_root / ".dkr" / "locks"
    locks.mkdir(parents=True)
    (locks / f"layer-{top_key}.lock").mkdir()
    with open(locks / f"layer-{base_key}.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        pull = DkrProcess("pull", "--insecure", "--image-root", image_root, "--backend", "dir",
                          "--json", "--batch", listing)
        try:
            pull.wait_event(lambda e: e["event"] == "resolved" and "app1" in e["reference"])
            fcntl.flock(held, fcntl.LOCK_UN)
            rc, err = pull.finish()
        finally:
            pull.stop()
    return pull, rc, err


def test_an_image_that_cannot_claim_its_top_layer_still_builds_the_base_it_shares(
        shared_base, proxy, image_root, tmp_path):
    """app0 takes on the base layers (a lock held from outside keeps it waiting there),
    app1 arrives and joins that build, then app0 fails to claim its own top layer:
    app0 fails alone, and app1 still gets the base it waited for."""
    top0 = Layer([File("app0", b"app 0")])
    keys = [c.split(":")[1] for c in chain_ids([layer.diff_id for layer in [*shared_base, top0]])]
    proxy.add_fault("/batch/app1/manifests/", "stall_after", times=1, bytes=0, seconds=1)
    listing = tmp_path / "images.txt"
    listing.write_text(f"{proxy.host}/batch/app0 first\n{proxy.host}/batch/app1 second\n")
    _, rc, err = _batch_where_app0_cannot_claim(image_root, listing, keys[0], keys[2])
    assert rc == 1, err
    errors = [line for line in err.splitlines() if line.startswith("dkr: error: ")]
    assert len(errors) == 1 and "app0" in errors[0] and keys[2][:12] in errors[0], err
    assert "Pulled 1 of 2 images; 1 failed: first." in err
    assert (image_root / "second" / "app1").read_bytes() == b"app 1"
    assert (image_root / "second" / "base" / "7").read_bytes() == bytes([7]) * 5000
    assert not (image_root / "first").exists()


def test_what_a_failing_image_gives_up_is_taken_on_by_an_image_that_comes_later(
        registry, proxy, image_root, tmp_path):
    """app0 fails to claim its top layer after another image joined its base: it builds
    the base for that one, and gives up the rest at once. app2, which comes while the
    base is being built and needs app0's middle layer too, builds that layer itself."""
    base = [Layer([File(f"base/{i}", bytes([i]) * 5000) for i in range(20)])]
    mid = Layer([File("mid", b"middle layer")])
    tops = [Layer([File(f"app{n}", f"app {n}".encode())]) for n in range(3)]
    stacks = {0: base + [mid, tops[0]], 1: base + [tops[1]], 2: base + [mid, tops[2]]}
    for n, layers in stacks.items():
        images.push_image(registry, f"claim/app{n}", "latest", Image(layers))
    keys = [c.split(":")[1] for c in chain_ids([layer.diff_id for layer in stacks[0]])]
    proxy.add_fault("/claim/app1/manifests/", "stall_after", times=1, bytes=0, seconds=1)
    proxy.add_fault("/claim/app2/manifests/", "stall_after", times=1, bytes=0, seconds=2)
    proxy.add_fault(f"/blobs/{base[0].digest}", "stall_after", times=1, bytes=0, seconds=3)
    listing = tmp_path / "images.txt"
    listing.write_text("".join(f"{proxy.host}/claim/app{n} m{n}\n" for n in range(3)))
    pull, rc, err = _batch_where_app0_cannot_claim(image_root, listing, keys[0], keys[2])
    errors = [line for line in err.splitlines() if line.startswith("dkr: error: ")]
    assert rc == 1 and len(errors) == 1 and "claim/app0" in errors[0], err
    for n in (1, 2):
        assert (image_root / f"m{n}" / f"app{n}").read_bytes() == f"app {n}".encode()
    assert (image_root / "m2" / "mid").read_bytes() == b"middle layer"
    assert [e for e in pull.events if e["event"] == "layer-done" and e["chain_id"] == f"sha256:{keys[1]}"]

