"""The garbage collector during a reconnect storm: fewer young-generation passes while the
recovery gate holds a storm's reads.

Why: in a storm every subscribe leaves objects alive for a while (tasks, futures, reads,
subscriptions), so the young generation fills fast and each pass scans it all: over a
10,000-client run an edge made ~80 young passes (~1.5 s together, ~20 ms each) and one
middle one (0.45 s), a `gc.callbacks` probe showed. With the young threshold at 500,000
while at least STORM_READS reads are in the gate, the short-lived objects die before a
pass sees them: ~20 passes (0.8-0.9 s), none of the middle generation; in five pairs at
10,000 clients the storm took 8.1-9.6 s against 9.4-11.2 s, edge CPU 0.84-0.96x
(bench/README.md, "the collector during a storm"). The cost: a young pass during a storm
pauses the loop longer (up to ~180 ms measured, against ~50 ms), and cyclic garbage waits
longer (bounded by the threshold). Outside a storm the configured thresholds
(FANOUT_GC_THRESHOLDS) are in effect, so the steady state's pauses stay short.

The collector is one per process and a process may run several edges (the tests do): the
first gate to report a storm saves the thresholds in effect and raises the young one, the
last to report the storm over puts them back.
"""

from __future__ import annotations

import gc

# Reads at once in the recovery gate that make a storm: a trickle of subscribes and
# `history` requests leaves the thresholds alone.
STORM_READS = 100


class StormGc:
    """`gate.on_busy` for every gate of the process: raises the young generation's
    threshold to `gen0` while any gate is busy."""

    def __init__(self, gen0: int) -> None:
        self.gen0 = gen0
        self.busy = 0  # gates busy now
        self.storms = 0  # times the thresholds were raised
        self._saved: tuple[int, int, int] | None = None

    def __call__(self, busy: bool) -> None:
        if busy:
            self.busy += 1
            if self.busy == 1:
                saved = gc.get_threshold()
                # A young threshold of 0 disables the collector: left so.
                if 0 < saved[0] < self.gen0:
                    self._saved = saved
                    self.storms += 1
                    gc.set_threshold(self.gen0, saved[1], saved[2])
        elif self.busy > 0:
            self.busy -= 1
            if self.busy == 0 and self._saved is not None:
                gc.set_threshold(*self._saved)
                self._saved = None


_POLICY = StormGc(0)


def storm_gc(gen0: int) -> StormGc | None:
    """The process's policy (one, shared by every gate), raising the young threshold to
    `gen0` (the last value asked while no gate is busy); None for 0 (off)."""
    if gen0 <= 0:
        return None
    if not _POLICY.busy:
        _POLICY.gen0 = gen0
    return _POLICY
