"""The ``dkr`` command's entry point: what takes long starts before the rest loads.

Importing dkr's engine takes ~0.15 s; a pull's extractor fork server needs
about as long to start. Started first, it comes up on another core meanwhile.
"""

from __future__ import annotations

import sys


def main() -> int:
    if sys.argv[1:2] == ["pull"]:
        from .forkserver import start_early
        start_early()
    from .cli import main as cli_main
    return cli_main()
