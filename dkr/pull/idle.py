"""How many of the machine's cores sat idle lately, read from /proc/stat.

A pull whose bytes come slower than one extractor unpacks them leaves cores
idle; one that has them all at once (loopback, a fast link) does not. The
difference decides whether staging a layer ahead of its parent pays (see
``Puller._worth_staging``): on idle cores it takes work off the end of the
pull, on busy ones it only competes with the layer being built.
"""

from __future__ import annotations

import os
import time

# A span shorter than this says more about the moment (a start-up, a commit) than
# about the pull: the last longer one stands until a new one is long enough.
MIN_SPAN = 0.5


def _read() -> tuple[float, int, int] | None:
    """(monotonic time, idle jiffies, all jiffies) of all cores together."""
    try:
        with open("/proc/stat", "rb") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != b"cpu":
        return None
    ticks = [int(v) for v in fields[1:9]]     # user nice system idle iowait irq softirq steal
    return time.monotonic(), ticks[3] + ticks[4], sum(ticks)


class IdleCores:
    """Idle cores over the span since the last reading (of at least MIN_SPAN)."""

    def __init__(self, cores: int | None = None):
        self.cores = cores or os.cpu_count() or 1
        self._last = _read()
        self._idle: float | None = None

    def now(self) -> float | None:
        """Cores idle on average lately; None: not known yet (or no /proc)."""
        reading = _read()
        if reading is None or self._last is None:
            return self._idle
        when, idle, total = reading
        last_when, last_idle, last_total = self._last
        if when - last_when >= MIN_SPAN and total > last_total:
            self._idle = (idle - last_idle) / (total - last_total) * self.cores
            self._last = reading
        return self._idle
