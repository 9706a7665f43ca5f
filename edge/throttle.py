"""A subscription's rate limit (`max_rate`): at most that many frames per second for the
channel. In between, the latest value per key is held (partial updates merged), and all
held keys go out together in offset order, so offsets stay increasing.

Pure: the caller passes the time and runs the timer (`due`), so the rule is testable
without a loop.
"""

from __future__ import annotations

import asyncio
import enum

from common.broker import Publication
from edge.sendqueue import merge_json


class Offer(enum.IntEnum):
    SEND = 0  # send it now
    HELD = 1  # held until `due`
    REPLACED = 2  # held, replacing (or merged into) a held value of the same key


class Throttle:
    __slots__ = ("held", "interval", "merge", "next_at", "timer")

    def __init__(self, max_rate: float, merge: bool) -> None:
        self.interval = 1.0 / (max_rate or 1.0)
        self.merge = merge  # values are partial updates: a held one is merged, not replaced
        self.next_at = 0.0  # when the next frame may go
        self.held: dict[str, Publication] | None = None  # what waits for it, by key
        self.timer: asyncio.TimerHandle | None = None  # the caller's, for `due`

    @property
    def due(self) -> float:
        """When what is held may go (`release`)."""
        return self.next_at

    def offer(self, pub: Publication, now: float) -> Offer:
        if self.held is None and now >= self.next_at:
            self.next_at = now + self.interval
            return Offer.SEND
        held = self.held if self.held is not None else {}
        self.held = held
        old = held.pop(pub.key, None)
        if old is not None and self.merge and not pub.deleted:  # this client's own value
            pub = Publication(
                pub.channel, pub.epoch, pub.offset, pub.key, merge_json(old.data, pub.data)
            )
        held[pub.key] = pub
        return Offer.HELD if old is None else Offer.REPLACED

    def release(self, now: float) -> list[Publication]:
        """What was held, in offset order; the next frame may go one interval from now."""
        self.timer = None
        held, self.held = self.held or {}, None
        self.next_at = now + self.interval
        return sorted(held.values(), key=lambda p: p.offset)

    def reset(self) -> None:
        """Forget what is held (a resync, an unsubscribe, the session's end)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.held = None
