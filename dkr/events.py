"""One event sink for everything a pull has to say.

The engine emits facts (``resolved``, ``layer-start``, ``progress``,
``layer-done``, ``skipped``, ``done``, ``error`` …) with keyword fields;
renderers turn them into log lines, JSON lines or progress bars. A renderer
is any callable ``(kind, fields)``; the command's own are in ``dkr.cli.render``.
"""

from __future__ import annotations

from typing import Callable

Renderer = Callable[[str, dict], None]


class Events:
    def __init__(self, renderers: list[Renderer] | None = None):
        self.renderers = list(renderers or [])

    def emit(self, kind: str, /, **fields) -> None:
        for render in self.renderers:
            render(kind, fields)
