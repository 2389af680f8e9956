"""The extractors' fork server process (``dkr.unpack.extract --fork-server``).

This module imports nothing but what the interpreter has already loaded, so
that ``dkr pull`` can start the server first thing: the server's start-up
(an interpreter, the decompressors, the plugins) then runs on another core
while dkr's own imports still run. (``subprocess`` and ``socket`` alone take
~18 ms to import; ``os.posix_spawn`` and ``_socket`` need nothing.)
"""

from __future__ import annotations

import _socket
import os
import sys

_early: "ForkServer | None" = None

# The server runs as root and reads layers: it must run the dkr that started
# it and nothing else. ``-I`` keeps the working directory (which ``-m`` would
# put first on sys.path: a ``dkr/`` planted in /tmp would run as root), the
# user's site-packages and every PYTHON* variable out; the one directory
# added is where this process's own dkr package lives, where an isolated
# interpreter would not find it by itself (a source tree on PYTHONPATH).
_BOOT = ("import gc, sys; gc.disable(); home = sys.argv.pop(1)\n"
         "if home not in sys.path: sys.path.insert(0, home)\n"
         "sys.argv[0] = 'dkr.unpack.extract'\n"
         "from dkr.unpack.extract import main; sys.exit(main())")


def package_home() -> str:
    """The directory that holds the ``dkr`` package this process runs."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def isolated_python(*args: str) -> list[str]:
    """The command line of ``dkr.unpack.extract`` with ``args``, isolated from the caller's environment."""
    return [sys.executable, "-I", "-c", _BOOT, package_home(), *args]


class ForkServer:
    """The server process and our end of its request socket (SOCK_SEQPACKET)."""

    def __init__(self, env: dict[str, str] | None = None):
        ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
        try:
            # Its stdin is the socket; it inherits no other descriptor of ours. A
            # process group of its own: a terminal's Ctrl-C goes to dkr, which stops
            # its children itself.
            actions = [(os.POSIX_SPAWN_DUP2, theirs.fileno(), 0)]
            actions += [(os.POSIX_SPAWN_CLOSE, fd) for fd in _inheritable_fds()]
            argv = isolated_python("--fork-server", "--parent", str(os.getpid()))
            self.pid = os.posix_spawn(
                sys.executable, argv,
                os.environ if env is None else env, file_actions=actions, setpgroup=0)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        self.sock = ours

    def wait(self) -> None:
        os.waitpid(self.pid, 0)


def _inheritable_fds() -> list[int]:
    """Descriptors above stderr that a spawned program would inherit (from our own parent)."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if fd > 2 and os.get_inheritable(fd):
                found.append(fd)
        except OSError:               # the directory's own descriptor, closed by now
            pass
    return found


def start_early() -> None:
    """Start a server now for the first extractor pool of this process to adopt."""
    global _early
    if _early is None:
        _early = ForkServer()


def adopt_early() -> ForkServer | None:
    global _early
    server, _early = _early, None
    return server
