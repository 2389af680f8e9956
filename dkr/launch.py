"""The ``dkr`` command's entry point: what takes long starts before the rest loads.

Importing dkr's engine takes ~0.1 s; a pull's extractor fork server needs
about as long to start. Started first, it comes up on another core meanwhile.
"""

from __future__ import annotations

import gc
import os
import sys


def main() -> int:
    loading_modules()
    if sys.argv[1:2] == ["pull"]:
        from .forkserver import start_early
        try:
            start_early()
        except OSError:
            pass              # the pull starts one when it needs it, and says what failed
    from .cli import main as cli_main
    modules_loaded()
    status = cli_main()
    # Nothing is left to do: skip tearing down every module one by one.
    import logging            # (loaded by now; imported here so the server starts ~20 ms sooner)
    logging.shutdown()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:           # a reader that went away: its loss
        pass
    os._exit(status)


def loading_modules() -> None:
    """Imports make many objects and no garbage: no collector passes over them.

    (Those passes were ~8% of dkr's import time, which every pull waits for.)
    """
    gc.disable()


def modules_loaded() -> None:
    """What is loaded stays for good: later collections need not look at it again."""
    gc.freeze()
    gc.enable()
