"""CurlGlue: one pycurl CurlMulti driven by an asyncio event loop.

A port of systemd's curl-util.c. libcurl tells us which sockets to watch
(M_SOCKETFUNCTION) and when it next needs a timeout (M_TIMERFUNCTION); the
loop calls ``socket_action()`` when a socket is ready or the timer fires, and
``info_read()`` hands finished transfers back to their job. No ``perform()``
busy loop and no thread per download: every transfer of every image shares
this one multi handle and its connection pool.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

import pycurl

log = logging.getLogger("dkr.glue")


class Transfer(Protocol):
    """What CurlGlue needs of a job: its easy handle and a completion callback."""

    curl: pycurl.Curl

    def on_finished(self, code: int, message: str) -> None: ...


class CurlGlue:
    def __init__(self, loop: asyncio.AbstractEventLoop | None = None,
                 max_host_connections: int = 6):
        self.loop = loop or asyncio.get_running_loop()
        self.multi = pycurl.CurlMulti()
        self.multi.setopt(pycurl.M_SOCKETFUNCTION, self._on_socket)
        self.multi.setopt(pycurl.M_TIMERFUNCTION, self._on_timer)
        self.multi.setopt(pycurl.M_PIPELINING, pycurl.PIPE_MULTIPLEX)
        self.multi.setopt(pycurl.M_MAX_HOST_CONNECTIONS, max_host_connections)
        self._watched: dict[int, int] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._transfers: dict[pycurl.Curl, Transfer] = {}
        self._closed = False

    # --- libcurl → loop -------------------------------------------------
    def _on_socket(self, what: int, fd: int, multi, data) -> None:
        old = self._watched.pop(fd, None)
        if old is not None:
            if old & pycurl.POLL_IN:
                self.loop.remove_reader(fd)
            if old & pycurl.POLL_OUT:
                self.loop.remove_writer(fd)
        if what == pycurl.POLL_REMOVE:
            return
        if what & pycurl.POLL_IN:
            self.loop.add_reader(fd, self._action, fd, pycurl.CSELECT_IN)
        if what & pycurl.POLL_OUT:
            self.loop.add_writer(fd, self._action, fd, pycurl.CSELECT_OUT)
        self._watched[fd] = what

    def _on_timer(self, timeout_ms: int) -> None:
        # Called from inside libcurl: never call back into the multi from here.
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if timeout_ms >= 0:
            self._timer = self.loop.call_later(timeout_ms / 1000.0, self._on_timeout)

    # --- loop → libcurl -------------------------------------------------
    def _on_timeout(self) -> None:
        self._timer = None
        self._action(pycurl.SOCKET_TIMEOUT, 0)

    def _action(self, fd: int, ev: int) -> None:
        if self._closed:
            return
        while True:
            ret, _running = self.multi.socket_action(fd, ev)
            if ret != pycurl.E_CALL_MULTI_PERFORM:
                break
        self._dispatch_finished()

    def kick(self) -> None:
        """Let libcurl make progress now, e.g. after a paused transfer resumes."""
        self.loop.call_soon(self._action, pycurl.SOCKET_TIMEOUT, 0)

    def _dispatch_finished(self) -> None:
        while True:
            queued, ok, failed = self.multi.info_read()
            for curl in ok:
                self._finish(curl, 0, "")
            for curl, code, message in failed:
                self._finish(curl, code, message)
            if queued == 0:
                break

    def _finish(self, curl: pycurl.Curl, code: int, message: str) -> None:
        transfer = self._transfers.pop(curl, None)
        self.multi.remove_handle(curl)
        if transfer is not None:
            transfer.on_finished(code, message)

    # --- jobs -----------------------------------------------------------
    def add(self, transfer: Transfer) -> None:
        self._transfers[transfer.curl] = transfer
        self.multi.add_handle(transfer.curl)
        self.kick()

    def remove(self, transfer: Transfer) -> None:
        """Stop a transfer that has not finished (cancellation, errors)."""
        if self._transfers.pop(transfer.curl, None) is not None:
            self.multi.remove_handle(transfer.curl)

    def close(self) -> None:
        self._closed = True
        for curl in list(self._transfers):
            self.multi.remove_handle(curl)
        self._transfers.clear()
        if self._timer is not None:
            self._timer.cancel()
        for fd, what in self._watched.items():
            if what & pycurl.POLL_IN:
                self.loop.remove_reader(fd)
            if what & pycurl.POLL_OUT:
                self.loop.remove_writer(fd)
        self._watched.clear()
        self.multi.close()
