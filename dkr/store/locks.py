"""flock(2) locks between dkr processes that share an image root.

Waiting never blocks the event loop (other transfers go on), and says so in
the log, once.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
from pathlib import Path

log = logging.getLogger("dkr.locks")

POLL = 0.2


class AsyncFlock:
    def __init__(self, path: Path, note: str, shared: bool = False):
        self.path = path
        self.note = note
        self.mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        self.fd = -1

    @property
    def held(self) -> bool:
        return self.fd >= 0

    def try_acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, self.mode | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            raise
        self.fd = fd
        return True

    async def acquire(self) -> None:
        announced = False
        while not self.try_acquire():
            if not announced:
                log.info("Waiting for another dkr process %s.", self.note)
                announced = True
            await asyncio.sleep(POLL)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    async def __aenter__(self) -> "AsyncFlock":
        await self.acquire()
        return self

    async def __aexit__(self, *exc) -> None:
        self.release()
