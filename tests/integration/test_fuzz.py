"""A short live fuzz in the normal suite: mutated requests, garbage and broken framing to a
real edge process over many connections (tests/support/fuzz_live.py; `make fuzz` runs it
long)."""

from __future__ import annotations

import os

import pytest

from tests.integration.conftest import RedisServer

# --- live: a real edge process ---------------------------------------------------------------


@pytest.mark.integration
async def test_live_fuzz_short(redis_server: RedisServer, key_prefix: str) -> None:
    """A few seconds of tests/support/fuzz_live.py against a real edge: see its doc."""
    from tests.support.fuzz_live import run_live_fuzz

    report = await run_live_fuzz(redis_server.url, key_prefix,
                                 frames=int(os.environ.get("FANOUT_FUZZ_FRAMES", "20000")),
                                 seed=int(os.environ.get("FANOUT_FUZZ_SEED", "1")))
    print(report.text())
    report.check()
