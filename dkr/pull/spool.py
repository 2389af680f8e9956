"""Blob downloads into spool files that extractors read while they grow.

Every layer blob is written to ``IMAGE_ROOT/.dkr/partial/<hex>`` on the image
root's own file system, and the extractor child follows that file as it
grows (woken through a pipe whenever bytes arrive). This decouples the
network from extraction: all downloads run at full speed from the start,
while layers that must wait for their parent (btrfs snapshots) are already
local when their turn comes. The file is deleted as soon as its layers are
committed, usually before the kernel ever writes it back; what a crash or a
dropped connection leaves is resumed with a ``Range`` request next time.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import logging
import os
from pathlib import Path

from dkr.errors import DkrError, error_kind
from dkr.registry.client import status_error
from dkr.registry.reference import digest_hex
from dkr.registry.sources import BlobStartsOver, ContentMismatch, SourceSet
from dkr.tasks import failed, retrieved
from dkr.treeops import write_all

log = logging.getLogger("dkr.spool")

HASH_CHUNK = 4 * 1024 * 1024
# libcurl hands over 16 KiB at a time; written (and announced) one by one,
# that is a write and a wake-up per 16 KiB. Gathered, both happen per 256 KiB.
SPOOL_WRITE = 256 * 1024


def _open_locked(directory: Path, name: str) -> tuple[Path, int]:
    """The spool file for ``name``, locked; another process's download gets its own file."""
    for path in (directory / name, directory / f"{name}.{os.getpid()}"):
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


class SpoolSink:
    """A Sink that appends to the spool file and wakes the readers following it.

    Bytes are gathered up to SPOOL_WRITE before they are written; ``flush``
    writes the rest (the download's end, or its failure, calls it).
    """

    def __init__(self, fd: int, path: Path):
        self.fd = fd
        self.path = path
        self.readers: list[int] = []        # write ends of the readers' wake-up pipes
        self._gathered = bytearray()

    def write(self, data: bytes) -> bool:
        if self.fd < 0:
            raise OSError(errno.EBADF, "the spool file was closed (download abandoned)")
        self._gathered += data
        if len(self._gathered) >= SPOOL_WRITE:
            self.flush()
        return True

    def drop(self) -> None:
        """Forget bytes gathered and not written yet (a failed source's)."""
        self._gathered.clear()

    def flush(self) -> None:
        if not self._gathered or self.fd < 0:
            return
        data, self._gathered = self._gathered, bytearray()
        try:
            write_all(self.fd, memoryview(data))
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(self.path)) from None
        for wake in self.readers:
            try:
                os.write(wake, b"!")
            except BlockingIOError:
                pass                        # a full pipe already says "more data"
            except BrokenPipeError:
                pass                        # that reader is gone; the others go on

    def on_drain(self, callback) -> None:   # never full: the file system takes it all
        callback()


class SpooledBlob:
    """One blob's spool file, its download, and the readers following it."""

    def __init__(self, directory: Path, digest: str, size: int):
        self.digest = digest
        self.size = size
        self.path, self.fd = _open_locked(directory, digest_hex(digest))
        self.sink = SpoolSink(self.fd, self.path)
        loop = asyncio.get_running_loop()
        self.done = loop.create_future()
        self.done.add_done_callback(retrieved)
        self.task: asyncio.Task | None = None
        self.users = 0
        self.admitted = False
        self.urgent = False               # a stacked layer is ready for it: see Spool.hurry
        self._entered = loop.create_future()

    async def entered(self) -> None:
        """Until the download has its room in the spool, or is over."""
        if not (self._entered.done() or self.done.done()):
            await asyncio.wait({self._entered, self.done}, return_when=asyncio.FIRST_COMPLETED)

    def resume_point(self) -> tuple[int, "hashlib._Hash"]:
        """How much of an earlier attempt is already here, with its hash so far."""
        have = os.fstat(self.fd).st_size
        if have > self.size:
            os.ftruncate(self.fd, 0)
            have = 0
        hasher = hashlib.sha256()
        offset = 0
        while offset < have:
            chunk = os.pread(self.fd, min(HASH_CHUNK, have - offset), offset)
            hasher.update(chunk)
            offset += len(chunk)
        os.lseek(self.fd, have, os.SEEK_SET)
        return have, hasher

    def discard_content(self) -> None:
        os.ftruncate(self.fd, 0)
        os.lseek(self.fd, 0, os.SEEK_SET)

    def add_reader(self, wake_fd: int) -> None:
        """Wake ``wake_fd`` (non-blocking; now owned here) whenever bytes arrive.

        Closing it says no more will come: at once if the download is over.
        """
        if self.done.done():
            os.close(wake_fd)
        else:
            self.sink.readers.append(wake_fd)

    def finish_readers(self) -> None:
        """No more bytes will come (done or failed): readers see EOF on their pipes."""
        try:
            self.sink.flush()
        except OSError as e:               # the download reports its own failure first
            log.warning("%s: %s", e.filename, e.strerror)
        for wake in self.sink.readers:
            os.close(wake)
        self.sink.readers.clear()

    def close(self, delete: bool) -> None:
        self.finish_readers()
        self.sink.fd = -1
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if delete:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


