"""Shared helpers for the test suite: run the real CLI, check clean failures."""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import types
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

TIMEOUT = 300


@dataclass
class Run:
    rc: int
    out: str
    err: str

    @property
    def events(self) -> list[dict]:
        """The --json events on stdout, each checked against the documented schema."""
        return [checked_event(json.loads(line)) for line in self.out.splitlines()
                if line.startswith("{")]


@functools.cache
def _event_validators() -> dict:
    import jsonschema
    from importlib.resources import files
    schema = json.loads(files("dkr").joinpath("data/events.schema.json").read_text())
    return {kind: jsonschema.Draft202012Validator(each) for kind, each in schema["events"].items()}


def checked_event(event: dict) -> dict:
    """``event``, a --json line of dkr's, once it is found as docs/events.md describes it."""
    validators = _event_validators()
    assert event.get("event") in validators, f"an event the schema does not know: {event}"
    errors = list(validators[event["event"]].iter_errors(event))
    assert not errors, f"{event['event']} event against its schema: {errors[0].message}: {event}"
    return event


# The installed command, run from a directory of its own: a user's working
# directory has no dkr sources in it (the checkout's must not stand in for them).
DKR = str(Path(sys.executable).parent / "dkr")
ELSEWHERE = tempfile.mkdtemp(prefix="dkr-test-cwd-")


def run_dkr(*args, env=None, timeout=TIMEOUT, input=None, cwd=ELSEWHERE) -> Run:
    """The CLI as a user runs it: the installed command, real stdout/stderr."""
    proc = subprocess.run([DKR, *map(str, args)], capture_output=True, cwd=cwd,
                          text=True, timeout=timeout, env=env, input=input)
    return Run(proc.returncode, proc.stdout, proc.stderr)


def interpreter_with_site_hook(where: Path, hook: str) -> Path:
    """A Python that runs the installed dkr and, first thing in every process, ``hook``
    (from a ``.pth`` file of its own installation): dkr's child processes ignore
    PYTHONPATH and the working directory, so a test reaches into them the way an
    installation would. (Not a sitecustomize: Debian's own comes first.)"""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    [site] = (where / "lib").glob("python3*/site-packages")
    installed = sysconfig.get_paths()["purelib"]
    (site / "installed.pth").write_text(f"import site; site.addsitedir({installed!r})\n")
    (site / "dkr_test_hook.py").write_text(hook)
    (site / "zz-dkr-test-hook.pth").write_text("import dkr_test_hook\n")
    return where / "bin" / "python"


def pull(registry, repo_ref: str, root: Path, *extra, local=None) -> Run:
    args = ["pull", "--insecure", "--image-root", root, *extra, f"{registry.host}/{repo_ref}"]
    if local:
        args.append(local)
    return run_dkr(*args)


def temp_entries(root: Path) -> list[str]:
    if not root.exists():
        return []
    found = [p.name for p in root.iterdir() if ".tmp-" in p.name]
    meta = root / ".dkr"
    if meta.exists():
        found += [str(p.relative_to(root)) for p in meta.rglob("*.tmp-*")]
    return found


def assert_clean_failure(run: Run, root: Path, pattern: str, local: str | None = None) -> None:
    """One ``dkr: error:`` line matching ``pattern``, non-zero exit, nothing half-made."""
    assert run.rc != 0, f"expected failure, got success:\n{run.err}"
    errors = [line for line in run.err.splitlines() if line.startswith("dkr: error: ")]
    assert len(errors) == 1, f"want exactly one error line:\n{run.err}"
    assert "Traceback" not in run.err, run.err
    assert re.search(pattern, errors[0]), f"{errors[0]!r} does not match {pattern!r}"
    assert temp_entries(root) == [], temp_entries(root)
    if local:
        assert not os.path.lexists(root / local), f"{local} was left behind"


def assert_ok(run: Run) -> Run:
    assert run.rc == 0, f"dkr failed ({run.rc}):\n{run.err}"
    assert "Traceback" not in run.err, run.err
    return run


def assert_downloads_wait_for_extraction(run: Run, count: int) -> None:
    """With room in the spool for one blob: ``count`` downloads in layer order, at most
    one ahead of extraction: each done only after the layer two below it was
    extracted (from ``run``'s --json events)."""
    order = [(e["event"], e["digest"]) for e in run.events
             if e["event"] in ("download-done", "layer-extracted")]
    downloads = [d for kind, d in order if kind == "download-done"]
    assert len(downloads) == count
    for earlier, later in zip(downloads, downloads[2:]):
        assert order.index(("layer-extracted", earlier)) < order.index(("download-done", later)), \
            order


