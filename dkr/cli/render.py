"""Renderers of dkr's events (see ``dkr.events``): log lines, progress lines off a
terminal, JSON lines, the --stats table. (The live display is ``dkr.cli.progress_view``.)"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Callable, TextIO

log = logging.getLogger("dkr")


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _size_note(size: int | None) -> str:
    return f" ({_mb(size)})" if size else ""


WAITING_FOR = {"spool": "for room in the spool", "parent": "for its parent layer",
               "image": "for another image's pull of it",
               "link": "for the layers needed first to download"}


def phase_text(fields: dict) -> str:
    """A layer's phase in words: ``waiting for its parent layer``, ``downloading`` …"""
    if fields["phase"] == "waiting":
        return f"waiting {WAITING_FOR.get(fields.get('waiting_for'), '')}".rstrip()
    return fields["phase"]


def _phase_line(f: dict) -> str | None:
    if f["phase"] == "reused":
        return f"Layer {f['layer']} already exists, skipping."
    if f["phase"] in ("done", "failed"):   # (the layer-done line says it, with its sizes;
        return None                       # the error line, what failed)
    if f["phase"] == "downloading" and f.get("bytes"):
        return f"Layer {f['layer']} downloading, resumed at {_mb(f['bytes'])} of {_mb(f['total'])}."
    if f["phase"] == "downloading":
        return f"Layer {f['layer']} downloading{_size_note(f.get('total'))}."
    return f"Layer {f['layer']} {phase_text(f)}."


_LINES: dict[str, Callable[[dict], str | None]] = {
    "backend": lambda f: f"Using {f['why']}.",
    "resolved": lambda f: (f"Resolved {f['resolved']} to {f['digest']} "
                           f"({f['platform']}, {f['layers']} layers"
                           + (f", {_mb(f['size'])}" if f.get("size") else "")
                           + (f", from index {f['index_digest']}" if f.get("index_digest") else "")
                           + ")."),
    "phase": _phase_line,
    "layer-done": lambda f: (f"Layer {f['layer']} done "
                             f"({_mb(f['size'])} → {_mb(f['tar_bytes'])} unpacked)."),
    "machine": lambda f: (
        f"Replaced machine {f['local']} ({f['replaced']} → {f['digest']}) in {f['path']}"
        + ("; the changes made in it are discarded." if f.get("discarded") else ".")
        if f.get("replaced") else f"Created machine {f['local']} in {f['path']}."),
    "up-to-date": lambda f: f"Machine {f['local']} is up to date ({f['digest']}).",
    # (an image found up to date said so already)
    "done": lambda f: None if f.get("up_to_date") else
    f"Pulled {f['resolved']} as {f['local']} in {f['seconds']:.2f} s.",
}


class LogLines:
    """A log line per event worth one; ``phases``: also a line per layer and phase
    (where no live display shows them). Each names its image (see ``image_prefix``)."""

    def __init__(self, phases: bool = True):
        self.skip = set() if phases else {"phase", "layer-done"}

    def __call__(self, kind: str, fields: dict) -> None:
        line = _LINES.get(kind) if kind not in self.skip else None
        text = line(fields) if line is not None else None
        if text is not None:
            log.info(text, extra={"image": fields.get("local")})


log_renderer = LogLines()


class ImageTally:
    """One image's layers as its phase and progress events tell them: the bytes
    still to fetch (reused layers and those another image builds are left out)."""

    def __init__(self, count: int = 0):
        self.count = count
        self.layers: dict[str, dict] = {}     # short id -> its last phase/progress fields

    def update(self, fields: dict) -> None:
        self.layers[fields["layer"]] = fields

    def _fetched(self):
        return [f for f in self.layers.values()
                if f["phase"] != "reused" and f.get("waiting_for") != "image"]

    @property
    def bytes(self) -> int:
        return sum(f["total"] if f["phase"] == "done" else f["bytes"] for f in self._fetched())

    @property
    def total(self) -> int:
        return sum(f["total"] for f in self._fetched())

    @property
    def finished(self) -> int:
        return sum(f["phase"] in ("done", "reused") for f in self.layers.values())


