"""Where each layer of each image is: its phase, and the bytes of its download.

The engine tells ``Progress`` facts it knows anyway (a blob's download waits
for the spool, runs, is done; a layer's extraction starts, its tree is
committed; a layer is reused or built by another image) through the same
calls that emit its layer events. From them ``Progress`` derives each layer's
phase and emits a ``phase`` event when it changes; while downloads run it
samples their bytes a few times a second and emits ``progress`` events. The
bytes are what the blob's sink has taken (into its extractor's pipe or its
spool file): a resumed download starts at what an earlier one left.

A layer is named by one short id everywhere: the first 12 hex digits of its
blob digest, as podman shows it (see ``short_id``).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Awaitable, Callable

from dkr.events import Events, bound_fields
from dkr.tasks import retrieved

# Seconds between two progress events of one download (plus a last one when it ends).
PROGRESS_INTERVAL = 0.5

WAITING, DOWNLOADING, EXTRACTING, COMMITTING, DONE, REUSED, FAILED = (
    "waiting", "downloading", "extracting", "committing", "done", "reused", "failed")
PHASES = (WAITING, DOWNLOADING, EXTRACTING, COMMITTING, DONE, REUSED, FAILED)
# What a waiting layer waits for: room in the spool, its parent layer, another
# image's pull of it, or the link (blobs needed first download before it).
FOR_SPOOL, FOR_PARENT, FOR_IMAGE, FOR_LINK = "spool", "parent", "image", "link"


def short_id(digest: str) -> str:
    """A layer's name in messages and events: 12 hex digits of its blob digest."""
    return digest.split(":", 1)[-1][:12]


def full_id(key: str) -> str:
    """A layer key as events carry it: ``sha256:<hex>`` (v1 keys, ``v1-…``, as they are)."""
    return key if ":" in key or key.startswith("v1-") else f"sha256:{key}"


@dataclass
class _Blob:
    digest: str
    size: int
    measure: Callable[[], int | None]    # bytes there so far (None: no longer known)
    admitted: bool = False
    waiting: bool = False         # for its turn (told only if it did not come at once)
    spool_full: bool = False
    finished: bool = False
    failed: bool = False
    bytes: int = 0


@dataclass
class _Layer:
    fields: dict                  # the image's bound fields, and the layer's ids
    total: int
    blob: _Blob | None = None
    extracting: bool = False
    committing: bool = False
    shared: bool = False
    final: str | None = None      # done or reused
    phase: tuple | None = None    # (phase, waiting for) last emitted