def layer_dirs(root: Path) -> list[Path]:
    """The committed layers of an image root (no temporary trees)."""
    return sorted(p for p in root.iterdir() if p.name.startswith(".dkr-") and ".tmp-" not in p.name)


def write_into_one_of_two(registry, repo: str, root: Path, more_writes=None) -> Path:
    """Pull the sample image as machines "one" and "two", write into "one", and check
    that neither the layers nor "two" changed. Returns "one"'s path."""
    from dkr.testing import images
    from dkr.testing.oracle import tree_snapshot
    images.push_image(registry, repo, "latest", images.sample_image())
    assert_ok(pull(registry, repo, root, local="one"))
    assert_ok(pull(registry, repo, root, local="two"))
    layers_before = {p.name: tree_snapshot(p) for p in layer_dirs(root)}
    two_before = tree_snapshot(root / "two")

    one = root / "one"
    (one / "etc" / "hostname").write_text("mine\n")
    (one / "new-file").write_bytes(b"new")
    os.unlink(one / "usr" / "bin" / "busybox")
    if more_writes:
        more_writes(one)

    assert {p.name: tree_snapshot(p) for p in layer_dirs(root)} == layers_before
    assert tree_snapshot(root / "two") == two_before
    return one


@contextmanager
def backend_registered_by_hand(backend, name: str):
    """``backend`` on dkr's plugin manager, registered as a program using the API
    would: only this process knows it."""
    from dkr import plugins
    from dkr.hookspecs import hookimpl
    plugin = types.SimpleNamespace(dkr_storage_backends=hookimpl(lambda: [backend]))
    plugins.manager().register(plugin, name)
    try:
        yield
    finally:
        plugins.manager().unregister(name=name)
        # It may have loaded an installed plugin that goes away with its test module:
        # later pulls in this process must not hand it to their servers.
        plugins.manager.cache_clear()


class _StorageHandler(http.server.SimpleHTTPRequestHandler):
    seen: list

    def do_GET(self):
        self.seen.append((self.path, self.headers.get("Authorization")))
        super().do_GET()

    def log_message(self, *args):
        pass


@contextmanager
def storage_server(registry, port: int, ssl_context=None):
    """Serves ``registry``'s storage directory on ``port``, as a bucket behind a CDN
    does for a registry that redirects blob GETs there (over TLS with
    ``ssl_context``). Yields the (path, Authorization) of each GET, as they come."""
    handler = type("Handler", (_StorageHandler,), {"seen": []})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", port), functools.partial(handler, directory=str(registry.storage)))
    if ssl_context is not None:
        server.socket = ssl_context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield handler.seen
    finally:
        server.shutdown()
        server.server_close()


def pip(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check",
                           "--no-input", *args], capture_output=True, text=True, timeout=120)


@contextmanager
def example_installed(package: Path, dist: str):
    """An example plugin package of tests/, pip-installed into this venv while the
    block runs: from a copy that has the examples' one build backend beside it."""
    with tempfile.TemporaryDirectory(prefix="dkr-example-") as tmp:
        copy = Path(tmp) / package.name
        shutil.copytree(package, copy)
        shutil.copy(Path(__file__).parent / "example_build_backend.py", copy / "build_backend.py")
        done = pip("install", "--no-build-isolation", "--no-deps", "--no-index", str(copy))
    assert done.returncode == 0, done.stdout + done.stderr
    try:
        yield
    finally:
        removed = pip("uninstall", "--yes", dist)
        assert removed.returncode == 0, removed.stdout + removed.stderr


def env_without_logins(tmp_path) -> dict:
    """An environment whose auth files hold nothing: a login comes from the command only."""
    env = {k: v for k, v in os.environ.items() if k not in ("REGISTRY_AUTH_FILE", "DOCKER_CONFIG")}
    env.update(HOME=str(tmp_path / "home"), XDG_RUNTIME_DIR=str(tmp_path / "run"),
               XDG_CONFIG_HOME=str(tmp_path / "config"), CONTAINERS_REGISTRIES_CONF=os.devnull)
    return env
