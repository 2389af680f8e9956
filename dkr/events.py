"""One event sink for everything a pull has to say.

The engine emits facts (``resolved``, ``layer-start``, ``progress``,
``layer-done``, ``skipped``, ``done``, ``error`` …) with keyword fields;
renderers turn them into log lines, JSON lines or progress bars. A renderer
is any callable ``(kind, fields)``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Callable, TextIO

Renderer = Callable[[str, dict], None]
log = logging.getLogger("dkr")


class Events:
    def __init__(self, renderers: list[Renderer] | None = None):
        self.renderers = list(renderers or [])

    def emit(self, kind: str, **fields) -> None:
        for render in self.renderers:
            render(kind, fields)


def _short(digest: str) -> str:
    return digest.split(":", 1)[-1][:12]


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


_LINES: dict[str, Callable[[dict], str]] = {
    "backend": lambda f: f"Using {f['why']}.",
    "resolved": lambda f: (f"Resolved {f['reference']} to {f['digest']} "
                           f"({f['platform']}, {f['layers']} layers)."),
    "skipped": lambda f: f"Layer {_short(f['chain_id'])} already exists, skipping.",
    "layer-start": lambda f: (f"Downloading layer {f['index']}/{f['count']} "
                              f"{_short(f['digest'])} ({_mb(f['size'])})."),
    "layer-done": lambda f: (f"Layer {_short(f['chain_id'])} committed "
                             f"({_mb(f['size'])} → {_mb(f['tar_bytes'])} unpacked)."),
    "machine": lambda f: f"Created machine {f['local']} in {f['path']}.",
    "done": lambda f: f"Pulled {f['reference']} as {f['local']} in {f['seconds']:.2f} s.",
}


def log_renderer(kind: str, fields: dict) -> None:
    line = _LINES.get(kind)
    if line is not None:
        log.info(line(fields))


class JsonRenderer:
    """One JSON object per line: for scripts and CI logs."""

    def __init__(self, stream: TextIO = sys.stdout):
        self.stream = stream

    def __call__(self, kind: str, fields: dict) -> None:
        self.stream.write(json.dumps({"event": kind, "time": round(time.time(), 3), **fields}) + "\n")
        self.stream.flush()