class PlainProgress:
    """Off a terminal: a line per image at most every ``interval`` seconds while its
    downloads run (bytes, rate, layers done)."""

    def __init__(self, interval: float = 5.0, clock=time.monotonic):
        self.interval = interval
        self.clock = clock
        self.images: dict[str | None, tuple[ImageTally, list]] = {}   # [time, bytes] of last line

    def __call__(self, kind: str, fields: dict) -> None:
        local = fields.get("local")
        if kind == "resolved":
            self.images[local] = (ImageTally(fields["layers"]), [self.clock(), 0])
        elif kind in ("done", "error"):
            self.images.pop(local, None)
        elif kind in ("phase", "progress") and local in self.images:
            tally, last = self.images[local]
            tally.update(fields)
            now = self.clock()
            if kind == "progress" and now - last[0] >= self.interval:
                rate = (tally.bytes - last[1]) / (now - last[0])
                log.info("Downloaded %s of %s, %s/s; %d of %d layers done.",
                         _mb(tally.bytes), _mb(tally.total), _mb(rate), tally.finished,
                         tally.count, extra={"image": local})
                last[:] = [now, tally.bytes]


class JsonRenderer:
    """One JSON object per line: for scripts and CI logs."""

    def __init__(self, stream: TextIO = sys.stdout):
        self.stream = stream

    def __call__(self, kind: str, fields: dict) -> None:
        self.stream.write(json.dumps({"event": kind, "time": round(time.time(), 3), **fields}) + "\n")
        self.stream.flush()


class StatsRenderer:
    """``--stats``: where the bytes and the seconds went, summed over a run."""

    def __init__(self, stream: TextIO = sys.stderr):
        self.stream = stream
        self.started = time.monotonic()
        self.compressed = self.unpacked = self.layers = self.spooled = self.pauses = 0
        self.download = self.prepare = self.extract = self.commit = self.machine = 0.0
        self.first_download_done: float | None = None
        # (host, is a mirror): [requests served, bytes, requests failed]
        self.sources: dict[tuple[str, bool], list[int]] = {}
        self.last_download_done = 0.0

    def __call__(self, kind: str, fields: dict) -> None:
        now = time.monotonic()
        if kind == "download-done":
            self.compressed += fields["size"]
            self.spooled += fields.get("spooled", 0)
            self.pauses += fields.get("pauses", 0)
            self.download += fields["seconds"]
            self.last_download_done = now
        elif kind == "layer-done":
            self.layers += 1
            self.unpacked += fields["tar_bytes"]
            self.prepare += fields.get("prepare_seconds", 0.0)
            self.extract += fields.get("extract_seconds", 0.0)
            self.commit += fields.get("commit_seconds", 0.0)
        elif kind in ("source", "source-failed"):
            counts = self.sources.setdefault((fields["source"], fields["mirror"]), [0, 0, 0])
            if kind == "source":
                counts[0] += 1
                counts[1] += fields["bytes"]
            else:
                counts[2] += 1
        elif kind == "machine":
            self.machine += fields.get("seconds", 0.0)

    def summary(self) -> str:
        wall = time.monotonic() - self.started
        network = (self.last_download_done - self.started) if self.compressed else 0.0

        def rate(n: int, seconds: float) -> str:
            return f"{n / seconds / 1e6:.0f} MB/s" if seconds > 0 else "-"

        def share(seconds: float) -> str:
            return f"{100 * seconds / wall:.0f}%" if wall > 0 else "-"
        return "\n".join([
            f"Stats: {self.layers} layers, {_mb(self.compressed)} compressed, "
            f"{_mb(self.unpacked)} unpacked, wall {wall:.2f} s "
            f"({rate(self.unpacked, wall)} of tar overall).",
            f"  network  {network:6.2f} s until the last blob was in "
            f"({rate(self.compressed, network)} compressed)",
            f"  spool    {_mb(self.spooled)} of the blobs written to the spool, the rest "
            f"streamed; extractors held transfers back {self.pauses} times",
            f"  prepare  {self.prepare:6.2f} s layer trees (snapshots/copies), {share(self.prepare)}",
            f"  extract  {self.extract:6.2f} s inflate+unpack, summed over layers "
            f"({rate(self.unpacked, self.extract)} of tar per extractor), {share(self.extract)}",
            f"  commit   {self.commit:6.2f} s seal+rename, {share(self.commit)}",
            f"  machine  {self.machine:6.2f} s making the machines, {share(self.machine)}",
        ] + [f"  source   {host} ({'mirror' if mirror else 'registry'}): {served} requests, "
             f"{_mb(size)}" + (f", {failed} failed" if failed else "")
             for (host, mirror), (served, size, failed) in self.sources.items()])

    def print(self) -> None:
        self.stream.write(self.summary() + "\n")
