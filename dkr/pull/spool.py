"""Layer blobs on their way to the extractors: streamed where a layer can be
built now, spooled only where it must wait.

A layer whose extraction can start gets its bytes from the transfer's write
callback straight into its extractor's pipe: when the pipe is full the
transfer pauses (``CURL_WRITEFUNC_PAUSE``) until the extractor has read, and
no byte touches the disk. A blob whose layer cannot be built yet (its parent
is still being extracted, every extractor is busy) downloads into a spool
file, ``IMAGE_ROOT/.dkr/partial/<hex>``, on the image root's own file system.
When its layer's extractor starts, it reads what is spooled and takes the
rest from the pipe: the file stops growing at that moment. What a crash or a
dropped connection leaves in the spool is resumed with a ``Range`` request
next time; the file is deleted once its layer is committed.

The link goes to the layers in the order they are needed (``Spool``): a blob
that an extractor waits for downloads at once; one that nobody waits for
yet ("ahead") runs only while the link has room, that is while every
download an extractor waits for is held back by its extractor (a full pipe)
or there is none. The base layer's download is therefore never slowed by
the ones above it, and on loopback, where extraction is the limit, the
blobs still arrive far ahead of their extractors. docs/bench.md has the
measurements behind this choice.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import itertools
import logging
import os
import time
from pathlib import Path
from typing import Callable

from dkr.errors import DkrError, error_kind
from dkr.registry.client import status_error
from dkr.registry.reference import digest_hex
from dkr.registry.sources import BlobStartsOver, ContentMismatch, SourceSet
from dkr.tasks import failed, retrieved
from dkr.treeops import write_all
from dkr.unpack.extractors import PipeSink

log = logging.getLogger("dkr.spool")

HASH_CHUNK = 4 * 1024 * 1024
# libcurl hands over 16 KiB at a time; written one by one, that is a write per
# 16 KiB. Gathered, it is one per 256 KiB.
SPOOL_WRITE = 256 * 1024
# Downloads nobody waits for yet that may run at once, while the link has room.
# One: with two, the layers needed next got less of the link and arrived
# later, and the chain of extractions ran longer after the last byte
# (docs/bench.md: 400 Mbit/s 12.81 s against 12.37 s, 1 Gbit/s 7.89 against 7.12).
AHEAD_WINDOW = 1
# How long a download running ahead goes on once a needed one wants the link:
# a needed download's pipe fills and drains many times a second where the
# extractor is the limit; without this grace, the ones ahead would pause and
# resume as often.
YIELD_AFTER = 0.05


def _open_locked(directory: Path, name: str) -> tuple[Path, int]:
    """The spool file for ``name``, locked; another download of it gets its own file."""
    candidates = [name, f"{name}.{os.getpid()}"] + \
        [f"{name}.{os.getpid()}.{n}" for n in range(2, 10)]
    for path in (directory / candidate for candidate in candidates):
        for _ in range(8):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                break
            if _still_named(fd, path):
                return path, fd
            os.close(fd)              # gc took it away between our open and our lock
    raise DkrError(f"spool file {directory / name} is busy")


def _still_named(fd: int, path: Path) -> bool:
    try:
        there = os.stat(path)
    except FileNotFoundError:
        return False
    here = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


class BlobSink:
    """The transfer's Sink for one blob: its spool file, then its extractor's pipe.

    In the file, bytes are gathered up to SPOOL_WRITE before they are written
    (``flush`` writes the rest). ``taken`` counts the blob's bytes handed over
    so far, the resumed ones included: where a next source continues.
    """

    def __init__(self, blob: "SpooledBlob"):
        self.blob = blob
        self.pipe: PipeSink | None = None
        self.taken = 0
        self.spooled = 0              # bytes written to the spool file by this run
        self.pauses = 0               # times the extractor held the transfer back
        self._gathered = bytearray()

    def write(self, data: bytes) -> bool:
        """Take ``data``; False pauses the transfer: the extractor's pipe is full,
        or the blob is not needed yet and the link is wanted for one that is."""
        self.taken += len(data)
        if self.pipe is not None:
            if not self.pipe.write(data):
                self.pauses += 1
                self.blob.spool.held_back(self.blob, True)
                return False
        else:
            if self.blob.fd < 0:
                raise OSError(errno.EBADF, "the spool file was closed (download abandoned)")
            self._gathered += data
            if len(self._gathered) >= SPOOL_WRITE:
                self.flush()
        return self.blob.spool.may_run(self.blob)

    def on_drain(self, callback: Callable[[], None]) -> None:
        """``callback`` once the pipe has room and the blob may use the link."""
        def drained() -> None:
            self.blob.spool.held_back(self.blob, False)
            self.blob.spool.when_may_run(self.blob, callback)
        if self.pipe is not None and self.pipe.pending:
            self.pipe.on_drain(drained)
        else:
            self.blob.spool.when_may_run(self.blob, callback)

    def drop(self) -> None:
        """Forget bytes gathered and not written yet (a failed source's)."""
        self.taken -= len(self._gathered)
        self._gathered.clear()

    def flush(self) -> None:
        if not self._gathered or self.blob.fd < 0:
            return
        data, self._gathered = self._gathered, bytearray()
        self.spooled += len(data)
        try:
            write_all(self.blob.fd, memoryview(data))
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(self.blob.path)) from None

    async def end(self) -> None:
        """The download is over: the extractor gets what the pipe still holds, then EOF."""
        if self.pipe is not None:
            try:
                await self.pipe.flush()
            finally:
                self.close_pipe()

    def close_pipe(self) -> None:
        if self.pipe is not None:
            self.pipe.close()