class Spool:
    """All spooled blobs of one image root; each digest is downloaded once.

    ``limit`` bounds the bytes spooled at once: a download starts only when its
    blob fits beside the others, or when nothing else is spooled. Downloads
    are admitted in the order they were asked for, which is layer order, so
    the layer extracted next is never starved by ones behind it. A blob that
    a stacked layer is ready to extract may pass the limit (``hurry``): the
    blobs that fill the spool may be waiting for that very layer. One such
    blob at a time, so the spool holds at most one blob more than the limit.
    """

    def __init__(self, directory: Path, limit: int | None = None):
        self.directory = directory
        self.limit = limit
        self.blobs: dict[str, SpooledBlob] = {}
        self.in_use = 0
        self._admission: asyncio.Condition | None = None
        self._queue: list[SpooledBlob] = []
        self._past_limit: SpooledBlob | None = None     # the one blob let in past it

    async def admit(self, blob: SpooledBlob) -> None:
        """Wait until ``blob`` may occupy the spool."""
        if self._admission is None:
            self._admission = asyncio.Condition()
        self._queue.append(blob)
        async with self._admission:
            try:
                await self._admission.wait_for(lambda: self._fits(blob))
                if not self._in_turn(blob):
                    self._past_limit = blob
            finally:
                self._queue.remove(blob)
            self.in_use += blob.size
            blob.admitted = True
            blob._entered.set_result(None)
            self._admission.notify_all()

    def hurry(self, blob: SpooledBlob) -> None:
        """A stacked layer is ready to extract ``blob``: it may pass the limit
        (while no other blob does)."""
        if not blob.urgent:
            blob.urgent = True
            if self._admission is not None:
                asyncio.ensure_future(self._wake())

    def _fits(self, blob: SpooledBlob) -> bool:
        return self._in_turn(blob) or (blob.urgent and self._past_limit is None)

    def _in_turn(self, blob: SpooledBlob) -> bool:
        if self._queue[0] is not blob:
            return False
        return self.limit is None or self.in_use == 0 or self.in_use + blob.size <= self.limit

    def _free(self, blob: SpooledBlob) -> None:
        if blob.admitted:
            blob.admitted = False
            self.in_use -= blob.size
            if self._past_limit is blob:
                self._past_limit = None
            if self._admission is not None:
                asyncio.ensure_future(self._wake())

    async def _wake(self) -> None:
        async with self._admission:
            self._admission.notify_all()

    def get(self, digest: str, size: int) -> tuple[SpooledBlob, bool]:
        """The blob's spool entry, and whether the caller must start its download.

        A download that failed is not handed out again: whoever asks after it
        (a layer starting over) gets a new one, while the old one's users let go.
        """
        blob = self.blobs.get(digest)
        if blob is not None and not failed(blob.done):
            blob.users += 1
            return blob, False
        self.directory.mkdir(parents=True, exist_ok=True)
        blob = SpooledBlob(self.directory, digest, size)
        blob.users = 1
        self.blobs[digest] = blob
        return blob, True

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
        self._free(blob)

    def close(self) -> None:
        for blob in list(self.blobs.values()):
            if blob.task is not None and not blob.task.done():
                blob.task.cancel()
            blob.close(delete=False)
        self.blobs.clear()


class ResumedBlobMismatch(DkrError):
    """A resumed download did not add up; its spool was emptied for a fresh start."""

    kind = "digest"


async def download(client, name: str, blob: SpooledBlob, what: str) -> None:
    """Fetch ``blob`` into its spool file, continuing a partial one; verify the digest.
    ``client``: a registry client, or the image's pull sources to try in order."""
    if not isinstance(client, SourceSet):
        await _download(client, name, blob, what)
        return
    try:
        await client.fetch_blob(blob.digest, what,
                                lambda source, source_name: _download(source, source_name,
                                                                      blob, what),
                                lambda: os.fstat(blob.fd).st_size, blob.sink.drop)
    except BlobStartsOver as e:
        blob.discard_content()
        raise ResumedBlobMismatch(str(e)) from None


async def _download(client, name: str, blob: SpooledBlob, what: str) -> int:
    """One source's download of ``blob``; the bytes it fetched."""
    offset, hasher = blob.resume_point()
    if offset:
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
