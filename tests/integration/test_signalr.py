"""The SignalR JSON hub protocol client against a real test server (handshake, invocations,
pings, server timeout, Close, kill and restart, negotiate)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from common.backoff import Backoff
from ingest.feeds.signalr import (
    HubClosedError,
    HubConnection,
    HubConnectionLost,
    HubError,
    HubNotConnected,
    HubState,
)
from tests.support.signalr_server import HubFault, HubServer, wait_for
from tests.unit.test_signalr import RS

LOG = logging.getLogger("tests.signalr")


# --- against the test server ---------------------------------------------------------------


class RecordingRand:
    """A Backoff random source that records each (low, high) and returns high * factor."""

    def __init__(self, factor: float = 1.0) -> None:
        self.calls: list[tuple[float, float]] = []
        self.factor = factor

    def __call__(self, low: float, high: float) -> float:
        self.calls.append((low, high))
        return high * self.factor


@pytest.fixture
async def server() -> AsyncIterator[HubServer]:
    srv = HubServer(token="jwt-1", ping_interval=0.05)
    srv.methods["Add"] = lambda a, b: a + b

    def fail(*_: Any) -> None:
        raise HubFault("nope")

    srv.methods["Fail"] = fail
    await srv.start()
    yield srv
    await srv.kill()


def make_hub(server: HubServer, **kwargs: Any) -> HubConnection:
    options: dict[str, Any] = {
        "logger": LOG,
        "access_token": "jwt-1",
        "backoff": Backoff(base=0.02, cap=0.1),
        "ping_interval": 1.0,
        "server_timeout": 5.0,
        "open_timeout": 2.0,
        "invoke_timeout": 5.0,
    }
    options.update(kwargs)
    return HubConnection(server.url("/hubs/market"), **options)


@contextlib.asynccontextmanager
async def running(hub: HubConnection) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(hub.run())
    try:
        yield task
    finally:
        await hub.stop()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await task
        assert task.done()


async def live(hub: HubConnection) -> None:
    async with asyncio.timeout(5):
        await hub.wait_live()


@pytest.mark.integration
async def test_handshake_invoke_and_completions(server: HubServer) -> None:
    states: list[HubState] = []
    hub = make_hub(server, on_state=states.append)
    with pytest.raises(HubNotConnected):
        await hub.invoke("Add", 1, 2)
    async with running(hub):
        await live(hub)
        assert server.handshakes == 1
        (conn,) = server.live("/hubs/market")
        assert conn.query["access_token"] == "jwt-1"  # the JWT travels in the query
        assert await hub.invoke("Add", 1, 2) == 3
        assert await hub.invoke("Void") is None
        with pytest.raises(HubError, match="nope"):
            await hub.invoke("Fail")
        await hub.send("Fire", {"a": 1})
        await wait_for(lambda: server.calls_to("Fire"), what="the fire-and-forget call")
        (fire,) = server.calls_to("Fire")
        assert fire.invocation_id is None and fire.arguments == [{"a": 1}]
        ids = [c.invocation_id for c in server.calls if c.invocation_id is not None]
        assert len(ids) == len(set(ids)) == 3
        with pytest.raises(TimeoutError):
            await hub.invoke("Hang", timeout=0.05)
    assert states == [HubState.CONNECTING, HubState.LIVE, HubState.STOPPED]


@pytest.mark.integration
async def test_server_invocations_reach_handlers(server: HubServer) -> None:
    hub = make_hub(server)
    got: list[tuple[str, tuple[Any, ...]]] = []

    async def async_handler(*args: Any) -> None:
        got.append(("async", args))

    def boom(*_: Any) -> None:
        raise RuntimeError("handler bug")

    hub.on("GatewayQuote", lambda *args: got.append(("sync", args)))
    hub.on("gatewayquote", async_handler)  # targets match case-insensitively
    hub.on("Echo", lambda x: {"echo": x})
    hub.on("Boom", boom)
    async with running(hub):
        await live(hub)
        await server.emit("GatewayQuote", "CON.F.US.MNQ.Z25", {"bestBid": 1.25})
        await server.emit("NobodyListens", 1)
        await server.emit("Boom")  # a failing handler does not end the connection
        await server.emit("GATEWAYQUOTE", "C2", {})
        await wait_for(lambda: len(got) == 4, what="4 handler calls")
        assert got == [
            ("sync", ("CON.F.US.MNQ.Z25", {"bestBid": 1.25})),
            ("async", ("CON.F.US.MNQ.Z25", {"bestBid": 1.25})),
            ("sync", ("C2", {})),
            ("async", ("C2", {})),
        ]
        # Invocations with an id expect the client's result (or an error) back.
        echo = await server.invoke_client("Echo", 7)
        missing = await server.invoke_client("Missing")
        failing = await server.invoke_client("Boom")
        await wait_for(lambda: len(server.client_completions) == 3, what="3 client completions")
        by_id = {c["invocationId"]: c for c in server.client_completions}
        assert by_id[echo] == {"type": 3, "invocationId": echo, "result": {"echo": 7}}
        assert by_id[missing]["error"] == "Client didn't provide a result."
        assert "Boom" in by_id[failing]["error"] and "result" not in by_id[failing]
        assert hub.connects == 1


@pytest.mark.integration
async def test_records_batched_and_split_across_frames(server: HubServer) -> None:
    hub = make_hub(server)
    got: list[Any] = []
    hub.on("E", got.append)
    async with running(hub):
        await live(hub)
        one, two, three = (f'{{"type":1,"target":"E","arguments":[{i}]}}{RS}' for i in (1, 2, 3))
        await server.send_raw(one + two)  # two records, one frame
        await server.send_raw(three[:10])  # one record, two frames
        await server.send_raw(three[10:] + '{"type":6}\x1e')
        await wait_for(lambda: len(got) == 3, what="3 events")
        assert got == [1, 2, 3]


@pytest.mark.integration
async def test_client_pings_while_idle_and_server_pings_keep_it_alive(server: HubServer) -> None:
    hub = make_hub(server, ping_interval=0.05, server_timeout=0.3)
    async with running(hub):
        await live(hub)
        await wait_for(lambda: server.pings_received >= 5, what="client pings")
        # 20 server pings span more than two server timeouts: the connection held.
        start = server.pings_sent
        await wait_for(lambda: server.pings_sent >= start + 20, what="server pings")
        assert hub.connects == 1 and hub.state is HubState.LIVE


@pytest.mark.integration
async def test_silent_server_is_held_dead_and_reconnected(server: HubServer) -> None:
    """Under load the event loop may stall past a short server timeout on its own, so the
    test does not count connections from the start: it checks what follows the mute."""
    states: list[HubState] = []
    hub = make_hub(server, ping_interval=0.05, server_timeout=1.0, on_state=states.append)
    hub.subscribe("SubscribeAccounts")
    async with running(hub):
        await live(hub)
        first, seen = hub.connects, len(states)
        server.muted = True  # no pings, no completions: the TCP connection stays open
        await wait_for(lambda: hub.state is not HubState.LIVE, 30, what="the timeout")
        server.muted = False
        await wait_for(lambda: hub.connects > first and hub.state is HubState.LIVE, 30,
                       what="reconnect")
        assert states[seen:seen + 2] == [HubState.BACKING_OFF, HubState.CONNECTING]
        # Resubscribed on the connection it is live on now.
        await wait_for(lambda: [c.connection for c in server.calls_to("SubscribeAccounts")][-1]
                       == hub.connects, 30, what="resubscribe")


@pytest.mark.integration
async def test_close_with_allow_reconnect_reconnects_and_resubscribes(server: HubServer) -> None:
    hub = make_hub(server)
    hub.subscribe("SubscribeContractQuotes", "CON.F.US.MNQ.Z25")
    hub.subscribe("SubscribeOrders", 123)
    async with running(hub):
        await live(hub)
        await server.close_all(error="Server is restarting", allow_reconnect=True)
        await wait_for(lambda: hub.connects == 2 and hub.state is HubState.LIVE, what="reconnect")
        calls = [(c.connection, c.target, c.arguments) for c in server.calls]
        assert sorted(calls) == [  # the subscriptions are invoked concurrently
            (1, "SubscribeContractQuotes", ["CON.F.US.MNQ.Z25"]),
            (1, "SubscribeOrders", [123]),
            (2, "SubscribeContractQuotes", ["CON.F.US.MNQ.Z25"]),
            (2, "SubscribeOrders", [123]),
        ]


@pytest.mark.integration
async def test_close_without_reconnect_raises_when_so_configured(server: HubServer) -> None:
    hub = make_hub(server, reconnect_when_refused=False)
    async with running(hub) as task:
        await live(hub)
        await server.close_all(error="Unauthorized")
        with pytest.raises(HubClosedError, match="Unauthorized"):
            async with asyncio.timeout(5):
                await task
        assert hub.state is HubState.STOPPED


@pytest.mark.integration
async def test_close_without_reconnect_waits_the_longest_delays(server: HubServer) -> None:
    rand = RecordingRand(factor=0.0)  # no wait, but the ceiling drawn from is recorded
    hub = make_hub(server, backoff=Backoff(base=0.02, cap=0.5, rand=rand))
    async with running(hub):
        await live(hub)
        await server.close_all(error="Unauthorized", allow_reconnect=False)
        await wait_for(lambda: hub.connects == 2 and hub.state is HubState.LIVE, what="reconnect")
        assert rand.calls == [(0.0, 0.5)]


@pytest.mark.integration
async def test_kill_and_restart_reconnects_with_backoff_and_resubscribes(
    server: HubServer,
) -> None:
    rand = RecordingRand()
    states: list[HubState] = []
    hub = make_hub(
        server, backoff=Backoff(base=0.01, cap=0.08, rand=rand), on_state=states.append
    )
    hub.subscribe("SubscribeContractTrades", "CON.F.US.EP.U25")
    opened: list[int] = []
    hub.on_open(lambda: opened.append(hub.connects))
    async with running(hub):
        await live(hub)
        pending = asyncio.create_task(hub.invoke("Hang"))
        await wait_for(lambda: server.calls_to("Hang"), what="the hanging call")
        await server.kill()
        with pytest.raises(HubConnectionLost):
            await pending
        # While the server is down every attempt fails: the schedule is the capped
        # exponential, drawn with full jitter from [0, ceiling].
        await wait_for(lambda: len(rand.calls) >= 6, what="6 failed attempts")
        assert rand.calls[:6] == [(0, 0.01), (0, 0.02), (0, 0.04), (0, 0.08), (0, 0.08),
                                  (0, 0.08)]
        assert hub.state in (HubState.BACKING_OFF, HubState.CONNECTING)
        await server.start()  # the same port
        await wait_for(lambda: hub.connects == 2 and hub.state is HubState.LIVE, what="reconnect")
        assert hub.backoff.attempt == 0  # reset once live
        subs = server.calls_to("SubscribeContractTrades")
        assert [(c.arguments, c.connection) for c in subs] == [
            (["CON.F.US.EP.U25"], 1), (["CON.F.US.EP.U25"], 2),
        ]
        assert opened == [1, 2]
        assert states[:3] == [HubState.CONNECTING, HubState.LIVE, HubState.BACKING_OFF]
        assert states[-1] is HubState.LIVE
        assert await hub.invoke("Add", 2, 3) == 5


@pytest.mark.integration
async def test_refused_subscription_does_not_stop_the_others(server: HubServer) -> None:
    hub = make_hub(server)
    hub.subscribe("Fail")
    hub.subscribe("SubscribeAccounts")
    async with running(hub):
        await live(hub)
        assert [c.target for c in server.calls] in (
            ["Fail", "SubscribeAccounts"], ["SubscribeAccounts", "Fail"]
        )


@pytest.mark.integration
async def test_negotiate_then_connect_with_the_connection_token(server: HubServer) -> None:
    hub = make_hub(server, skip_negotiation=False)
    async with running(hub):
        await live(hub)
        assert server.negotiations == 1
        (conn,) = server.live()
        assert conn.query["id"] and conn.query["access_token"] == "jwt-1"
        await server.close_all(allow_reconnect=True)
        await wait_for(lambda: hub.connects == 2 and hub.state is HubState.LIVE, what="reconnect")
        assert server.negotiations == 2  # a connection token is good for one connection


@pytest.mark.integration
async def test_bad_token_is_refused_then_a_fresh_one_is_used(server: HubServer) -> None:
    tokens = ["expired"]
    for skip in (True, False):
        hub = make_hub(server, access_token=lambda: tokens[-1], skip_negotiation=skip)
        enough = server.rejected + 2
        async with running(hub):
            await wait_for(lambda: server.rejected >= enough, what="refused attempts")  # noqa: B023
            assert hub.connects == 0 and hub.state is not HubState.LIVE
            tokens.append("jwt-1")
            await live(hub)
        tokens.append("expired")


@pytest.mark.integration
async def test_handshake_error_backs_off(server: HubServer) -> None:
    server.handshake_error = "Handshake was canceled."
    hub = make_hub(server)
    async with running(hub):
        await wait_for(lambda: hub.backoff.attempt >= 2, what="two failed handshakes")
        assert hub.connects == 0
        server.handshake_error = None
        await live(hub)


@pytest.mark.integration
async def test_stop_while_backing_off_returns_promptly(server: HubServer) -> None:
    hub = make_hub(server, backoff=Backoff(base=30.0, cap=30.0, rand=lambda lo, hi: hi))
    await server.kill()
    task = asyncio.create_task(hub.run())
    await wait_for(lambda: hub.state is HubState.BACKING_OFF, what="backing off")
    await hub.stop()
    async with asyncio.timeout(2):
        await task
    assert hub.state is HubState.STOPPED