class SpooledBlob:
    """One blob's download, its spool file, and the extractor it ends up in."""

    def __init__(self, spool: "Spool", digest: str, size: int, rank: int):
        self.spool = spool
        self.digest = digest
        self.size = size
        self.rank = rank              # need order: lower first
        self.path, self.fd = _open_locked(spool.directory, digest_hex(digest))
        self.sink = BlobSink(self)
        loop = asyncio.get_running_loop()
        self.done = loop.create_future()
        self.done.add_done_callback(retrieved)
        self.task: asyncio.Task | None = None
        self.users = 0
        self.needed = False           # an extractor waits for its bytes
        self.admitted = False         # counted against the spool limit
        self.hasher: "hashlib._Hash | None" = None
        self._turn = loop.create_future()

    @property
    def streaming(self) -> bool:
        return self.sink.pipe is not None

    def resume_point(self) -> tuple[int, "hashlib._Hash"]:
        """Where the download continues, with the hash of the blob so far: what
        the spool file holds of an earlier attempt, or what went into the pipe."""
        if self.streaming:
            return self.sink.taken, self.hasher
        self.sink.flush()
        have = os.fstat(self.fd).st_size
        if have > self.size:
            os.ftruncate(self.fd, 0)
            have = 0
        self.hasher = hashlib.sha256()
        offset = 0
        while offset < have:
            chunk = os.pread(self.fd, min(HASH_CHUNK, have - offset), offset)
            self.hasher.update(chunk)
            offset += len(chunk)
        os.lseek(self.fd, have, os.SEEK_SET)
        self.sink.taken = have
        return have, self.hasher

    def discard_content(self) -> None:
        os.ftruncate(self.fd, 0)
        os.lseek(self.fd, 0, os.SEEK_SET)
        self.sink.taken = 0
        self.hasher = None

    async def hand_over(self, start: Callable[[int], int]) -> None:
        """Start this blob's extractor: ``start(prefix)`` tells it to read the first
        ``prefix`` bytes from the spool file and gives its stdin, into which
        the rest of the download is written from then on.

        A blob that other users share is read whole from the file by each of
        them, once it is complete: one pipe could feed only one. So is every
        blob where the spool is to hold them all (``--spool-all``).
        """
        if self.users > 1 or not self.spool.stream:
            await asyncio.wait({self.done})
        if failed(self.done):
            await self.done
        if self.done.done():
            os.close(start(self.size))
            return
        if self.hasher is None:
            self.resume_point()       # (before the file stops growing: see resume_point)
        self.sink.flush()
        stdin = start(os.fstat(self.fd).st_size)
        self.sink.pipe = PipeSink(asyncio.get_running_loop(), stdin)
        self.spool.streams(self)

    def close(self, delete: bool) -> None:
        self.sink.close_pipe()
        if self.fd >= 0:
            try:
                self.sink.flush()
            except OSError as e:           # the download reports its own failure first
                log.warning("%s: %s", e.filename, e.strerror)
            os.close(self.fd)
            self.fd = -1
        if delete:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


