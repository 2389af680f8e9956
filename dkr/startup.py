"""Start-up of a dkr process (the command, the extractors' server): loading modules fast.

Imports make many objects and no garbage: no collector passes over them while
they load (those passes were ~8% of dkr's import time, which every pull
waits for). What is loaded then stays for good: later collections need not
look at it again.
"""

from __future__ import annotations

import gc


def loading_modules() -> None:
    gc.disable()


def modules_loaded() -> None:
    gc.freeze()
    gc.enable()