class Progress:
    """The phases and bytes of every layer a Puller works on, told as events."""

    def __init__(self, events: Events, interval: float = PROGRESS_INTERVAL):
        self.events = events
        self.interval = interval
        self._layers: dict[tuple, _Layer] = {}
        self._blobs: dict[str, _Blob] = {}
        self._ticker: asyncio.Future | None = None

    # --- facts the engine tells --------------------------------------------------------
    def emit(self, kind: str, digest: str, key: str | None = None, /, **fields) -> None:
        """Emit layer event ``kind`` with the layer's ids in one format (``layer``, ``digest``,
        ``chain_id``), and move the layer to the phase the event means."""
        ids = {"layer": short_id(digest), "digest": digest}
        if key is not None:
            ids["chain_id"] = full_id(key)
        self.events.emit(kind, **{**fields, **ids})
        if kind == "download-done":
            self._download_over(digest, failed=False)
            return
        layer = self._layer(digest, fields.get("size"))
        if kind == "layer-start":
            layer.extracting = True
        elif kind == "layer-staged":        # inflated ahead: the parent's tree is next
            layer.extracting = False
        elif kind == "layer-extracted":
            layer.committing = True
        elif kind == "layer-done":
            layer.final = DONE
        elif kind == "skipped":
            layer.final = REUSED
        self._tell(layer)

    def staging(self, digest: str) -> None:
        """A stacked layer's blob is being inflated ahead of its parent's tree."""
        layer = self._layer(digest)
        layer.extracting = True
        self._tell(layer)

    async def admit(self, spool, blob) -> None:
        """``spool.turn(blob)``, saying what the layer waits for if it has to, and that
        its download runs once it may."""
        state = self._blob(blob.digest, blob.size, lambda: _taken(blob))
        turn = asyncio.ensure_future(spool.turn(blob))
        try:
            await asyncio.sleep(0)            # (a blob that may start has its turn at once)
            if not turn.done():
                state.waiting = True
                state.spool_full = _spool_full(spool, blob.size)
                self._tell_blob(state)
            await turn
        except BaseException:
            turn.cancel()
            self._download_over(blob.digest, failed=True)
            raise
        state.admitted = True
        state.bytes = state.measure() or 0
        self._tell_blob(state)
        self._start_ticker()
        blob.done.add_done_callback(lambda done: self._download_over(
            blob.digest, failed=done.cancelled() or done.exception() is not None))

    async def shared(self, digest: str, size: int | None, built: Awaitable):
        """Wait for ``built``, a layer another image builds; its outcome."""
        layer = self._layer(digest, size)
        layer.shared = True
        self._tell(layer)
        outcome = await built
        layer.final = DONE
        self._tell(layer)
        return outcome

    def image_failed(self) -> None:
        """The pull of the image bound now failed: each of its layers not finished
        moves to ``failed``."""
        bound = bound_fields()
        image = (bound.get("local"), bound.get("reference"))
        for key, layer in self._layers.items():
            if key[:2] == image and layer.final is None:
                layer.final = FAILED
                self._tell(layer)

    # --- phases ----------------------------------------------------------------------
    def _layer(self, digest: str, size: int | None = None) -> _Layer:
        bound = bound_fields()
        key = (bound.get("local"), bound.get("reference"), digest)
        layer = self._layers.get(key)
        if layer is None:
            layer = self._layers[key] = _Layer(
                {**bound, "layer": short_id(digest), "digest": digest}, size or 0,
                self._blobs.get(digest))
        if size and not layer.total:
            layer.total = size
        return layer

    def _blob(self, digest: str, size: int, measure: Callable[[], int | None]) -> _Blob:
        state = _Blob(digest, size, measure)
        self._blobs[digest] = state           # (a download started over is a new one)
        layer = self._layer(digest, size)     # the image whose task starts the download
        for other in self._layers.values():
            if other.fields["digest"] == digest and other.final is None:
                other.blob = state
        layer.blob = state
        return state

    def _tell_blob(self, blob: _Blob) -> None:
        for layer in self._layers.values():
            if layer.blob is blob:
                self._tell(layer)

    def _tell(self, layer: _Layer) -> None:
        phase = _phase(layer)
        if phase is None or phase == layer.phase:
            return
        layer.phase = phase
        name, waiting_for = phase
        extra = {"waiting_for": waiting_for} if waiting_for else {}
        bytes_now = layer.total if name in (DONE, REUSED) else \
            layer.blob.bytes if layer.blob else 0
        self.events.emit("phase", **layer.fields, phase=name, **extra,
                         bytes=bytes_now, total=layer.total)

    def _download_over(self, digest: str, failed: bool) -> None:
        blob = self._blobs.get(digest)
        if blob is None or blob.finished or blob.failed:
            return
        if failed:
            blob.failed = True
            return
        blob.finished = True
        blob.bytes = blob.size
        self._progress(blob)                  # the last one: all of it
        self._tell_blob(blob)

    # --- bytes -------------------------------------------------------------------------
    def _start_ticker(self) -> None:
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.ensure_future(self._tick())
            self._ticker.add_done_callback(retrieved)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            running = [b for b in self._blobs.values()
                       if b.admitted and not (b.finished or b.failed)]
            if not running:
                return
            for blob in running:
                now = blob.measure()
                if now is not None and now != blob.bytes:
                    blob.bytes = now
                    self._progress(blob)

    def _progress(self, blob: _Blob) -> None:
        for layer in self._layers.values():
            if layer.blob is blob and not (layer.final or layer.shared):
                self.events.emit("progress", **layer.fields, phase=_phase(layer)[0],
                                 bytes=blob.bytes, total=layer.total or blob.size)


def _phase(layer: _Layer) -> tuple[str, str | None] | None:
    """Where a layer is, from what is known of it; None: nothing to tell yet."""
    blob = layer.blob
    if layer.final:
        return layer.final, None
    if layer.committing:
        return COMMITTING, None
    if layer.shared:
        return WAITING, FOR_IMAGE
    if blob is not None and not blob.finished:
        if blob.admitted:
            return DOWNLOADING, None
        if not blob.waiting:
            return None
        return WAITING, FOR_SPOOL if blob.spool_full else FOR_LINK
    if layer.extracting:
        return EXTRACTING, None
    if blob is not None:
        return WAITING, FOR_PARENT
    return None


def _taken(blob) -> int | None:
    """The bytes of ``blob`` (a SpooledBlob) here so far: what its sink took, or before
    its download starts, what an earlier one left in its spool file."""
    if blob.sink.taken or blob.streaming:
        return blob.sink.taken
    if blob.fd < 0:
        return None
    try:
        return os.fstat(blob.fd).st_size
    except OSError:
        return None


def _spool_full(spool, size: int) -> bool:
    """Whether a blob of ``size`` bytes must wait for room in ``spool`` (as the spool
    judges one that runs ahead, leaving aside the queue's order)."""
    return spool.limit is not None and spool.in_use > 0 and spool.in_use + size > spool.limit