class Spool:
    """All blobs of one image root being downloaded; each digest once at a time,
    and the link shared out in the order the blobs are needed.

    A download starts at once when an extractor waits for it (``need``).
    The others wait their turn in need order (the order they were asked for,
    which is layer order) and run ahead, at most AHEAD_WINDOW at once, while
    the link has room: no needed download is limited by the network rather
    than by its extractor. One that runs when a needed one wants the link
    again pauses (after YIELD_AFTER) until it has room again. ``limit``
    bounds the bytes of those spooled ahead: one starts only when it fits
    beside the others, or when nothing else is spooled.
    """

    def __init__(self, directory: Path, limit: int | None = None, stream: bool = True):
        self.directory = directory
        self.limit = limit
        self.stream = stream          # False: every blob is read whole from the spool
        self.blobs: dict[str, SpooledBlob] = {}     # shared by whoever asks for the digest
        self._open: set[SpooledBlob] = set()        # every blob not closed yet
        self.in_use = 0
        self._ranks = itertools.count()
        self._queue: list[SpooledBlob] = []         # waiting for their turn, in need order
        self._ahead: set[SpooledBlob] = set()       # running, nobody waits for them yet
        self._wanting_link: set[SpooledBlob] = set()  # needed, running, not held back
        self._yielding: dict[SpooledBlob, Callable[[], None]] = {}
        self._link_wanted_since: float | None = None

    # --- the users' side ---------------------------------------------------------
    def get(self, digest: str, size: int) -> tuple[SpooledBlob, bool]:
        """The blob's entry, and whether the caller must start its download.

        A download that failed, or one already streaming into another
        extractor, is not handed out again: whoever asks after it gets a new one.
        """
        blob = self.blobs.get(digest)
        if blob is not None and not failed(blob.done) and not blob.streaming:
            blob.users += 1
            return blob, False
        self.directory.mkdir(parents=True, exist_ok=True)
        blob = SpooledBlob(self, digest, size, next(self._ranks))
        blob.users = 1
        self.blobs[digest] = blob
        self._open.add(blob)
        return blob, True

    def need(self, blob: SpooledBlob) -> None:
        """An extractor waits for ``blob`` now: it downloads at once, at full speed."""
        if blob.needed:
            return
        blob.needed = True
        if blob in self._queue:
            self._start(blob)
        elif blob in self._ahead:
            self._ahead.discard(blob)
            self._wanting_link.add(blob)
            self._let_run(blob)
        self._link_changed()

    def streams(self, blob: SpooledBlob) -> None:
        """``blob`` feeds its extractor's pipe now: nobody else may share it."""
        if self.blobs.get(blob.digest) is blob:
            del self.blobs[blob.digest]

    def release(self, blob: SpooledBlob, *, keep_partial: bool) -> None:
        """One user is done. The last one deletes a complete file, keeps a partial one."""
        blob.users -= 1
        if blob.users > 0:
            return
        if self.blobs.get(blob.digest) is blob:
            del self.blobs[blob.digest]
        if blob.task is not None and not blob.task.done():
            blob.task.cancel()             # nobody wants the rest; the partial file stays
        complete = blob.done.done() and not blob.done.cancelled() and \
            blob.done.exception() is None
        blob.close(delete=complete or not keep_partial)
        self._open.discard(blob)
        self._forget(blob)

    def close(self) -> None:
        """At the end of a run: stop what still downloads; partial files stay."""
        for blob in list(self._open):
            if blob.task is not None and not blob.task.done():
                blob.task.cancel()
            blob.close(delete=False)
        self._open.clear()
        self.blobs.clear()

    # --- the downloads' side ---------------------------------------------------------
    async def started(self, blob: SpooledBlob) -> None:
        """Until ``blob``'s download has started (or ended)."""
        await asyncio.wait({blob._turn, blob.done}, return_when=asyncio.FIRST_COMPLETED)

    async def turn(self, blob: SpooledBlob) -> None:
        """Until ``blob``'s download may start."""
        if not blob._turn.done():
            self._queue.append(blob)
            self._queue.sort(key=lambda queued: queued.rank)
            self._schedule()
        await blob._turn

    def finished(self, blob: SpooledBlob) -> None:
        """``blob``'s download is over, whichever way."""
        self._forget(blob, free=False)

    def held_back(self, blob: SpooledBlob, full: bool) -> None:
        """A needed download's pipe is full (its extractor is the limit), or drained."""
        if full:
            self._wanting_link.discard(blob)
        elif blob.needed and blob.task is not None and not blob.task.done():
            self._wanting_link.add(blob)
        self._link_changed()

    def may_run(self, blob: SpooledBlob) -> bool:
        """Whether a download spooling ahead goes on (False: it pauses)."""
        if blob.needed or self._link_wanted_since is None:
            return True
        return time.monotonic() - self._link_wanted_since < YIELD_AFTER

    def when_may_run(self, blob: SpooledBlob, resume: Callable[[], None]) -> None:
        self._yielding[blob] = resume
        if self._link_wanted_since is None or blob.needed:
            self._let_run(blob)

    # --- scheduling ----------------------------------------------------------------
    def _start(self, blob: SpooledBlob) -> None:
        self._queue.remove(blob)
        if blob.needed:
            self._wanting_link.add(blob)
        else:
            self._ahead.add(blob)
            blob.admitted = True
            self.in_use += blob.size
        blob._turn.set_result(None)

    def _schedule(self) -> None:
        for blob in [queued for queued in self._queue if queued.needed]:
            self._start(blob)
        if self._wanting_link and self._link_wanted_since is None:
            self._link_wanted_since = time.monotonic()
        while self._queue and self._link_wanted_since is None and \
                len(self._ahead) < AHEAD_WINDOW and self._fits(self._queue[0]):
            self._start(self._queue[0])

    def _fits(self, blob: SpooledBlob) -> bool:
        return self.limit is None or self.in_use == 0 or self.in_use + blob.size <= self.limit

    def _link_changed(self) -> None:
        if self._wanting_link:
            if self._link_wanted_since is None:
                self._link_wanted_since = time.monotonic()
            return
        self._link_wanted_since = None
        for blob in list(self._yielding):
            self._let_run(blob)
        self._schedule()

    def _let_run(self, blob: SpooledBlob) -> None:
        resume = self._yielding.pop(blob, None)
        if resume is not None:
            # Not from inside the write callback that asked: libcurl must return first.
            asyncio.get_running_loop().call_soon(resume)

    def _forget(self, blob: SpooledBlob, free: bool = True) -> None:
        if blob in self._queue:
            self._queue.remove(blob)
        self._ahead.discard(blob)
        self._wanting_link.discard(blob)
        self._yielding.pop(blob, None)
        if free and blob.admitted:
            blob.admitted = False
            self.in_use -= blob.size
        self._link_changed()


