"""What a pull shows while it runs: live lines on a terminal, plain lines off it,
nothing with -q, and --json progress a script can follow, over a slow link."""

from __future__ import annotations

import os
import re
import time
from collections import defaultdict

import pexpect
import pytest
from helpers import DKR, ELSEWHERE, assert_ok, run_dkr

from dkr.testing import images
from dkr.testing.faultproxy import FaultProxy
from dkr.testing.images import File, Image, Layer

LAYER_BYTES = 1_200_000
RATE = 200_000            # bytes per second of each request through the proxy
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def slow_image(registry):
    """Three layers of incompressible bytes (gzip keeps them at their size)."""
    layers = [Layer([File(f"data/{n}", os.urandom(LAYER_BYTES))]) for n in range(3)]
    images.push_image(registry, "progress/slow", "latest", Image(layers))
    shared = Layer([File("shared", os.urandom(LAYER_BYTES))])
    for name in ("one", "two"):
        top = Layer([File(name, os.urandom(LAYER_BYTES // 2))])
        images.push_image(registry, f"progress/{name}", "latest", Image([shared, top]))
    return [layer.digest for layer in layers]


@pytest.fixture
def slow_proxy(registry):
    host, port = registry.host.split(":")
    with FaultProxy(host, int(port)) as proxy:
        proxy.add_fault("/blobs/sha256:", "slow", times=None, rate=RATE)
        yield proxy


def _short(digest: str) -> str:
    return digest.split(":")[1][:12]


def _pull_args(proxy, image_root, *extra) -> list[str]:
    return ["pull", "--insecure", "--image-root", str(image_root), "--backend", "dir",
            *extra, f"{proxy.host}/progress/slow", "slow"]


def _spawn(args: list[str], columns: int = 100) -> pexpect.spawn:
    """dkr on a pseudo-terminal."""
    return pexpect.spawn(DKR, args, cwd=ELSEWHERE, encoding="utf-8", timeout=120,
                         dimensions=(30, columns), env={**os.environ, "TERM": "xterm"})


def _on_terminal(args: list[str], status: int = 0, columns: int = 100) -> str:
    """All that dkr, run on a pseudo-terminal, wrote there; it exits with ``status``."""
    child = _spawn(args, columns)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == status, child.before
    return child.before


def _screen_of(written: str) -> str:
    screen = Screen()
    screen.feed(written)
    return screen.text


class Screen:
    """Just enough of a terminal to tell what stays on it: text, CR/LF, and the
    cursor and erase sequences a live display uses."""

    def __init__(self):
        self.lines = [""]
        self.row = self.column = 0

    def feed(self, text: str) -> None:
        for token in re.split(r"(\x1b\[[0-9;?]*[A-Za-z]|\r|\n)", text):
            if token == "\n":
                self.row += 1
                self.column = 0
                if self.row == len(self.lines):
                    self.lines.append("")
            elif token == "\r":
                self.column = 0
            elif token.startswith("\x1b["):
                self._control(token[2:-1], token[-1])
            elif token:
                line = self.lines[self.row].ljust(self.column)
                self.lines[self.row] = line[:self.column] + token + line[self.column + len(token):]
                self.column += len(token)

    def _control(self, params: str, final: str) -> None:
        count = int(params) if params.isdigit() else 1
        if final == "A":
            self.row = max(0, self.row - count)
        elif final == "B":
            self.row = min(len(self.lines) - 1, self.row + count)
        elif final == "G":
            self.column = count - 1
        elif final == "K":
            keep = self.lines[self.row][:self.column] if params in ("", "0") else ""
            self.lines[self.row] = keep
        # (colours, cursor shown or hidden: nothing that stays)

    @property
    def text(self) -> str:
        return "\n".join(line.rstrip() for line in self.lines).strip()


def test_live_lines_on_a_terminal_come_and_go(slow_image, slow_proxy, image_root):
    written = _on_terminal(_pull_args(slow_proxy, image_root))
    seen = ANSI.sub("", written)
    for digest in slow_image:
        assert re.search(rf"{_short(digest)} downloading .*\d+\.\d+/\d+\.\d+ MB", seen), seen
    assert re.search(r"slow: \d/3 layers", seen) and re.search(r"\d kB/s", seen), seen
    # What stays: the log lines, not one live line.
    screen = _screen_of(written)
    assert not any(_short(digest) in screen for digest in slow_image), screen
    assert "layers" not in screen.replace("3 layers", ""), screen
    assert re.search(r"Pulled .*progress/slow:latest as slow in", screen), screen
    assert (image_root / "slow" / "data" / "2").stat().st_size == LAYER_BYTES


def test_warnings_meanwhile_are_whole_lines_above_the_live_ones(slow_image, slow_proxy,
                                                                image_root):
    slow_proxy.add_fault(f"/blobs/{slow_image[1]}", "status", code=503, times=1)
    # (wide enough for the warning: a narrower terminal shows it wrapped)
    screen = _screen_of(_on_terminal(_pull_args(slow_proxy, image_root), columns=200))
    [warning] = [line for line in screen.splitlines() if "trying again" in line]
    assert re.fullmatch(rf"layer {slow_image[1]}: .*503.*; trying again in .*\)\.", warning), \
        screen


def test_quiet_shows_nothing_on_a_terminal(slow_image, slow_proxy, image_root):
    written = _on_terminal(_pull_args(slow_proxy, image_root, "-q"))
    assert written.strip() == "", written
    assert (image_root / "slow" / "data" / "0").exists()


def test_plain_lines_off_a_terminal(slow_image, slow_proxy, image_root):
    began = time.monotonic()
    run = assert_ok(run_dkr(*_pull_args(slow_proxy, image_root)))
    took = time.monotonic() - began
    assert "\x1b" not in run.err
    for digest in slow_image:
        layer = _short(digest)
        assert re.search(rf"^Layer {layer} downloading \(1\.2 MB\)\.$", run.err, re.M), run.err
        assert re.search(rf"^Layer {layer} committing\.$", run.err, re.M), run.err
        assert re.search(rf"^Layer {layer} done \(1\.2 MB → 1\.2 MB unpacked\)\.$",
                         run.err, re.M), run.err
    # 3 x 1.2 MB at 0.2 MB/s a connection: over 5 s, so at least one progress line,
    # and at most one per 5 s.
    progress = re.findall(r"^Downloaded (\d+\.\d) MB of 3\.6 MB, .* MB/s; \d of 3 layers done\.$",
                          run.err, re.M)
    assert 1 <= len(progress) <= took / 5, (took, run.err)


def test_quiet_off_a_terminal_says_nothing(slow_image, registry, image_root):
    run = assert_ok(run_dkr("pull", "--insecure", "--image-root", image_root, "--backend",
                            "dir", "-q", f"{registry.host}/progress/one"))
    assert run.err == ""


def test_json_batch_follows_each_image(slow_image, slow_proxy, image_root, tmp_path):
    listing = tmp_path / "images.txt"
    listing.write_text(f"{slow_proxy.host}/progress/one\n{slow_proxy.host}/progress/two 2nd\n")
    run = assert_ok(run_dkr("pull", "--insecure", "--image-root", image_root, "--backend",
                            "dir", "--json", "--batch", listing))
    events = run.events                     # (each checked against the schema)
    *lines, summary = run.err.splitlines()
    assert lines and all(line.startswith(("one: ", "2nd: ")) for line in lines), run.err
    assert summary == "Pulled 2 of 2 images.", run.err
    wanted = {"one": f"{slow_proxy.host}/progress/one", "2nd": f"{slow_proxy.host}/progress/two"}
    assert {(e["local"], e["reference"]) for e in events} == set(wanted.items())
    for local in wanted:
        mine = [e for e in events if e["local"] == local]
        assert mine[-1]["event"] == "done", mine[-1]
        phases = defaultdict(list)
        for e in mine:
            if e["event"] == "phase":
                phases[e["layer"]].append(e["phase"])
        assert len(phases) == 2 and all(p[-1] in ("done", "reused") for p in phases.values()), phases
        # Every layer named the same way in every event: 12 hex of its blob digest.
        for e in mine:
            if "layer" in e:
                assert e["layer"] == e["digest"].split(":")[1][:12], e
    progress = defaultdict(list)
    for e in events:
        if e["event"] == "progress":
            progress[e["local"], e["layer"]].append(e)
    assert progress, "no progress events"
    for (local, layer), told in progress.items():
        assert [e["bytes"] for e in told] == sorted(e["bytes"] for e in told), told
        assert told[-1]["bytes"] == told[-1]["total"], told[-1]
        span = told[-1]["time"] - told[0]["time"]
        assert len(told) <= 3 * span + 3, f"{len(told)} progress events in {span:.1f} s"
    # The layer both images share was fetched once: the image that did not fetch it
    # waited for the other's pull of it.
    waiting = [e for e in events if e["event"] == "phase" and e.get("waiting_for") == "image"]
    builds = [e for e in events if e["event"] == "layer-start"]
    assert len(builds) == 3 and len(waiting) <= 1, (builds, waiting)


def _kept_lines_then_error(screen: str, layers: list[str]) -> str:
    """The live lines left as they were, the error line under them; the error line."""
    lines = screen.splitlines()
    assert lines[-1].startswith("dkr: error: "), screen
    assert re.search(r"^slow: \d/3 layers .* \d+\.\d/3\.6 MB", "\n".join(lines[:-1]), re.M), screen
    kept = [line for line in lines[:-1] if any(layer in line for layer in layers)]
    assert kept and all(re.search(r"\d+\.\d/1\.2 MB", line) for line in kept), screen
    return lines[-1]


def test_lines_stay_on_a_failure(slow_image, slow_proxy, image_root):
    slow_proxy.add_fault(f"/blobs/{slow_image[2]}", "status", code=404, times=None)
    slow_proxy.add_fault(f"/blobs/{slow_image[2]}", "slow", times=None, rate=RATE)
    written = _on_terminal(_pull_args(slow_proxy, image_root, "--retries", "0"), status=1)
    screen = _screen_of(written)
    # (the layers below the one that failed were built meanwhile: their lines went)
    error = _kept_lines_then_error(screen, [_short(slow_image[2])])
    assert slow_image[2] in error


def test_lines_stay_on_ctrl_c(slow_image, slow_proxy, image_root):
    child = _spawn(_pull_args(slow_proxy, image_root))
    child.expect(r"0\.[2-9]/1\.2 MB")        # well into the downloads
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130, child.before
    screen = _screen_of(child.before)
    error = _kept_lines_then_error(screen, [_short(d) for d in slow_image])
    assert error == "dkr: error: interrupted by SIGINT"
    assert "downloading" in screen


def test_a_layer_waiting_for_its_turn_says_so(slow_image, registry, image_root):
    run = assert_ok(run_dkr(*_pull_args(registry, image_root, "--json", "--spool-limit", "1")))
    phases = defaultdict(list)
    for e in run.events:
        if e["event"] == "phase":
            phases[e["layer"]].append((e["phase"], e.get("waiting_for")))
    first, *later = [_short(digest) for digest in slow_image]
    assert phases[first][0] == ("downloading", None), phases
    # Each waits, for the link (the layer below it downloads first: it is built
    # first) or for room in the spool (where it would run ahead), and says so.
    for layer in later:
        waited, began = phases[layer][:2]
        assert waited in (("waiting", "spool"), ("waiting", "link")), phases
        assert began == ("downloading", None), phases
        assert phases[layer][-1] == ("done", None), phases
    assert re.search(rf"^Layer {later[0]} waiting for (room in the spool|the layers "
                     r"needed first to download)\.$", run.err, re.M), run.err


def test_a_batch_on_a_terminal_has_lines_per_image(slow_image, slow_proxy, image_root, tmp_path):
    listing = tmp_path / "images.txt"
    listing.write_text(f"{slow_proxy.host}/progress/one\n{slow_proxy.host}/progress/two 2nd\n")
    written = _on_terminal(["pull", "--insecure", "--image-root", str(image_root), "--backend",
                            "dir", "--batch", str(listing)])
    seen = ANSI.sub("", written)
    for local in ("one", "2nd"):
        assert re.search(rf"^{local}: \d/2 layers ", seen, re.M), seen
        # Each layer line names its image too.
        assert re.search(rf"^  {local} [0-9a-f]{{12}} downloading ", seen, re.M), seen
    screen = _screen_of(written)
    assert not re.search(r"\d/2 layers", screen) and "downloading" not in screen, screen
    assert re.search(r"^2nd: Pulled .*progress/two:latest as 2nd in", screen, re.M), screen
    assert screen.splitlines()[-1] == "Pulled 2 of 2 images.", screen


def test_a_batch_image_that_fails_on_a_terminal_says_so_at_once(slow_image, slow_proxy,
                                                                  image_root, tmp_path):
    listing = tmp_path / "images.txt"
    listing.write_text(f"{slow_proxy.host}/progress/one\n{slow_proxy.host}/progress/nosuch gone\n")
    written = _on_terminal(["pull", "--insecure", "--image-root", str(image_root), "--backend",
                            "dir", "--batch", str(listing)], status=1)
    seen = ANSI.sub("", written)
    # The error comes while the other image still downloads, whose lines go on after it.
    assert seen.index("dkr: error: ") < seen.index("one: Pulled "), seen
    assert re.search(r"dkr: error: .*progress/nosuch[^\n]*\n(.|\n)*one: 1/2 layers", seen), seen
    screen = _screen_of(written)
    assert not re.search(r"\d/2 layers", screen) and "downloading" not in screen, screen
    assert re.search(r"^dkr: error: .*progress/nosuch", screen, re.M), screen
    assert screen.splitlines()[-1] == "Pulled 1 of 2 images; 1 failed: gone.", screen


def test_a_resumed_download_starts_at_the_bytes_spooled_before(slow_image, registry,
                                                                image_root):
    host, port = registry.host.split(":")
    with FaultProxy(host, int(port)) as proxy:
        proxy.add_fault(f"/blobs/{slow_image[2]}", "truncate_after", bytes=700_000)
        failed = run_dkr(*_pull_args(proxy, image_root, "--retries", "0"))
        assert failed.rc == 1, failed.err
        run = assert_ok(run_dkr(*_pull_args(proxy, image_root, "--json")))
    layer = _short(slow_image[2])
    first = next(e for e in run.events if e["event"] == "phase" and e["layer"] == layer
                 and e["phase"] == "downloading")
    assert first["bytes"] == 700_000, first
    assert re.search(rf"^Layer {layer} downloading, resumed at 0\.7 MB of 1\.2 MB\.$", run.err,
                     re.M), run.err
