"""Many dkr processes on one image root at once, some of them killed: a seeded stress test.

Each round starts, on one image root and all at once: pulls of images that
share layers in a tree (a base under everything, a middle layer under two
of them), a ``--batch`` of two of them, a ``--force`` pull over a machine
that exists, a ``remove`` and a ``gc``. The registry sits behind a
throttling proxy so that the operations overlap. Some operations are killed
at a random moment: the whole process group (a power cut) or the main pid
alone (the OOM killer). After each round:

- nothing hung (every operation ended within a bound);
- every operation that was not killed succeeded;
- every machine that exists equals its image's tree as umoci unpacks it
  (after ``--force``: the old or the new image), and the ``--force``
  target never went missing while it was swapped;
- every layer that a record names exists and is complete;
- after re-running what was killed, and ``gc``: all machines are whole and
  nothing temporary is left.

``DKR_STRESS_ROUNDS`` (default 2 per backend) and ``DKR_STRESS_SEED`` make
longer runs by hand, e.g. ``DKR_STRESS_ROUNDS=50 pytest tests/test_stress.py``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import run_dkr, temp_entries
from reliability_helpers import (
    DkrProcess,
    backend_mount,
    check_layers_complete,
    error_lines,
    session_pids,
    spool_files,
    wait_gone,
)

from dkr.testing import images
from dkr.testing.faultproxy import FaultProxy
from dkr.testing.images import Dir, File, Image, Layer
from dkr.testing.oracle import diff_trees, tree_snapshot, umoci_unpack

ROUNDS = int(os.environ.get("DKR_STRESS_ROUNDS", "2"))
SEED = int(os.environ.get("DKR_STRESS_SEED", "2024"))
RATE = 300_000              # bytes/s per blob through the proxy: the base takes ~1.7 s
HANG = 120                  # no operation of a round may take longer than this

_rng = random.Random(5)
BASE = Layer([Dir("etc"), File("etc/base", b"base\n"), Dir("usr"),
              File("usr/base.bin", _rng.randbytes(500_000))])
MIDDLE = Layer([Dir("opt"), File("opt/middle.bin", _rng.randbytes(300_000))])


def _top(name: str) -> Layer:
    return Layer([Dir("app"), File(f"app/{name}", _rng.randbytes(100_000)),
                  File("etc/which", f"{name}\n".encode())])


IMAGES = {
    "stress/a": Image([BASE, _top("a")]),
    "stress/b": Image([BASE, MIDDLE, _top("b")]),
    "stress/c": Image([BASE, MIDDLE, _top("c")]),
}
# A second name (another tag) for an image: same layers, its own manifest pull.
ALIASES = {"stress/c2": "stress/c"}


@pytest.fixture(scope="module")
def oracle(registry, tmp_path_factory):
    """Each image pushed, and its tree as skopeo + umoci make it."""
    trees = {}
    for repo, image in IMAGES.items():
        images.push_image(registry, repo, "latest", image)
        unpacked = umoci_unpack(registry, repo, "latest", tmp_path_factory.mktemp("oracle"))
        trees[repo] = tree_snapshot(unpacked, include_root=False)
    for alias, repo in ALIASES.items():
        images.push_image(registry, alias, "latest", IMAGES[repo])
        trees[alias] = trees[repo]
    return trees


@pytest.fixture(scope="module")
def proxy(oracle, registry):
    with FaultProxy("127.0.0.1", registry.port) as p:
        p.add_fault(r"/blobs/sha256:", "slow", times=None, rate=RATE)
        yield p


@dataclass
class Op:
    """One dkr command of a round, and how it may end."""
    name: str
    args: list
    machines: dict[str, set[str]]        # LOCAL: the repos its tree may come from afterwards
    kill: str | None = None              # "group" or "main"
    start_after: float = 0.0
    kill_after: float = 0.0
    proc: DkrProcess | None = None
    result: tuple[int, str] | None = None
    gone: set[str] = field(default_factory=set)   # machines this op removes


def _round_ops(rng: random.Random, host: str, root: Path, listing: Path, backend: str) -> list[Op]:
    common = ["--insecure", "--image-root", str(root), "--backend", backend, "--json",
              "--retries", "3"]
    listing.write_text(f"{host}/stress/b b1\n{host}/stress/c c1\n")
    ops = [
        Op("pull a", ["pull", *common, f"{host}/stress/a", "a1"], {"a1": {"stress/a"}}),
        Op("batch b c", ["pull", *common, "--batch", str(listing)],
           {"b1": {"stress/b"}, "c1": {"stress/c"}}),
        Op("pull c2", ["pull", *common, f"{host}/stress/c2", "c2"], {"c2": {"stress/c2"}}),
        Op("force", ["pull", *common, "--force", f"{host}/stress/c", "old"],
           {"old": {"stress/a", "stress/c"}}),
        Op("remove", ["remove", "--image-root", str(root), "doomed"], {}, gone={"doomed"}),
        Op("gc", ["gc", "--image-root", str(root)], {}),
    ]
    # "pull a" leads, building the base that all the others wait for.
    for op in ops[1:]:
        op.start_after = rng.uniform(0.2, 1.0)
    for op in rng.sample(ops[1:], rng.randint(0, 2)):
        op.kill = rng.choice(["group", "main"])
        op.kill_after = op.start_after + rng.uniform(0.05, 2.5)
    if rng.random() < 0.5:              # often while the others wait for its base layer
        ops[0].kill = rng.choice(["group", "main"])
        ops[0].kill_after = rng.uniform(1.0, 1.8)
    return ops


def _watch(path: Path, stop: threading.Event, misses: list[int]) -> None:
    """Count the moments at which ``path`` cannot be found (a machine without its tree)."""
    while not stop.is_set():
        if not os.path.exists(path):
            misses[0] += 1
        time.sleep(0.0005)


def _run_round(ops: list[Op], root: Path) -> None:
    started = time.monotonic()
    deadline = started + HANG
    to_start, to_kill = list(ops), [op for op in ops if op.kill]
    while to_start or to_kill:
        now = time.monotonic() - started
        for op in [op for op in to_start if op.start_after <= now]:
            op.proc = DkrProcess(*op.args)
            to_start.remove(op)
        for op in [op for op in to_kill if op.proc and op.kill_after <= now]:
            if op.kill == "group":
                op.proc.kill_group(signal.SIGKILL)
            else:
                op.proc.signal(signal.SIGKILL)
            to_kill.remove(op)
        time.sleep(0.005)
    try:
        for op in ops:
            op.result = op.proc.finish(max(1, deadline - time.monotonic()))
    except Exception:
        locks = Path("/proc/locks").read_text()
        for op in ops:
            op.proc.stop()
        raise AssertionError(f"an operation hung; /proc/locks:\n{locks}") from None
    for op in ops:
        # Whatever a killed dkr started dies with it, not once its work is done.
        left = wait_gone(lambda: session_pids(op.proc.pid), timeout=3)
        assert left == [], f"{op.name}: processes outlived dkr: {left}"


def _check_ops(ops: list[Op]) -> None:
    for op in ops:
        rc, err = op.result
        assert "Traceback" not in err, f"{op.name}:\n{err}"
        if op.kill:
            assert len(error_lines(err)) <= 1, f"{op.name}:\n{err}"
            continue
        assert rc == 0, f"{op.name} (not killed) failed ({rc}):\n{err}"


def _check_machines(root: Path, allowed: dict[str, set[str]], oracle: dict) -> None:
    """Every machine present is whole, and one of the images it may come from."""
    records = root / ".dkr" / "machines"
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or entry.name.endswith(".nspawn"):   # (its settings)
            continue
        record = json.loads((records / f"{entry.name}.json").read_text())
        repo = record["reference"].split("/", 1)[1].rsplit(":", 1)[0]
        assert repo in allowed.get(entry.name, {repo}), (entry.name, repo)
        problems = diff_trees(oracle[repo], tree_snapshot(entry, include_root=False),
                              f"umoci {repo}", f"dkr {entry.name}")
        assert problems == [], f"{entry.name} is not whole:\n" + "\n".join(problems[:20])
        for key in record["layers"]:
            assert (root / f".dkr-{key}").is_dir(), f"{entry.name} names missing layer {key}"
    check_layers_complete(root)


def _setup_round(host: str, root: Path, backend: str) -> None:
    common = ["--insecure", "--image-root", root, "--backend", backend]
    for repo, local in (("stress/a", "old"), ("stress/b", "doomed")):
        run = run_dkr("pull", *common, f"{host}/{repo}", local)
        assert run.rc == 0, run.err


@pytest.mark.parametrize("backend", ["dir", "overlay", "btrfs"])
def test_many_processes_on_one_image_root(registry, oracle, proxy, backend, tmp_path):
    rng = random.Random(f"{SEED}-{backend}")
    with backend_mount(backend) as mount:
        for round_ in range(ROUNDS):
            root = (mount or tmp_path) / f"round{round_}"
            # Set up from the registry itself: only the round goes through the throttle.
            _setup_round(registry.host, root, backend)
            ops = _round_ops(rng, proxy.host, root, tmp_path / f"batch{round_}", backend)
            stop, misses = threading.Event(), [0]
            watcher = threading.Thread(target=_watch, args=(root / "old" / "etc" / "base", stop,
                                                             misses))
            watcher.start()
            try:
                _run_round(ops, root)
            finally:
                stop.set()
                watcher.join()
            what = ", ".join(f"{op.name} killed ({op.kill}) at {op.kill_after:.2f}s"
                             for op in ops if op.kill) or "nothing killed"
            _check_ops(ops)
            assert misses[0] == 0, f"'old' went missing {misses[0]} times ({what})"
            allowed = {local: repos for op in ops for local, repos in op.machines.items()}
            _check_machines(root, allowed, oracle)
            removed = [op for op in ops if op.gone and not op.kill]
            for op in removed:
                assert not any(os.path.lexists(root / local) for local in op.gone), what

            # The next runs finish what was killed; then nothing temporary is left.
            for op in ops:
                if op.kill:
                    for again in _again(op, root, proxy.host, backend):
                        assert again.rc == 0, f"{op.name} again after {what}:\n{again.err}"
            gc = run_dkr("gc", "--image-root", root)
            assert gc.rc == 0, gc.err
            _check_machines(root, allowed, oracle)
            for local in ("a1", "b1", "c1", "c2", "old"):
                assert (root / local / "etc" / "which").exists(), (local, what)
            assert not os.path.lexists(root / "doomed"), what
            assert temp_entries(root) == [], (temp_entries(root), what)
            assert spool_files(root) == [], what
            _teardown_round(root)


def _again(op: Op, root: Path, host: str, backend: str) -> list:
    """What a user does after ``op`` was killed: finish what it did not do."""
    if op.name == "force":
        return [run_dkr(*op.args)]
    if op.gone:
        left = [local for local in op.gone if os.path.lexists(root / local)]
        return [run_dkr("remove", "--image-root", root, *left)] if left else []
    if op.name == "gc":
        return [run_dkr(*op.args)]
    # A pull: each machine it did not make (one it made is not pulled again).
    return [run_dkr("pull", "--insecure", "--image-root", root, "--backend", backend,
                    f"{host}/{repo}", local)
            for local, (repo,) in op.machines.items() if not os.path.lexists(root / local)]


def _teardown_round(root: Path) -> None:
    machines = [p.name for p in root.iterdir()
                if not p.name.startswith(".") and not p.name.endswith(".nspawn")]
    if machines:
        run = run_dkr("remove", "--image-root", root, *machines)
        assert run.rc == 0, run.err
    run = run_dkr("gc", "--image-root", root)
    assert run.rc == 0, run.err
