"""Reconnect delays: capped exponential backoff with full jitter (the server's own workers
use the same schedule; this package depends on nothing of the server).

Full jitter (a delay drawn uniformly from [0, min(cap, base * 2**attempt)]) spreads the
reconnects of many workers or clients that lost the same server at the same moment. The
random source is injected so that the schedule itself can be tested, not wall time.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Backoff:
    base: float = 0.5  # s: the ceiling of the first delay
    cap: float = 20.0  # s: the ceiling of any delay
    rand: Callable[[float, float], float] = field(default=random.uniform, repr=False)
    attempt: int = 0

    def ceiling(self, attempt: int) -> float:
        """The largest delay of the `attempt`-th retry (0-based)."""
        return min(self.cap, self.base * 2.0 ** min(attempt, 62))

    def next_delay(self) -> float:
        """The delay before the next attempt; each call is one more attempt."""
        delay = self.rand(0.0, self.ceiling(self.attempt))
        self.attempt += 1
        return delay

    def reset(self) -> None:
        """After a success: the next failure starts from the shortest delays again."""
        self.attempt = 0
