"""The live display of a pull on a terminal: a line per layer, one per image.

Drawn by rich (rich.progress on rich.live), which redraws the lines in place
from a thread of its own a few times a second, measures rates and ETAs, and
prints what else is written meanwhile (log lines, warnings) above them.
Lines of an image go away when it is done; on a failure or an interrupt the
display stops where it was, and stays.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, TaskID, TextColumn,
                           TimeRemainingColumn, TransferSpeedColumn)

from dkr.cli.render import ImageTally

# What a waiting layer waits for, in a word that fits a live line.
WAITING_FOR = {"spool": "spool", "parent": "parent", "image": "other image", "link": "its turn"}


class _Grouped(Progress):
    """Lines in the order image, its layers; then the next image."""

    def get_renderables(self):
        yield self.make_tasks_table(sorted(self.tasks, key=lambda task: task.fields["order"]))


class _Image:
    def __init__(self, task: TaskID, number: int, count: int):
        self.task = task
        self.number = number
        self.tally = ImageTally(count)
        self.layers: dict[str, TaskID] = {}
        self.added = 0                # layer lines so far: their order under the image


class LiveView:
    """A renderer of events that draws them, from ``start()`` to ``stop()``."""

    def __init__(self, stream: TextIO = sys.stderr, batch: bool = False):
        self.batch = batch
        self.console = Console(file=stream, highlight=False)
        self.progress = _Grouped(
            TextColumn("{task.description}", markup=False), BarColumn(bar_width=24),
            DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
            console=self.console, transient=True, redirect_stdout=False,
            redirect_stderr=True, refresh_per_second=8)
        self.images: dict[str | None, _Image] = {}
        self._handlers: list[tuple[logging.StreamHandler, TextIO]] = []

    # --- the display's life ------------------------------------------------------------
    def start(self) -> None:
        self.progress.start()
        # dkr's log handler holds the stream it was given: while the display runs,
        # its lines go through the console too (sys.stderr is rich's proxy now).
        for handler in logging.getLogger("dkr").handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is self.console.file:
                self._handlers.append((handler, handler.setStream(sys.stderr)))

    def stop(self, keep: bool) -> None:
        """End the display: its lines vanish, or (``keep``) stay as they were."""
        if not self.progress.live.is_started:
            return
        self.progress.live.transient = not keep
        self.progress.stop()
        for handler, stream in self._handlers:
            handler.setStream(stream)
        self._handlers.clear()

    # --- events ------------------------------------------------------------------------
    def __call__(self, kind: str, fields: dict) -> None:
        local = fields.get("local")
        if kind == "resolved":
            self._add_image(local, fields["layers"])
        elif kind in ("phase", "progress") and local in self.images:
            self._update_layer(self.images[local], local, fields)
        elif kind == "done" and local in self.images or \
                kind == "error" and self.batch and local in self.images:
            # (a batch image's error line says what failed; the others' lines go on)
            image = self.images.pop(local)
            for task in (image.task, *image.layers.values()):
                self.progress.remove_task(task)
            self.progress.refresh()   # (lines printed next must not bring them back)
        elif kind == "error" and not (self.batch and local):
            self.stop(keep=True)      # the pull is over: what it was doing stays

    def _add_image(self, local: str | None, count: int) -> None:
        number = len(self.images) + 1
        task = self.progress.add_task(self._name(local), total=None, order=(number, 0))
        self.images[local] = _Image(task, number, count)
        self._show_image(self.images[local], local)

    def _update_layer(self, image: _Image, local: str | None, fields: dict) -> None:
        layer = fields["layer"]
        image.tally.update(fields)
        task = image.layers.get(layer)
        if fields["phase"] in ("done", "reused"):
            if task is not None:
                self.progress.remove_task(task)
                del image.layers[layer]
        else:
            description = f"  {self._prefix(local)}{layer} {_phase(fields)}"
            total = fields["total"] or None
            if task is None:
                image.added += 1
                image.layers[layer] = self.progress.add_task(
                    description, total=total, completed=fields["bytes"],
                    order=(image.number, image.added))
            else:
                self.progress.update(task, description=description, total=total,
                                     completed=fields["bytes"])
        self._show_image(image, local)

    def _show_image(self, image: _Image, local: str | None) -> None:
        tally = image.tally
        self.progress.update(
            image.task, total=tally.total or None, completed=tally.bytes,
            description=f"{self._name(local)}: {tally.finished}/{tally.count} layers")

    def _name(self, local: str | None) -> str:
        return local or "image"

    def _prefix(self, local: str | None) -> str:
        return f"{local} " if self.batch and local else ""


def _phase(fields: dict) -> str:
    if fields["phase"] == "waiting":
        return f"waiting ({WAITING_FOR.get(fields.get('waiting_for'), '?')})"
    return fields["phase"]
