"""A subscription's rate limit (edge/throttle.py), with the time passed in."""

from __future__ import annotations

import json

from common.broker import Publication
from edge.throttle import Offer, Throttle


def pub(offset: int, key: str, data: str, deleted: bool = False) -> Publication:
    return Publication("quotes.ES", "e", offset, key, data, deleted)


def test_first_goes_at_once_then_one_per_interval() -> None:
    t = Throttle(max_rate=2.0, merge=False)  # one frame per 0.5 s
    assert t.offer(pub(1, "a", "1"), now=10.0) is Offer.SEND
    assert t.due == 10.5
    assert t.offer(pub(2, "a", "2"), now=10.1) is Offer.HELD
    assert t.offer(pub(3, "b", "3"), now=10.2) is Offer.HELD
    assert [p.offset for p in t.release(now=10.5)] == [2, 3]
    assert t.due == 11.0 and t.held is None
    assert t.offer(pub(4, "a", "4"), now=10.9) is Offer.HELD  # still inside the interval
    assert t.offer(pub(5, "a", "5"), now=11.2) is Offer.REPLACED  # held: waits its turn
    assert [(p.offset, p.data) for p in t.release(now=11.2)] == [(5, "5")]
    assert t.offer(pub(6, "a", "6"), now=11.7) is Offer.SEND


def test_held_values_go_in_offset_order_latest_per_key() -> None:
    t = Throttle(max_rate=1.0, merge=False)
    t.offer(pub(1, "a", "1"), now=0.0)
    for offset, key in [(2, "a"), (3, "b"), (4, "a"), (5, "c"), (6, "b")]:
        t.offer(pub(offset, key, str(offset)), now=0.5)
    assert [(p.offset, p.key) for p in t.release(now=1.0)] == [(4, "a"), (5, "c"), (6, "b")]


def test_partial_updates_are_merged_unless_deleted() -> None:
    t = Throttle(max_rate=1.0, merge=True)
    t.offer(pub(1, "a", '{"bid":1,"ask":2}'), now=0.0)
    t.offer(pub(2, "a", '{"bid":3,"ask":4}'), now=0.1)
    assert t.offer(pub(3, "a", '{"ask":5}'), now=0.2) is Offer.REPLACED
    (merged,) = t.release(now=1.0)
    assert merged.offset == 3 and json.loads(merged.data) == {"bid": 3, "ask": 5}
    t.offer(pub(4, "b", '{"bid":1}'), now=1.1)
    t.offer(pub(5, "b", "", deleted=True), now=1.2)
    (gone,) = t.release(now=2.0)
    assert gone.deleted and gone.data == ""


def test_reset_forgets_what_is_held() -> None:
    t = Throttle(max_rate=1.0, merge=False)
    t.offer(pub(1, "a", "1"), now=0.0)
    t.offer(pub(2, "a", "2"), now=0.1)
    t.reset()
    assert t.held is None and t.release(now=5.0) == []


def test_rate_zero_is_one_per_second() -> None:
    t = Throttle(max_rate=0.0, merge=False)
    t.offer(pub(1, "a", "1"), now=0.0)
    assert t.due == 1.0
