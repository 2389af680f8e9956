"""Renderers of dkr's events (see ``dkr.events``): log lines, JSON lines, the --stats table."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Callable, TextIO

log = logging.getLogger("dkr")


def _short(digest: str) -> str:
    return digest.split(":", 1)[-1][:12]


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _size_note(size: int | None) -> str:
    return f" ({_mb(size)})" if size else ""


_LINES: dict[str, Callable[[dict], str]] = {
    "backend": lambda f: f"Using {f['why']}.",
    "resolved": lambda f: (f"Resolved {f['reference']} to {f['digest']} "
                           f"({f['platform']}, {f['layers']} layers"
                           + (f", from index {f['index_digest']}" if f.get("index_digest") else "")
                           + ")."),
    "skipped": lambda f: f"Layer {_short(f['chain_id'])} already exists, skipping.",
    "layer-start": lambda f: (f"Extracting layer {f['index']}/{f['count']} "
                              f"{_short(f['digest'])}{_size_note(f.get('size'))}."),
    "layer-done": lambda f: (f"Layer {_short(f['chain_id'])} committed "
                             f"({_mb(f['size'])} → {_mb(f['tar_bytes'])} unpacked)."),
    "machine": lambda f: (
        f"Replaced machine {f['local']} ({f['replaced']} → {f['digest']}) in {f['path']}"
        + ("; the changes made in it are discarded." if f.get("discarded") else ".")
        if f.get("replaced") else f"Created machine {f['local']} in {f['path']}."),
    "up-to-date": lambda f: f"Machine {f['local']} is up to date ({f['digest']}).",
    # (an image found up to date said so already)
    "done": lambda f: None if f.get("up_to_date") else
    f"Pulled {f['reference']} as {f['local']} in {f['seconds']:.2f} s.",
}


def log_renderer(kind: str, fields: dict) -> None:
    line = _LINES.get(kind)
    text = line(fields) if line is not None else None
    if text is not None:
        log.info(text)


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
