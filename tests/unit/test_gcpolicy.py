"""edge/gcpolicy.py: the young generation's threshold raised while any recovery gate is
busy, the thresholds in effect before put back when the last one is idle; and the gate
telling its busy/idle transitions."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import pytest

from edge.admission import Gate
from edge.gcpolicy import StormGc, storm_gc
from edge.stats import EdgeStats


@pytest.fixture(autouse=True)
def thresholds() -> Iterator[None]:
    before = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    yield
    gc.set_threshold(*before)


def test_raised_while_busy_and_put_back() -> None:
    policy = StormGc(500_000)
    policy(True)
    assert gc.get_threshold() == (500_000, 10, 10)
    policy(False)
    assert gc.get_threshold() == (700, 10, 10)
    assert policy.storms == 1


def test_nested_gates_put_back_once_the_last_is_idle() -> None:
    policy = StormGc(500_000)
    policy(True)
    policy(True)  # a second gate of the process
    policy(False)
    assert gc.get_threshold() == (500_000, 10, 10)
    policy(False)
    assert gc.get_threshold() == (700, 10, 10)
    policy(False)  # an idle without a busy: nothing
    assert gc.get_threshold() == (700, 10, 10) and policy.busy == 0


def test_a_disabled_or_higher_threshold_is_left_alone() -> None:
    policy = StormGc(500_000)
    gc.set_threshold(0, 10, 10)
    policy(True)
    assert gc.get_threshold() == (0, 10, 10)
    policy(False)
    gc.set_threshold(900_000, 10, 10)
    policy(True)
    assert gc.get_threshold() == (900_000, 10, 10)
    policy(False)
    assert gc.get_threshold() == (900_000, 10, 10) and policy.storms == 0


def test_zero_is_off() -> None:
    assert storm_gc(0) is None
    assert storm_gc(500_000) is storm_gc(500_000)  # one per process


async def test_the_gate_tells_its_first_place_taken_and_its_last_given_back() -> None:
    told: list[bool] = []
    gate = Gate("recovery", 2, 10, 0.5, EdgeStats(), on_busy=told.append)
    assert await gate.enter()
    assert await gate.enter()
    assert told == [True]
    gate.leave()
    assert told == [True]
    gate.leave()
    assert told == [True, False]
    assert await gate.enter()
    gate.leave()
    assert told == [True, False, True, False]


async def test_a_place_passed_to_a_waiter_keeps_the_gate_busy() -> None:

    told: list[bool] = []
    gate = Gate("recovery", 1, 10, 0.5, EdgeStats(), on_busy=told.append)
    assert await gate.enter()
    waiting = asyncio.ensure_future(gate.enter())
    await asyncio.sleep(0)
    gate.leave()  # handed over: still busy
    assert await waiting
    assert told == [True]
    gate.leave()
    assert told == [True, False]


async def test_busy_only_from_busy_at_places_and_idle_once_none() -> None:
    """A trickle of reads leaves the collector alone: the gate reports a storm at
    `busy_at` places held, and its end only when every place is given back."""
    told: list[bool] = []
    gate = Gate("recovery", 10, 10, 0.5, EdgeStats(), on_busy=told.append, busy_at=3)
    assert await gate.enter()
    assert await gate.enter()
    gate.leave()
    gate.leave()
    assert told == []  # two at most: no storm
    for _ in range(4):
        assert await gate.enter()
    assert told == [True]
    for _ in range(3):
        gate.leave()
    assert told == [True]
    gate.leave()
    assert told == [True, False]
