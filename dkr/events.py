"""One event sink for everything a pull has to say.

The engine emits facts (``resolved``, ``phase``, ``progress``, ``layer-done``,
``skipped``, ``done``, ``error`` …) with keyword fields; renderers turn them
into log lines, JSON lines or progress bars. A renderer is any callable
``(kind, fields)``; the command's own are in ``dkr.cli.render``. What each
event carries is written down in docs/events.md.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Callable

Renderer = Callable[[str, dict], None]

# Fields every event emitted on behalf of one image carries (its ``local`` and
# ``reference``). A context variable: each image of a batch is pulled by a task
# of its own, and the tasks it starts (its downloads) inherit its fields.
_bound: ContextVar[dict] = ContextVar("dkr_event_fields", default={})


def bound_fields() -> dict:
    """The fields ``Events.bind`` added for the task that runs now."""
    return _bound.get()


class Events:
    def __init__(self, renderers: list[Renderer] | None = None):
        self.renderers = list(renderers or [])

    def emit(self, kind: str, /, **fields) -> None:
        """Tell every renderer; fields given here win over bound ones."""
        bound = _bound.get()
        if bound:
            fields = {**bound, **fields}
        for render in self.renderers:
            render(kind, fields)

    def bind(self, **fields) -> None:
        """Add ``fields`` to every event emitted from now on by the running task and
        the tasks it starts (not by the one that started it)."""
        _bound.set({**_bound.get(), **fields})