class ResumedBlobMismatch(DkrError):
    """A resumed download did not add up; its spool was emptied for a fresh start."""

    kind = "digest"


async def download(client, name: str, blob: SpooledBlob, what: str) -> None:
    """Fetch ``blob`` into its spool file or extractor, continuing a partial one;
    verify the digest. ``client``: a registry client, or the image's pull
    sources to try in order."""
    if not isinstance(client, SourceSet):
        await _download(client, name, blob, what)
        return
    try:
        await client.fetch_blob(blob.digest, what,
                                lambda source, source_name: _download(source, source_name,
                                                                      blob, what),
                                lambda: blob.sink.taken, blob.sink.drop)
    except BlobStartsOver as e:
        blob.discard_content()
        raise ResumedBlobMismatch(str(e)) from None


async def _download(client, name: str, blob: SpooledBlob, what: str) -> int:
    """One source's download of ``blob``; the bytes it fetched."""
    offset, hasher = blob.resume_point()
    if offset and not blob.streaming:
        log.info("%s: resuming at byte %d of %d.", what, offset, blob.size)
    if offset < blob.size:
        response = await client.get(f"/v2/{name}/blobs/{blob.digest}",
                                    scope=f"repository:{name}:pull", sink=blob.sink,
                                    expected_size=blob.size, offset=offset,
                                    hasher=hasher, what=what)
        if response.status not in (200, 206):
            raise status_error(what, response.status)
        try:
            blob.sink.flush()
        except OSError as e:
            raise DkrError(f"{what}: cannot write to {e.filename}: {e.strerror}",
                           kind=error_kind(e)) from None
    if "sha256:" + hasher.hexdigest() == blob.digest:
        return blob.size - offset
    blob.discard_content()
    if offset:
        raise ResumedBlobMismatch(f"{what}: resumed content does not match its digest")
    raise ContentMismatch(f"{what}: content does not match its digest "
                          f"(got sha256:{hasher.hexdigest()})")
