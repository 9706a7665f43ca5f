"""Direct frame writes (edge/wire.py): clients get the same messages, in order, whichever
path a frame took."""

from __future__ import annotations

import asyncio
import json
from functools import partial

import httpx
import pytest

from ingest.publisher import Publisher
from ingest.upstream import UpstreamMessage
from tests.integration.conftest import EdgeFactory, EdgeServer
from tests.support.wsclient import ProtoClient


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


async def _counters(edge: object, *names: str) -> dict[str, float]:
    """The edge's `fanout_edge_<name>_total` counters, from its real /metrics."""
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{edge.http}/metrics")).text  # type: ignore[attr-defined]
    return {name: _metric(text, f"fanout_edge_{name}_total") for name in names}


async def _frames(edge: object) -> tuple[float, float]:
    """(frames sent, of them written directly)."""
    c = await _counters(edge, "frames_sent", "frames_direct")
    return c["frames_sent"], c["frames_direct"]


def _received(clients: list[ProtoClient]) -> int:
    """Frames the clients got: the edge counted at least these (and pings). Not one frame
    per publish: publications that reach the edge in one loop turn share a frame, which
    happens under load."""
    return sum(len(c.frames) for c in clients)


async def _publish_and_collect(
    edge: object, publisher: Publisher, n: int, clients: list[ProtoClient]
) -> int:
    for client in clients:
        await client.subscribe("trades.WIRE")
    last = 0
    for i in range(n):
        batch = [UpstreamMessage("trades.WIRE", {"i": i, "j": j}) for j in range(i % 4 + 1)]
        last = (await publisher.publish_batch(batch))[-1].offset
        if i % 7 == 0:
            await asyncio.sleep(0)
    def caught_up(c: ProtoClient) -> bool:
        return c.offsets["trades.WIRE"][-1:] == [last]

    for client in clients:
        await client.wait_for(partial(caught_up, client), 10)
    return last


@pytest.mark.integration
async def test_clients_of_both_codecs_get_everything_in_order_through_direct_writes(
    edge: EdgeServer, publisher: Publisher
) -> None:
    clients = [await ProtoClient.open(edge.url), await ProtoClient.open(edge.url, binary=True)]
    last = await _publish_and_collect(edge, publisher, 60, clients)
    for client in clients:
        assert client.offsets["trades.WIRE"] == list(range(1, last + 1))
        pubs = [m for m in client.messages if m.get("type") == "pub"]
        assert [p["data"]["i"] for p in pubs][:3] == [0, 1, 1]
    # Readers that keep up never fill the socket: every frame (the replies too) went direct.
    sent, direct = await _frames(edge)
    assert sent >= _received(clients) > 0 and direct == sent
    for client in clients:
        await client.close()


@pytest.mark.integration
@pytest.mark.parametrize("overrides", [{"direct_write": False}, {"compression": True}])
async def test_queue_path_when_direct_writes_are_off_or_compressing(
    edge_factory: EdgeFactory, publisher: Publisher, overrides: dict[str, object]
) -> None:
    edge = await edge_factory(**overrides)
    # websockets offers permessage-deflate by default: with compression on it is used.
    clients = [await ProtoClient.open(edge.url), await ProtoClient.open(edge.url, binary=True)]
    if overrides.get("compression"):
        assert clients[0].ws.protocol.extensions, "permessage-deflate was not negotiated"
    last = await _publish_and_collect(edge, publisher, 30, clients)
    for client in clients:
        assert client.offsets["trades.WIRE"] == list(range(1, last + 1))
    sent, direct = await _frames(edge)
    assert sent >= _received(clients) > 0 and direct == 0
    for client in clients:
        await client.close()


@pytest.mark.integration
@pytest.mark.parametrize(("binary", "max_frame_messages"), [(False, 1000), (True, 1000),
                                                           (False, 4)])
async def test_a_clients_channels_of_one_turn_go_out_in_one_frame(
    edge_factory: EdgeFactory, publisher: Publisher, binary: bool, max_frame_messages: int
) -> None:
    """A watchlist: one client on 6 channels, each publish round touching all 6 in one
    pipelined batch (so the edge gets them in one read, one flush). Every channel's
    messages arrive, in order, in one write and about one frame per round, not six (two
    when a frame may hold only 4 messages)."""
    edge = await edge_factory(max_frame_messages=max_frame_messages)
    channels = [f"quotes.W{i}" for i in range(6)]
    client = await ProtoClient.open(edge.url, binary=binary)
    for ch in channels:
        await client.subscribe(ch)
    before = await _counters(edge, "frames_sent", "writes")
    rounds = 20
    for i in range(rounds):
        await publisher.publish_batch([UpstreamMessage(ch, {"i": i}) for ch in channels])
    def all_of(ch: str) -> bool:
        return len(client.offsets[ch]) == rounds

    for ch in channels:
        await client.wait_for(partial(all_of, ch), 10)
        assert client.offsets[ch] == list(range(1, rounds + 1))
    after = await _counters(edge, "frames_sent", "writes")
    frames = after["frames_sent"] - before["frames_sent"]
    writes = after["writes"] - before["writes"]
    assert writes <= rounds * 1.5, (writes, frames)  # about one write per round
    if max_frame_messages >= 2 * len(channels):
        assert frames == writes  # each write one frame, whatever channels it carries
    else:  # the frame bound holds: at least messages / max_frame_messages frames
        assert frames >= rounds * len(channels) / max_frame_messages, (writes, frames)
    await client.close()



@pytest.mark.integration
async def test_a_burst_of_resubscribes_is_answered_in_one_write(
    edge: EdgeServer, publisher: Publisher
) -> None:
    """A client back from a reconnect sends its resubscribes together (fanout.js does; TCP
    and the browser coalesce them): their replies and replays go out together, in order,
    one write and one frame, not one each."""
    channels = [f"quotes.B{i}" for i in range(8)]
    holder = await ProtoClient.open(edge.url)  # the edge holds the channels: from memory
    for ch in channels:
        await holder.subscribe(ch)
    for i in range(3):
        await publisher.publish_batch([UpstreamMessage(ch, {"i": i}) for ch in channels])
    def holder_has_all() -> bool:
        return all(len(holder.offsets[ch]) == 3 for ch in channels)

    await holder.wait_for(holder_has_all, 10)
    client = await ProtoClient.open(edge.url)
    before = await _counters(edge, "writes", "frames_sent")
    frames_before = len(client.frames)
    proto = client.ws.protocol
    for ch in channels:
        rid = next(client.ids)
        epoch = holder.positions[ch][1]
        client._recover[rid] = (1, epoch)
        client.replies[rid] = asyncio.get_running_loop().create_future()
        proto.send_text(json.dumps({"type": "subscribe", "id": rid, "channel": ch,
                                    "recover": {"offset": 1, "epoch": epoch}}).encode())
    client.ws.transport.write(b"".join(proto.data_to_send()))  # one write, 8 frames
    def all_replayed() -> bool:
        return all(client.offsets.get(ch) == [2, 3] for ch in channels)

    await client.wait_for(all_replayed, 10)
    assert all(m["recovered"] is True for m in client.messages if m["type"] == "subscribed")
    after = await _counters(edge, "writes", "frames_sent")
    assert after["writes"] - before["writes"] == 1, (before, after)
    assert len(client.frames) - frames_before == 1  # 8 replies and 16 replays in one frame
    await client.close()
    await holder.close()
