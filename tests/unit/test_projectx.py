"""The ProjectX gateway adapter: the mappings (pure, exact); the feed against the SignalR
test server is tests/integration/test_projectx.py."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest

from common.channels import parse_channel
from ingest.feeds.projectx import (
    DomType,
    ProjectXMapper,
    digest,
    parse_ts,
    price_key,
    user_items,
)
from ingest.upstream import UpstreamMessage

LOG = logging.getLogger("tests.projectx")
MNQ = "CON.F.US.MNQ.Z25"
ES = "CON.F.US.EP.U25"
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def iso(ts: float) -> str:
    """A gateway timestamp, with the 7 fractional digits .NET writes."""
    whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts))
    return f"{whole}.{round((ts % 1) * 10_000_000):07d}+00:00"


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def mapper(**kwargs: Any) -> ProjectXMapper:
    options: dict[str, Any] = {"logger": LOG, "run_id": "run", "clock": Clock()}
    options.update(kwargs)
    return ProjectXMapper([MNQ, ES], [123], **options)


def assert_valid(messages: list[UpstreamMessage]) -> None:
    for m in messages:
        parse_channel(m.channel)


# --- pure helpers --------------------------------------------------------------------------


def test_parse_ts() -> None:
    assert parse_ts("2026-01-01T00:00:00Z") == T0
    assert parse_ts("2026-01-01T00:00:01.5000000+00:00") == T0 + 1.5
    assert parse_ts("2026-01-01T01:00:00+01:00") == T0
    assert parse_ts("2026-01-01T00:00:00") == T0  # naive: the gateway's UTC
    assert parse_ts(iso(T0 + 0.25)) == T0 + 0.25
    for bad in (None, "", "yesterday", 1767225600):
        assert parse_ts(bad) is None


def test_price_key() -> None:
    assert price_key(21000.0) == "21000"
    assert price_key(21000.25) == "21000.25"
    assert price_key(0.1 + 0.2) == "0.30000000000000004"  # exact, never rounded together
    assert price_key(1.08455) == "1.08455"
    assert price_key(1e-7) == "0.0000001"


def test_user_items_accept_every_shape() -> None:
    order = {"id": 1}
    assert user_items([order]) == [order]
    assert user_items([[order, order]]) == [order, order]
    assert user_items([{"action": 1, "data": order}]) == [order]
    assert user_items([[{"action": 0, "data": order}], order]) == [order, order]
    assert user_items([None, 5, "x"]) == []


# --- market hub mapping --------------------------------------------------------------------


def test_partial_quotes_merge_into_the_full_quote() -> None:
    m = mapper()
    full = {
        "symbol": "F.US.MNQ", "symbolName": "/MNQ", "lastPrice": 21000.25, "bestBid": 21000.0,
        "bestAsk": 21000.5, "change": 25.5, "changePercent": 0.12, "open": 20980.0,
        "high": 21010.0, "low": 20970.0, "volume": 12000, "lastUpdated": iso(T0),
        "timestamp": iso(T0),
    }
    (first,) = m.quote(MNQ, full)
    assert first.channel == f"quotes.{MNQ}" and not first.key and not first.delete
    assert first.data == {
        "symbol": MNQ, "contract": MNQ, "upstream_symbol": "F.US.MNQ", "symbol_name": "/MNQ",
        "last": 21000.25, "bid": 21000.0, "ask": 21000.5, "change": 25.5, "change_pct": 0.12,
        "open": 20980.0, "high": 21010.0, "low": 20970.0, "volume": 12000,
        "ts": round(T0 * 1000),
    }
    # A partial update: only what changed; a null keeps the old value.
    (second,) = m.quote(MNQ, {"bestBid": 21000.25, "lastPrice": None, "timestamp": iso(T0 + 1)})
    assert second.data == {**first.data, "bid": 21000.25, "ts": round((T0 + 1) * 1000)}
    (third,) = m.quote(MNQ, {"volume": 12005, "bidSize": 7})
    assert third.data == {**second.data, "volume": 12005, "bid_size": 7}
    # Nothing changed: nothing published.
    assert m.quote(MNQ, {"volume": 12005}) == []
    # Another contract has its own quote.
    (other,) = m.quote(ES, {"bestAsk": 6000.5})
    assert other.channel == f"quotes.{ES}" and other.data == {
        "symbol": ES, "contract": ES, "ask": 6000.5,
    }
    # States: deduplicated by the snapshot (if_changed); ids only make retries exact.
    assert other.msg_id == "run:4"
    assert all(q.if_changed for q in (first, second, third, other))
    assert m.quote("CON.F.US.NOPE.Z25", full) == [] and m.quote(MNQ, "junk") == []
    assert m.malformed == 1


def test_quotes_are_states_published_if_changed() -> None:
    a, b = mapper(run_id="a"), mapper(run_id="b")
    update = {"bestBid": 1.0, "bestAsk": 2.0, "timestamp": iso(T0)}
    (qa,), (qb,) = a.quote(MNQ, update), b.quote(MNQ, update)
    # Two processes (a failover) publish the same state: the snapshot, not the id, makes the
    # second one a no-op. The ids are the process's own, for exact retries.
    assert qa.data == qb.data and qa.if_changed and qb.if_changed
    assert (qa.msg_id, qb.msg_id) == ("a:1", "b:1")
    # A -> B -> A under one timestamp: three messages, none taken for another.
    out = [x for p in (1.5, 1.0) for x in a.quote(MNQ, {"bestBid": p})]
    assert [x.data["bid"] for x in out] == [1.5, 1.0]
    assert [x.msg_id for x in out] == ["a:2", "a:3"] and all(x.if_changed for x in out)


def test_trades_feed_the_trade_channel_and_one_second_and_one_minute_bars() -> None:
    clock = Clock(T0 + 200)
    m = mapper(clock=clock)
    out = m.trades(MNQ, [
        {"symbolId": "F.US.MNQ", "price": 100.0, "timestamp": iso(T0 + 0.2), "type": 0,
         "volume": 2},
        {"symbolId": "F.US.MNQ", "price": 101.0, "timestamp": iso(T0 + 0.7), "type": 1,
         "volume": 3},
    ])
    assert [(x.channel, x.data) for x in out] == [
        (f"trades.{MNQ}", {"symbol": MNQ, "contract": MNQ, "price": 100.0, "size": 2,
                          "side": "buy", "ts": round((T0 + 0.2) * 1000)}),
        (f"trades.{MNQ}", {"symbol": MNQ, "contract": MNQ, "price": 101.0, "size": 3,
                          "side": "sell", "ts": round((T0 + 0.7) * 1000)}),
    ]
    assert [x.msg_id for x in out] == [
        f"mt:{iso(T0 + 0.2)}:{digest(out[0].data)}:0",
        f"mt:{iso(T0 + 0.7)}:{digest(out[1].data)}:0",
    ]
    assert not any(x.if_changed for x in out)  # events: two equal trades are two trades
    assert m.next_bar_close() == T0 + 1
    # A trade in the next second closes the first 1 s bar, which comes before it.
    out = m.trades(MNQ, {"price": 99.0, "timestamp": iso(T0 + 1.1), "type": 0, "volume": 1.0})
    assert [x.channel for x in out] == [f"bars.1s.{MNQ}", f"trades.{MNQ}"]
    assert out[0].data == {"symbol": MNQ, "interval": "1s", "t": round(T0 * 1000), "o": 100.0,
                           "h": 101.0, "l": 100.0, "c": 101.0, "v": 5, "n": 2}
    assert out[0].msg_id == f"b:{int(T0)}"
    # A trade a minute later closes the open 1 s bar and the first 1 m bar.
    out = m.trades(MNQ, {"price": 98.0, "timestamp": iso(T0 + 60.5), "type": 1, "volume": 4})
    assert [x.channel for x in out] == [f"bars.1s.{MNQ}", f"bars.1m.{MNQ}", f"trades.{MNQ}"]
    assert out[1].data == {"symbol": MNQ, "interval": "1m", "t": round(T0 * 1000), "o": 100.0,
                           "h": 101.0, "l": 99.0, "c": 99.0, "v": 6, "n": 3}
    # Quiet: the open bars close on time, each when its interval has ended.
    assert m.flush_bars(T0 + 60.9) == []
    (one_second,) = m.flush_bars(T0 + 61.0)
    assert one_second.channel == f"bars.1s.{MNQ}" and one_second.data["t"] == (T0 + 60) * 1000
    assert m.next_bar_close() == T0 + 120
    (one_minute,) = m.flush_bars(T0 + 120)
    assert one_minute.channel == f"bars.1m.{MNQ}" and one_minute.data["v"] == 4
    assert m.next_bar_close() is None
    # Without a timestamp a trade is counted at the local clock.
    (trade,) = m.trades(ES, {"price": 6000.0, "volume": 1, "type": 0})
    assert trade.data["ts"] == round(clock.t * 1000)
    assert trade.msg_id == "run:1"  # and no id but one of this process
    assert m.trades(ES, [{"price": "x", "volume": 1}, {"volume": 1}, 7]) == []
    assert m.trades(ES, []) == [] and m.malformed == 3


def trade(ts: float, price: float = 100.0, volume: int = 1, kind: int = 0) -> dict[str, Any]:
    return {"symbolId": "F.US.MNQ", "price": price, "timestamp": iso(ts), "type": kind,
            "volume": volume}


def trade_ids(m: ProjectXMapper, *events: list[dict[str, Any]]) -> list[str]:
    return [x.msg_id for e in events for x in m.trades(MNQ, e) if x.channel.startswith("trades")]


def test_trade_ids_are_the_same_in_every_process_and_count_equal_trades() -> None:
    events = [
        [trade(T0 + 0.1), trade(T0 + 0.1)],  # two equal trades in one timestamp
        [trade(T0 + 0.1)],  # and a third, in a later event
        [trade(T0 + 0.1, price=101.0), trade(T0 + 0.2)],
    ]
    a, b = mapper(run_id="a"), mapper(run_id="b")
    ids = trade_ids(a, *events)
    assert ids == trade_ids(b, *events)  # another run id, the same ids: a failover dedups
    at = parse_ts(iso(T0 + 0.1))
    assert at is not None
    equal = digest({"symbol": MNQ, "contract": MNQ, "price": 100.0, "size": 1, "side": "buy",
                    "ts": round(at * 1000)})
    assert ids[:3] == [f"mt:{iso(T0 + 0.1)}:{equal}:{k}" for k in range(3)]
    assert len(set(ids)) == 5 and all(i.startswith("mt:") for i in ids)

    # A reconnect: the gateway re-sends recent trades; counted afresh, they get their ids
    # again (duplicates), and a new equal trade after them is a new one.
    a.market_connected()
    assert trade_ids(a, events[0], events[1]) == ids[:3]
    assert trade_ids(a, [trade(T0 + 0.1)]) == [f"mt:{iso(T0 + 0.1)}:{equal}:3"]
    # So does a new session (a new term).
    a.new_session()
    assert trade_ids(a, *events) == ids


def test_trade_counters_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ingest.feeds.projectx.TRADE_STAMPS_KEPT", 3)
    m = mapper()
    first = trade_ids(m, [trade(T0 + i) for i in range(5)])
    assert len(m.markets[MNQ].trade_counts) == 3  # T0 + 2 .. T0 + 4
    # A late trade whose counters are gone: its k is unknown, so an id of this process
    # (never dropped as a duplicate of the first); a still-counted one counts on.
    assert trade_ids(m, [trade(T0 + 1)]) == ["run:1"]
    assert trade_ids(m, [trade(T0 + 3)]) == [first[3][:-1] + "1"]
    # A later timestamp is counted as usual, and pushes the oldest out.
    assert trade_ids(m, [trade(T0 + 9)])[0].endswith(":0")
    assert trade_ids(m, [trade(T0 + 2)]) == ["run:2"]
    # A long timestamp goes in as its digest: the id stays within the publisher's limit.
    long_stamp = iso(T0 + 10)[:-6] + "0" * 300 + "+00:00"
    (long_id,) = trade_ids(m, [{**trade(T0 + 10), "timestamp": long_stamp}])
    assert long_id.startswith(f"mt:{digest(long_stamp)}:") and len(long_id) < 64


def test_depth_entries_are_keyed_levels_with_deletes() -> None:
    m = mapper()
    entries = [
        {"timestamp": iso(T0), "type": DomType.BID, "price": 21000.0, "volume": 10,
         "currentVolume": 4},
        {"timestamp": iso(T0), "type": DomType.ASK, "price": 21000.5, "volume": 7},
        {"timestamp": iso(T0), "type": DomType.BEST_BID, "price": 21000.25, "volume": 3},
        {"timestamp": iso(T0), "type": DomType.NEW_BEST_ASK, "price": 21000.25, "volume": 2},
        {"timestamp": iso(T0), "type": DomType.BEST_ASK, "price": 21000.75, "volume": 1},
        {"timestamp": iso(T0), "type": DomType.NEW_BEST_BID, "price": 20999.75, "volume": 5},
        # Not book levels: skipped.
        {"timestamp": iso(T0), "type": DomType.TRADE, "price": 21000.25, "volume": 1},
        {"timestamp": iso(T0), "type": DomType.FILL, "price": 21000.25, "volume": 1},
        {"timestamp": iso(T0), "type": DomType.LOW, "price": 20900.0, "volume": 0},
        {"timestamp": iso(T0), "type": DomType.HIGH, "price": 21100.0, "volume": 0},
        {"timestamp": iso(T0), "type": DomType.UNKNOWN, "price": 1.0, "volume": 0},
    ]
    out = m.depth(MNQ, entries)
    assert_valid(out)
    assert [(x.channel, x.key, x.delete) for x in out] == [
        (f"depth.{MNQ}", "bid:21000", False),
        (f"depth.{MNQ}", "ask:21000.5", False),
        (f"depth.{MNQ}", "bid:21000.25", False),
        (f"depth.{MNQ}", "ask:21000.25", False),
        (f"depth.{MNQ}", "ask:21000.75", False),
        (f"depth.{MNQ}", "bid:20999.75", False),
    ]
    assert out[0].data == {"side": "bid", "price": 21000.0, "size": 10, "current_volume": 4,
                           "ts": round(T0 * 1000)}
    assert m.skipped_depth == 5
    # Size 0 deletes the key (the payload says so too).
    (gone,) = m.depth(MNQ, [{"type": DomType.ASK, "price": 21000.5, "volume": 0}])
    assert (gone.key, gone.delete, gone.data) == (
        "ask:21000.5", True, {"side": "ask", "price": 21000.5, "size": 0}
    )
    m.depth(ES, {"type": DomType.BID, "price": 6000.0, "volume": 1})
    # Reset deletes every level still known for that contract, and only those.
    reset = m.depth(MNQ, [{"type": DomType.RESET, "price": 0, "volume": 0}])
    assert [(x.key, x.delete) for x in reset] == [
        ("ask:21000.25", True), ("ask:21000.75", True), ("bid:20999.75", True),
        ("bid:21000", True), ("bid:21000.25", True),
    ]
    assert all(x.data["size"] == 0 for x in reset)
    assert m.depth(MNQ, [{"type": DomType.RESET}]) == []
    # Before a resubscribe: every contract's levels.
    assert [(x.channel, x.key) for x in m.reset_depth()] == [(f"depth.{ES}", "bid:6000")]
    assert m.reset_depth() == []
    assert m.depth(MNQ, [{"type": DomType.BID, "price": None, "volume": 1}, "x"]) == []
    assert m.malformed == 2
    ids = [x.msg_id for x in out + reset]
    assert len(ids) == len(set(ids)) and all(i.startswith("run:") for i in ids)
    assert all(x.if_changed for x in out + reset + [gone])  # levels are states


def test_depth_levels_not_reported_again_after_a_connect_are_swept() -> None:
    m = mapper()
    m.depth(MNQ, [{"type": DomType.BID, "price": p, "volume": 1} for p in (1.0, 2.0, 3.0)])
    m.depth(ES, {"type": DomType.ASK, "price": 6000.0, "volume": 1})
    m.mark_depth_stale()
    # The gateway's book after the connect: 1.0 again (unchanged: the script will skip
    # it), 2.0 deleted, 4.0 new; 3.0 and ES's level are not reported.
    again = m.depth(MNQ, [
        {"type": DomType.BID, "price": 1.0, "volume": 1},
        {"type": DomType.BID, "price": 2.0, "volume": 0},
        {"type": DomType.BID, "price": 4.0, "volume": 2},
    ])
    assert [(x.key, x.delete, x.if_changed) for x in again] == [
        ("bid:1", False, True), ("bid:2", True, True), ("bid:4", False, True),
    ]
    swept = m.sweep_depth()
    assert [(x.channel, x.key, x.delete, x.if_changed, x.data) for x in swept] == [
        (f"depth.{MNQ}", "bid:3", True, True, {"side": "bid", "price": 3.0, "size": 0}),
        (f"depth.{ES}", "ask:6000", True, True, {"side": "ask", "price": 6000.0, "size": 0}),
    ]
    assert set(m.markets[MNQ].book) == {"bid:1", "bid:4"} and m.sweep_depth() == []
    # A Reset during the window clears the stale marks with the book.
    m.mark_depth_stale()
    m.depth(MNQ, {"type": DomType.RESET})
    assert m.sweep_depth() == []


def test_a_new_leader_takes_the_book_from_the_depth_snapshot() -> None:
    m = mapper()
    m.depth(MNQ, {"type": DomType.BID, "price": 9.0, "volume": 1})  # from an earlier term
    seeded = m.seed_depth(MNQ, {
        "bid:21000": {"side": "bid", "price": 21000.0, "size": 3},
        "ask:21000.25": {"side": "ask", "price": 21000.25, "size": 1, "ts": 1},
        "ask:21000.5": "not a level",  # the key still says which level it is
        "bid:junk": {"side": "bid"}, "what:1": {"price": 1.0},
    })
    assert seeded == 3
    assert m.markets[MNQ].book == {
        "bid:21000": ("bid", 21000.0), "ask:21000.25": ("ask", 21000.25),
        "ask:21000.5": ("ask", 21000.5),
    }
    m.mark_depth_stale()
    m.depth(MNQ, {"type": DomType.BID, "price": 21000.0, "volume": 3})
    assert [x.key for x in m.sweep_depth()] == ["ask:21000.25", "ask:21000.5"]


# --- user hub mapping ----------------------------------------------------------------------


ACCOUNT = {"id": 123, "name": "Main", "balance": 10000.5, "canTrade": True, "isVisible": True,
           "simulated": False}
ORDER = {"id": 789, "accountId": 123, "contractId": ES, "symbolId": "F.US.EP",
         "creationTimestamp": iso(T0), "updateTimestamp": iso(T0 + 60), "status": 1, "type": 1,
         "side": 0, "size": 1, "limitPrice": 6000.5, "stopPrice": None, "fillVolume": 0,
         "filledPrice": None, "customTag": "strategy-1"}
POSITION = {"id": 456, "accountId": 123, "contractId": ES, "creationTimestamp": iso(T0),
            "type": 1, "size": 2, "averagePrice": 6000.25}
TRADE = {"id": 101112, "accountId": 123, "contractId": ES, "creationTimestamp": iso(T0),
         "price": 6000.75, "profitAndLoss": 50.25, "fees": 2.5, "side": 0, "size": 1,
         "voided": False, "orderId": 789}


def test_user_events_go_to_the_account_channels() -> None:
    m = mapper()
    (balance,) = m.account(ACCOUNT)
    assert (balance.channel, balance.data, balance.key) == ("account.123.balance", ACCOUNT, "")
    assert m.account({"action": 1, "data": dict(ACCOUNT)}) == []  # unchanged
    (changed,) = m.account([{**ACCOUNT, "balance": 9990.0}])
    assert changed.data["balance"] == 9990.0 and changed.msg_id != balance.msg_id

    (order,) = m.order(ORDER)
    assert (order.channel, order.key, order.delete) == ("account.123.orders", "789", False)
    assert order.msg_id == f"o:789:{iso(T0 + 60)}:{digest(ORDER)}"
    filled = {**ORDER, "status": 2, "fillVolume": 1, "filledPrice": 6000.5,
              "updateTimestamp": iso(T0 + 61)}
    (done,) = m.order([{"action": 1, "data": filled}])
    assert (done.key, done.delete, done.data) == ("789", True, filled)  # final state, deleted
    assert m.order(ORDER)[0].msg_id == order.msg_id  # a resent update: the same id
    keep = mapper(delete_closed_orders=False)
    assert keep.order(filled)[0].delete is False

    (pos,) = m.position(POSITION)
    assert (pos.channel, pos.key, pos.delete) == ("account.123.positions", ES, False)
    assert m.position(POSITION) == []  # unchanged
    (flat,) = m.position({**POSITION, "size": 0})
    assert (flat.key, flat.delete) == (ES, True)
    # Balances and positions are states; orders and trades are events with ids.
    assert balance.if_changed and changed.if_changed and pos.if_changed and flat.if_changed
    assert not order.if_changed and not done.if_changed
    # A new session (a new term) forgets what this process published: another may have
    # published since, so the snapshot decides.
    m.new_session()
    assert m.position({**POSITION, "size": 0})[0].if_changed
    assert m.account({**ACCOUNT, "balance": 9990.0})[0].if_changed

    (trade,) = m.user_trade(TRADE)
    assert (trade.channel, trade.msg_id, trade.data) == ("account.123.trades", "t:101112", TRADE)
    (void,) = m.user_trade({**TRADE, "voided": True})
    assert void.msg_id == "t:101112:voided"
    assert not trade.if_changed and not void.if_changed

    # Another account's events are not ours; malformed ones are dropped.
    assert m.account({**ACCOUNT, "id": 999}) == []
    assert m.order({**ORDER, "accountId": 999}) == []
    assert m.position({**POSITION, "accountId": 999}) == []
    assert m.user_trade({**TRADE, "accountId": 999}) == []
    assert m.order({**ORDER, "id": None}) == [] and m.position({**POSITION, "size": "2"}) == []
    all_accounts = ProjectXMapper([], None, logger=LOG, run_id="r")
    assert all_accounts.account({**ACCOUNT, "id": 999})[0].channel == "account.999.balance"
    assert all_accounts.account({**ACCOUNT, "id": "bad id"}) == []


def test_channels_are_valid_and_symbols_configurable() -> None:
    m = mapper(symbol={MNQ: "MNQZ5"})
    messages = [
        *m.quote(MNQ, {"bestBid": 1.0}),
        *m.trades(MNQ, {"price": 1.0, "volume": 1, "timestamp": iso(T0)}),
        *m.depth(MNQ, {"type": DomType.BID, "price": 1.0, "volume": 1}),
        *m.flush_bars(T0 + 60),
        *m.quote(ES, {"bestBid": 1.0}),
        *m.account(ACCOUNT), *m.order(ORDER), *m.position(POSITION), *m.user_trade(TRADE),
    ]
    assert [(parse_channel(x.channel).kind, parse_channel(x.channel).symbol) for x in messages] == [
        ("quotes", "MNQZ5"), ("trades", "MNQZ5"), ("depth", "MNQZ5"), ("bars", "MNQZ5"),
        ("bars", "MNQZ5"), ("quotes", ES), ("account.balance", None), ("account.orders", None),
        ("account.positions", None), ("account.trades", None),
    ]
    assert messages[0].data["symbol"] == "MNQZ5" and messages[0].data["contract"] == MNQ
    upper = mapper(symbol=str.upper)
    assert upper.markets[MNQ].quotes == f"quotes.{MNQ}"
    with pytest.raises(ValueError, match="bad symbol"):
        ProjectXMapper(["CON F US"], logger=LOG)
    with pytest.raises(ValueError, match="duplicate"):
        ProjectXMapper([MNQ, MNQ], logger=LOG)
