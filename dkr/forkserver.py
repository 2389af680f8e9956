"""The extractors' fork server process (``python -m dkr.extract --fork-server``).

This module imports nothing heavy, so that ``dkr pull`` can start the server
first thing: the server's start-up (an interpreter, the decompressors, the
plugins) then runs on another core while dkr's own imports still run.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

_early: "ForkServer | None" = None


class ForkServer:
    """The server process and our end of its request socket (SOCK_SEQPACKET)."""

    def __init__(self, env: dict[str, str] | None = None):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # A process group of its own: a terminal's Ctrl-C goes to dkr, which
            # stops its children itself.
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dkr.extract", "--fork-server", "--parent", str(os.getpid())],
                stdin=theirs, env=env, process_group=0)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        self.sock = ours


def start_early() -> None:
    """Start a server now for the first extractor pool of this process to adopt."""
    global _early
    if _early is None:
        _early = ForkServer()


def adopt_early() -> ForkServer | None:
    global _early
    server, _early = _early, None
    return server
