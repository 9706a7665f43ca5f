"""Redis coming back with fewer writes than it acknowledged, against the memory broker: the
publisher notices offsets going back per channel and epoch, and batches completing out of
order are not taken for a loss."""

from __future__ import annotations

from common.broker.memory import MemoryBroker
from ingest.publisher import Publisher, PublishResult


def test_offsets_going_back_are_noticed_per_channel_and_epoch() -> None:
    p = Publisher(MemoryBroker())

    def went_back(results: list[PublishResult]) -> list[int]:
        return p._went_back(results, {r.channel: p._seen.get(r.channel) for r in results})

    ok = [PublishResult("a", 5, "E", False), PublishResult("b", 2, "E", False)]
    assert went_back(ok) == []
    later = [
        PublishResult("a", 6, "E", False),  # goes on
        PublishResult("b", 9, "F", False),  # another epoch: a new history, fine
        PublishResult("a", 1, "E", True),  # a duplicate answers an old offset by design
        PublishResult("a", 6, "E", False, unchanged=True),  # the top as it is: fine
    ]
    assert went_back(later) == []
    back = [
        PublishResult("a", 6, "E", False),  # published at an offset it already got
        PublishResult("b", 8, "F", False, unchanged=True),  # the top fell below 9
    ]
    assert went_back(back) == [0, 1]


def test_batches_completing_out_of_order_are_not_taken_for_a_loss() -> None:
    """Two batches sent concurrently: the one sent first may complete last, with lower
    offsets than the other's. Only what was known before sending counts."""
    p = Publisher(MemoryBroker())
    p._went_back([PublishResult("a", 5, "E", False)], {"a": None})
    before = {"a": p._seen.get("a")}  # both batches sent now
    assert p._went_back([PublishResult("a", 9, "E", False)], before) == []  # second, first
    assert p._went_back([PublishResult("a", 7, "E", False)], before) == []  # first, last
    assert p._seen["a"] == ("E", 9)
    assert p._went_back([PublishResult("a", 8, "E", False)], {"a": p._seen["a"]}) == [0]
