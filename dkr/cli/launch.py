"""The ``dkr`` command's entry point: what takes long starts before the rest loads.

Importing dkr's engine takes ~0.1 s; a pull's extractor fork server needs
about as long to start. Started first, it comes up on another core meanwhile.
"""

from __future__ import annotations

import os
import sys

from dkr.startup import loading_modules, modules_loaded


def main() -> int:
    loading_modules()
    if _command(sys.argv[1:]) == "pull":
        from dkr.unpack.forkserver import start_early
        try:
            start_early()
        except OSError:
            pass              # the pull starts one when it needs it, and says what failed
    from dkr.cli.main import main as cli_main
    modules_loaded()
    status = cli_main()
    # Nothing is left to do: skip tearing down every module one by one.
    import logging  # (loaded by now; imported here so the server starts ~20 ms sooner)
    logging.shutdown()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:           # a reader that went away: its loss
        pass
    os._exit(status)


def _command(argv: list[str]) -> str | None:
    """The command word, past the options that may come before it (``dkr -v pull``)."""
    words = iter(argv)
    for word in words:
        if word == "--image-root":       # (the one of them that takes a separate value)
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None
