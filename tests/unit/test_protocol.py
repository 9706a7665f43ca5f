"""The wire protocol (common/protocol.py) and the errors it reports (common/errors.py).

Pure: no sockets, no Redis.
"""

from __future__ import annotations

import json
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common import protocol
from common.channels import parse_channel
from common.errors import (
    BadChannel,
    BadRequest,
    CloseCode,
    Disconnect,
    NotSubscribed,
    RequestError,
    UnknownType,
)
from common.protocol import (
    MAX_REQUEST_ID,
    MAX_TOKEN_LENGTH,
    Codec,
    Connect,
    Ping,
    Pong,
    Position,
    Refresh,
    Subscribe,
    Unsubscribe,
    decode_frame,
    encode,
    parse_command,
    pub_json,
    pub_msgpack,
    request_id_of,
    snapshot_object,
)

BAD_IDS: list[object] = [-1, True, False, 1.0, 1.5, "1", [1], {}, MAX_REQUEST_ID + 1, 2**64]


def packb(obj: Any) -> bytes:
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


def unpackb(data: bytes | str) -> Any:
    assert isinstance(data, bytes)
    return msgpack.unpackb(data, raw=False)


# --- codec negotiation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offered", "expected"),
    [
        ([], (Codec.JSON, None)),
        (["other"], (Codec.JSON, None)),
        (["fanout.json"], (Codec.JSON, "fanout.json")),
        (["fanout.msgpack"], (Codec.MSGPACK, "fanout.msgpack")),
        (["fanout.json", "fanout.msgpack"], (Codec.MSGPACK, "fanout.msgpack")),
    ],
)
def test_codec_for_subprotocols(offered: list[str], expected: tuple[Codec, str | None]) -> None:
    assert Codec.for_subprotocols(offered) == expected


# --- decode_frame --------------------------------------------------------------------------


def test_decode_json_text_frame() -> None:
    assert decode_frame('{"type":"ping","id":1}', Codec.JSON) == {"type": "ping", "id": 1}


def test_decode_json_binary_frame_is_utf8_json() -> None:
    assert decode_frame('{"k":"é"}'.encode(), Codec.JSON) == {"k": "é"}


def test_decode_msgpack_frame() -> None:
    frame = packb({"type": "subscribe", "id": 7, "channel": "quotes.MNQ"})
    assert decode_frame(frame, Codec.MSGPACK) == {
        "type": "subscribe", "id": 7, "channel": "quotes.MNQ",
    }


def assert_bad_frame(frame: str | bytes, codec: Codec, reason: str) -> None:
    with pytest.raises(Disconnect) as info:
        decode_frame(frame, codec)
    assert info.value.code is CloseCode.BAD_REQUEST
    assert info.value.reason == reason


@pytest.mark.parametrize(
    "frame",
    ["", "{", '{"type":}', "{'type':'ping'}", '{"a":1} x', "nul", b"\xff\xfe\xfa", "1" * 5000,
     "NaN", '{"type":"ping","x":Infinity}', '{"type":"ping","x":[-Infinity]}',
     '{"type":"ping","x":"\\ud800"}', '{"type":"ping","\\uDC00":1}',
     '{"type":"ping"}'.encode("utf-16"), b'\xef\xbb\xbf{"type":"ping"}'],
)
def test_malformed_json_closes_with_bad_request(frame: str | bytes) -> None:
    assert_bad_frame(frame, Codec.JSON, "malformed frame")


@pytest.mark.parametrize("frame", ["[]", "1", '"x"', "null", "true", "[{}]"])
def test_json_that_is_not_an_object_closes_with_bad_request(frame: str) -> None:
    assert_bad_frame(frame, Codec.JSON, "frame must be an object")


def test_text_frame_on_msgpack_closes_with_bad_request() -> None:
    assert_bad_frame('{"type":"ping"}', Codec.MSGPACK, "malformed frame")


@pytest.mark.parametrize(
    "frame",
    [
        b"",  # no data
        b"\xc1",  # the one never-used type byte
        b"\x81\xa1a",  # map missing its value
        packb({"a": 1}) + b"\x00",  # extra data
        packb({1: "int key"}),  # strict_map_key
        b"\x91" * 100_000,  # nested too deep
        b"\xdd\xff\xff\xff\xff",  # array claiming 4G elements
    ],
)
def test_binary_garbage_on_msgpack_closes_with_bad_request(frame: bytes) -> None:
    assert_bad_frame(frame, Codec.MSGPACK, "malformed frame")


@pytest.mark.parametrize(
    "value", [[1, 2], 5, None, "x", b"x", msgpack.ExtType(1, b"x")]
)
def test_msgpack_that_is_not_a_map_closes_with_bad_request(value: object) -> None:
    assert_bad_frame(packb(value), Codec.MSGPACK, "frame must be an object")


@pytest.mark.parametrize("frame", ["[" * 65_536, '{"a":' * 13_000])
def test_deeply_nested_json_closes_with_bad_request(frame: str) -> None:
    assert len(frame.encode()) <= 65_536  # fits the edge's default max_message_size
    assert_bad_frame(frame, Codec.JSON, "malformed frame")


@given(st.binary())
@settings(max_examples=300)
def test_decode_frame_bytes_only_ever_raises_disconnect(frame: bytes) -> None:
    for codec in Codec:
        try:
            obj = decode_frame(frame, codec)
        except Disconnect as exc:
            assert exc.code is CloseCode.BAD_REQUEST
        else:
            assert isinstance(obj, dict)


@given(st.text())
@settings(max_examples=300)
def test_decode_frame_text_only_ever_raises_disconnect(frame: str) -> None:
    for codec in Codec:
        try:
            obj = decode_frame(frame, codec)
        except Disconnect as exc:
            assert exc.code is CloseCode.BAD_REQUEST
        else:
            assert codec is Codec.JSON
            assert isinstance(obj, dict)


# --- parse_command: subscribe --------------------------------------------------------------


def test_subscribe_minimal() -> None:
    command = parse_command({"type": "subscribe", "channel": "quotes.MNQ"})
    assert command == Subscribe(None, parse_channel("quotes.MNQ"), None, False)


def test_subscribe_with_everything() -> None:
    command = parse_command({
        "type": "subscribe",
        "id": 12,
        "channel": "account.7.orders",
        "recover": {"offset": 41, "epoch": "a1b2c3"},
        "snapshot": True,
    })
    assert command == Subscribe(
        12, parse_channel("account.7.orders"), Position(41, "a1b2c3"), True
    )


def test_subscribe_ignores_unknown_fields() -> None:
    command = parse_command({"type": "subscribe", "channel": "depth.ES", "extra": [1]})
    assert command == Subscribe(None, parse_channel("depth.ES"), None, False)


@pytest.mark.parametrize(
    ("recover", "expected"),
    [
        (None, None),
        ({"offset": 0, "epoch": "e"}, Position(0, "e")),
        ({"offset": 2**63, "epoch": "x" * 64}, Position(2**63, "x" * 64)),
        ({"offset": 5, "epoch": "e", "extra": 1}, Position(5, "e")),
    ],
)
def test_subscribe_recover_valid(recover: object, expected: Position | None) -> None:
    command = parse_command({"type": "subscribe", "channel": "quotes.ES", "recover": recover})
    assert isinstance(command, Subscribe)
    assert command.recover == expected


@pytest.mark.parametrize(
    ("recover", "message"),
    [
        ([1, "e"], "recover must be an object {offset, epoch}"),
        ("5", "recover must be an object {offset, epoch}"),
        (5, "recover must be an object {offset, epoch}"),
        ({"epoch": "e"}, "recover.offset must be a non-negative integer"),
        ({"offset": -1, "epoch": "e"}, "recover.offset must be a non-negative integer"),
        ({"offset": 1.0, "epoch": "e"}, "recover.offset must be a non-negative integer"),
        ({"offset": "1", "epoch": "e"}, "recover.offset must be a non-negative integer"),
        ({"offset": True, "epoch": "e"}, "recover.offset must be a non-negative integer"),
        ({"offset": False, "epoch": "e"}, "recover.offset must be a non-negative integer"),
        ({"offset": None, "epoch": "e"}, "recover.offset must be a non-negative integer"),
        ({"offset": 1}, "recover.epoch must be a non-empty string"),
        ({"offset": 1, "epoch": ""}, "recover.epoch must be a non-empty string"),
        ({"offset": 1, "epoch": "x" * 65}, "recover.epoch must be a non-empty string"),
        ({"offset": 1, "epoch": 5}, "recover.epoch must be a non-empty string"),
        ({"offset": 1, "epoch": None}, "recover.epoch must be a non-empty string"),
        ({"offset": 1, "epoch": ["e"]}, "recover.epoch must be a non-empty string"),
    ],
)
def test_subscribe_recover_invalid(recover: object, message: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_command({"type": "subscribe", "channel": "quotes.ES", "recover": recover})
    assert info.value.message == message
    assert info.value.code == "bad_request"


@pytest.mark.parametrize("snapshot", [1, 0, "true", "false", [], {}])
def test_subscribe_snapshot_must_be_bool(snapshot: object) -> None:
    with pytest.raises(BadRequest, match="snapshot must be a boolean"):
        parse_command({"type": "subscribe", "channel": "quotes.ES", "snapshot": snapshot})


@pytest.mark.parametrize("snapshot", [True, False])
def test_subscribe_snapshot_bool(snapshot: bool) -> None:
    command = parse_command({"type": "subscribe", "channel": "quotes.ES", "snapshot": snapshot})
    assert isinstance(command, Subscribe)
    assert command.snapshot is snapshot


@pytest.mark.parametrize("kind", ["subscribe", "unsubscribe"])
@pytest.mark.parametrize("channel", [None, "", "quotes", "quotes..X", "nope.X", 5, ["quotes.X"]])
def test_bad_or_missing_channel_is_bad_channel(kind: str, channel: object) -> None:
    obj: dict[str, Any] = {"type": kind, "id": 1}
    if channel is not None:
        obj["channel"] = channel
    with pytest.raises(BadChannel) as info:
        parse_command(obj)
    assert info.value.code == "bad_channel"


# --- parse_command: the other types --------------------------------------------------------


def test_unsubscribe() -> None:
    command = parse_command({"type": "unsubscribe", "id": 3, "channel": "bars.1m.MNQ"})
    assert command == Unsubscribe(3, parse_channel("bars.1m.MNQ"))


def test_ping() -> None:
    assert parse_command({"type": "ping", "id": 9}) == Ping(9)
    assert parse_command({"type": "ping"}) == Ping(None)


def test_pong() -> None:
    assert parse_command({"type": "pong"}) == Pong()
    assert parse_command({"type": "pong", "id": 4}) == Pong()


def test_connect_minimal() -> None:
    assert parse_command({"type": "connect"}) == Connect(None, None, None)


def test_connect_with_everything() -> None:
    command = parse_command({"type": "connect", "id": 1, "token": "tok", "name": "web"})
    assert command == Connect(1, "tok", "web")


def test_connect_token_and_name_at_their_limits() -> None:
    token, name = "t" * MAX_TOKEN_LENGTH, "n" * 64
    command = parse_command({"type": "connect", "token": token, "name": name})
    assert command == Connect(None, token, name)


@pytest.mark.parametrize("token", ["t" * (MAX_TOKEN_LENGTH + 1), 5, True, ["t"], {"t": 1}])
def test_connect_bad_token(token: object) -> None:
    with pytest.raises(BadRequest) as info:
        parse_command({"type": "connect", "token": token})
    assert info.value.message == "token must be a string of at most 8192 characters"


@pytest.mark.parametrize("name", ["n" * 65, 5, False, ["n"]])
def test_connect_bad_name(name: object) -> None:
    with pytest.raises(BadRequest) as info:
        parse_command({"type": "connect", "name": name})
    assert info.value.message == "name must be a string of at most 64 characters"


def test_missing_type_is_bad_request() -> None:
    with pytest.raises(BadRequest) as info:
        parse_command({"id": 1})
    assert info.value.message == "missing type"


@pytest.mark.parametrize("kind", [None, 1, True, 1.5, ["ping"], {"a": "ping"}])
def test_type_not_a_string_is_bad_request(kind: object) -> None:
    with pytest.raises(BadRequest) as info:
        parse_command({"type": kind})
    assert info.value.message == "type must be a string"


@pytest.mark.parametrize("rid", [*BAD_IDS, None, 7])
def test_pong_is_a_pong_whatever_its_id(rid: object) -> None:
    """A pong is never answered (docs/protocol.md), so not with an error for its id."""
    assert parse_command({"type": "pong", "id": rid, "x": [1]}) == Pong()


def test_valid_surrogate_pairs_are_json() -> None:
    obj = decode_frame('{"type":"ping","x":"\\ud83d\\ude00 \\u00e9"}', Codec.JSON)
    assert obj["x"] == "\U0001f600 \u00e9"


@pytest.mark.parametrize("kind", ["", "publish", "Ping", "SUBSCRIBE", "connected"])
def test_unknown_type(kind: str) -> None:
    with pytest.raises(UnknownType) as info:
        parse_command({"type": kind, "id": 1})
    assert info.value.code == "unknown_type"
    assert info.value.message == (
        f"unknown type {kind!r}: expected one of "
        "connect, subscribe, unsubscribe, history, ping, pong, refresh"
    )


def test_unknown_type_name_is_truncated_in_the_message() -> None:
    with pytest.raises(UnknownType) as info:
        parse_command({"type": "x" * 1000})
    assert info.value.message.startswith(f"unknown type {'x' * 32!r}:")


# --- request ids ---------------------------------------------------------------------------


@pytest.mark.parametrize("rid", [0, 1, 12345, MAX_REQUEST_ID])
@pytest.mark.parametrize("kind", ["connect", "ping"])
def test_valid_ids(kind: str, rid: int) -> None:
    command = parse_command({"type": kind, "id": rid})
    assert isinstance(command, Connect | Ping)
    assert command.id == rid




@pytest.mark.parametrize("rid", BAD_IDS)
@pytest.mark.parametrize("kind", ["connect", "subscribe", "unsubscribe", "ping", "nope"])
def test_bad_ids_are_bad_request(kind: str, rid: object) -> None:
    with pytest.raises(BadRequest) as info:
        parse_command({"type": kind, "id": rid, "channel": "quotes.ES"})
    assert info.value.message == "id must be a non-negative integer"


def test_null_id_is_no_id() -> None:
    assert parse_command({"type": "ping", "id": None}) == Ping(None)


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ({"id": 5}, 5),
        ({"id": 0}, 0),
        ({"id": MAX_REQUEST_ID}, MAX_REQUEST_ID),
        ({}, None),
        ({"id": None}, None),
        ({"id": -1}, None),
        ({"id": True}, None),
        ({"id": 2.0}, None),
        ({"id": "5"}, None),
        ({"id": MAX_REQUEST_ID + 1}, None),
    ],
)
def test_request_id_of(obj: dict[str, Any], expected: int | None) -> None:
    assert request_id_of(obj) == expected


# --- parse_command never raises anything but a RequestError ---------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
COMMAND_TYPES = ["connect", "subscribe", "unsubscribe", "ping", "pong"]
channel_like = st.sampled_from(["quotes.MNQ", "bars.1m.ES", "account.1.orders", "quotes..X"])
commands = st.fixed_dictionaries(
    {"type": st.sampled_from(COMMAND_TYPES)},
    optional={
        "id": st.integers() | json_values,
        "channel": channel_like | json_values,
        "recover": st.fixed_dictionaries(
            {}, optional={"offset": st.integers() | json_values, "epoch": st.text() | json_values}
        )
        | json_values,
        "snapshot": st.booleans() | json_values,
        "token": st.text() | json_values,
        "name": st.text() | json_values,
    },
)


def _check_parse(obj: dict[str, Any]) -> None:
    try:
        command = parse_command(obj)
    except RequestError:
        return
    expected_class = {
        "connect": Connect, "subscribe": Subscribe, "unsubscribe": Unsubscribe,
        "ping": Ping, "pong": Pong,
    }[obj["type"]]
    assert type(command) is expected_class


@given(st.dictionaries(st.text(max_size=10), json_values, max_size=6))
@settings(max_examples=300)
def test_parse_command_arbitrary_dicts_only_raise_request_errors(obj: dict[str, Any]) -> None:
    _check_parse(obj)


@given(commands)
@settings(max_examples=500)
def test_parse_command_known_types_only_raise_request_errors(obj: dict[str, Any]) -> None:
    _check_parse(obj)


# --- server -> client builders -------------------------------------------------------------


def test_connected() -> None:
    assert protocol.connected(1, "c-1", 25.0, 10.0) == {
        "type": "connected",
        "id": 1,
        "client": "c-1",
        "version": 1,
        "ping_interval": 25.0,
        "pong_timeout": 10.0,
    }


def test_subscribed_without_snapshot_has_no_snapshot_field() -> None:
    assert protocol.subscribed(2, "quotes.ES", "ep", 17, True, None) == {
        "type": "subscribed",
        "id": 2,
        "channel": "quotes.ES",
        "epoch": "ep",
        "offset": 17,
        "recovered": True,
        "delivery": "all",
    }


def test_subscribed_with_snapshot() -> None:
    reply = protocol.subscribed(None, "depth.ES", "ep", 0, False, {"": {"bid": 1}}, "conflate")
    assert reply == {
        "type": "subscribed",
        "id": None,
        "channel": "depth.ES",
        "epoch": "ep",
        "offset": 0,
        "recovered": False,
        "delivery": "conflate",
        "snapshot": {"": {"bid": 1}},
    }


def test_subscribed_with_empty_snapshot_keeps_it() -> None:
    reply = protocol.subscribed(None, "depth.ES", "ep", 0, False, {})
    assert reply["snapshot"] == {}


def test_unsubscribed() -> None:
    assert protocol.unsubscribed(5, "quotes.ES") == {
        "type": "unsubscribed", "id": 5, "channel": "quotes.ES",
    }


def test_error() -> None:
    assert protocol.error(3, BadChannel("bad symbol")) == {
        "type": "error", "id": 3, "code": "bad_channel", "message": "bad symbol",
    }
    assert protocol.error(None, NotSubscribed("no")) == {
        "type": "error", "id": None, "code": "not_subscribed", "message": "no",
    }


def test_resync() -> None:
    assert protocol.resync("quotes.ES", "e2", 4, {"": {"p": 1}}) == {
        "type": "resync",
        "channel": "quotes.ES",
        "epoch": "e2",
        "offset": 4,
        "snapshot": {"": {"p": 1}},
    }


def test_pong_and_ping() -> None:
    assert protocol.pong(8) == {"type": "pong", "id": 8}
    assert protocol.pong(None) == {"type": "pong", "id": None}
    assert protocol.ping() == {"type": "ping"}


# --- encode ----------------------------------------------------------------------------------


def test_encode_json_is_compact_and_keeps_unicode() -> None:
    message = {"type": "error", "id": 1, "message": "prix: 5€ \"q\""}
    assert encode(message, Codec.JSON) == '{"type":"error","id":1,"message":"prix: 5€ \\"q\\""}'


def test_encode_json_builder_output() -> None:
    assert encode(protocol.pong(None), Codec.JSON) == '{"type":"pong","id":null}'


def test_encode_msgpack_round_trips() -> None:
    message = protocol.subscribed(2, "quotes.ES", "ep", 17, True, {"": {"p": 1.5, "s": "é"}})
    frame = encode(message, Codec.MSGPACK)
    assert isinstance(frame, bytes)
    assert unpackb(frame) == message


def test_encode_msgpack_is_decodable_by_decode_frame() -> None:
    message = {"type": "ping", "id": 4}
    assert decode_frame(encode(message, Codec.MSGPACK), Codec.MSGPACK) == message


# --- publications ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "data", "expected"),
    [
        ("", '{"bid":1.25,"ask":1.5}',
         {"type": "pub", "channel": "quotes.MNQ", "offset": 42, "data": {"bid": 1.25, "ask": 1.5}}),
        ("lvl:1", "[1,2]",
         {"type": "pub", "channel": "quotes.MNQ", "offset": 42, "key": "lvl:1", "data": [1, 2]}),
        ('k"\\é😀', '{"s":"a \\"quoted\\" \\\\ é 😀 \\u2028"}',
         {"type": "pub", "channel": "quotes.MNQ", "offset": 42, "key": 'k"\\é😀',
          "data": {"s": 'a "quoted" \\ é 😀 \u2028'}}),
        ("", "null", {"type": "pub", "channel": "quotes.MNQ", "offset": 42, "data": None}),
        ("", '"text"', {"type": "pub", "channel": "quotes.MNQ", "offset": 42, "data": "text"}),
    ],
)
def test_pub_json_and_pub_msgpack_agree(key: str, data: str, expected: dict[str, Any]) -> None:
    text = pub_json("quotes.MNQ", 42, key, data)
    assert json.loads(text) == expected
    assert unpackb(pub_msgpack("quotes.MNQ", 42, key, data)) == expected


def test_pub_json_exact_text() -> None:
    assert pub_json("trades.ES", 7, "", '{"p":1}') == (
        '{"type":"pub","channel":"trades.ES","offset":7,"data":{"p":1}}'
    )
    assert pub_json("depth.ES", 8, "b:1", '{"p":1}') == (
        '{"type":"pub","channel":"depth.ES","offset":8,"key":"b:1","data":{"p":1}}'
    )


def test_pub_json_key_field_order_matches_msgpack() -> None:
    unpacked = unpackb(pub_msgpack("depth.ES", 8, "b:1", "1"))
    assert list(unpacked) == ["type", "channel", "offset", "key", "data"]
    assert list(json.loads(pub_json("depth.ES", 8, "b:1", "1"))) == list(unpacked)


# Data as the publisher produces it: json.dumps(allow_nan=False) of JSON-able values.
# msgpack ints are 64-bit; bigger ints are the subject of a separate test.
pub_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=16,
)
snapshot_keys = st.text(
    st.characters(min_codepoint=0x20, exclude_categories=["Cs"]), max_size=20
)
channel_names = st.from_regex(r"(quotes|trades|depth)\.[A-Za-z0-9_:\-]{1,12}", fullmatch=True)


def publisher_json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


@given(channel_names, st.integers(min_value=0, max_value=2**63), snapshot_keys, pub_values)
@settings(max_examples=300)
def test_pub_json_parses_to_the_expected_object(
    channel: str, offset: int, key: str, value: object
) -> None:
    expected: dict[str, Any] = {"type": "pub", "channel": channel, "offset": offset}
    if key:
        expected["key"] = key
    expected["data"] = value
    data = publisher_json(value)
    assert json.loads(pub_json(channel, offset, key, data)) == expected
    assert unpackb(pub_msgpack(channel, offset, key, data)) == expected


def test_pub_msgpack_with_an_int_beyond_64_bits() -> None:
    """msgpack has no integer beyond 64 bits: such values travel as decimal strings."""
    data = publisher_json({"qty": 2**64, "neg": -(2**63) - 1, "ok": 2**64 - 1})
    expected = {"type": "pub", "channel": "trades.ES", "offset": 1,
                "data": {"qty": 2**64, "neg": -(2**63) - 1, "ok": 2**64 - 1}}
    assert json.loads(pub_json("trades.ES", 1, "", data)) == expected
    as_msgpack = {**expected, "data": {"qty": str(2**64), "neg": str(-(2**63) - 1),
                                       "ok": 2**64 - 1}}
    assert unpackb(pub_msgpack("trades.ES", 1, "", data)) == as_msgpack


def test_snapshot_object() -> None:
    flat = {"": '{"bid":1}', "b:1": "[1,2]", "x": '"s"', "n": "null"}
    assert snapshot_object(flat) == {"": {"bid": 1}, "b:1": [1, 2], "x": "s", "n": None}
    assert snapshot_object({}) == {}


# --- errors: close codes and disconnects -----------------------------------------------------


@pytest.mark.parametrize(
    ("code", "reconnect"),
    [
        (CloseCode.NORMAL, True),
        (CloseCode.GOING_AWAY, True),
        (CloseCode.MESSAGE_TOO_BIG, True),
        (CloseCode.SHUTDOWN, True),
        (CloseCode.SLOW_CONSUMER, True),
        (CloseCode.INSUFFICIENT_STATE, True),
        (CloseCode.NO_PONG, True),
        (CloseCode.SERVER_ERROR, True),
        (CloseCode.CONNECT_TIMEOUT, True),
        (CloseCode.BAD_REQUEST, False),
        (CloseCode.UNAUTHORIZED, False),
        (CloseCode.FORBIDDEN, False),
        (CloseCode.CONNECTION_LIMIT, False),
    ],
)
def test_close_code_reconnect(code: CloseCode, reconnect: bool) -> None:
    assert code.reconnect is reconnect


def test_every_close_code_is_classified_by_range() -> None:
    for code in CloseCode:
        assert code.reconnect is (code.value < 3500), code


def test_disconnect_keeps_a_short_reason() -> None:
    exc = Disconnect(CloseCode.SLOW_CONSUMER, "slow consumer")
    assert exc.code is CloseCode.SLOW_CONSUMER
    assert exc.reason == "slow consumer"
    assert str(exc) == "3001 slow consumer"


def test_disconnect_truncates_a_long_ascii_reason_within_123_bytes() -> None:
    exc = Disconnect(CloseCode.BAD_REQUEST, "x" * 500)
    assert len(exc.reason.encode("utf-8")) <= 123
    assert exc.reason == "x" * len(exc.reason)
    assert len(exc.reason) >= 100


@pytest.mark.parametrize("char", ["é", "€", "😀"])
def test_disconnect_truncates_a_multibyte_reason_within_123_bytes(char: str) -> None:
    exc = Disconnect(CloseCode.BAD_REQUEST, char * 200)
    encoded = exc.reason.encode("utf-8")
    assert len(encoded) <= 123
    assert exc.reason == char * len(exc.reason)  # cut at a character boundary


def test_disconnect_advises_a_reconnect_delay_in_the_reason() -> None:
    from fanout_client import advised_delay

    exc = Disconnect(CloseCode.SLOW_CONSUMER, "slow consumer", retry_after=1.5)
    assert exc.reason == "slow consumer retry_after_ms=1500"
    assert advised_delay(exc.reason) == 1.5
    long = Disconnect(CloseCode.SLOW_CONSUMER, "x" * 200, retry_after=2)
    assert len(long.reason.encode()) <= 123 and advised_delay(long.reason) == 2.0
    assert advised_delay("slow consumer") == 0.0
    assert advised_delay("retry_after_ms=12x") == 0.0


def test_refresh_carries_a_token() -> None:
    assert parse_command({"type": "refresh", "id": 3, "token": "a.b.c"}) == Refresh(3, "a.b.c")


@pytest.mark.parametrize("token", [None, "", 1, ["a"], "x" * (MAX_TOKEN_LENGTH + 1)])
def test_refresh_without_a_usable_token_is_bad_request(token: object) -> None:
    with pytest.raises(BadRequest, match="token must be a string"):
        parse_command({"type": "refresh", "id": 3, "token": token})


@settings(max_examples=300, deadline=None)
@given(
    rid=st.one_of(st.none(), st.integers(0, protocol.MAX_REQUEST_ID)),
    channel=st.sampled_from(["quotes.AAPL", "account.c1x0.orders", "bars.BTC-USD.1m"]),
    epoch=st.text(),
    offset=st.integers(0, 2**63),
    recovered=st.booleans(),
    delivery=st.sampled_from(["all", "conflate", "drop"]),
    snapshot=st.one_of(st.none(), st.dictionaries(st.text(), st.integers(), max_size=3)),
    codec=st.sampled_from(list(protocol.Codec)),
)
def test_subscribed_frame_is_the_encoded_reply_byte_for_byte(
    rid: int | None, channel: str, epoch: str, offset: int, recovered: bool, delivery: str,
    snapshot: dict[str, Any] | None, codec: protocol.Codec,
) -> None:
    """The template (JSON, no snapshot) and the general path give what encoding the
    `subscribed` dict gives, whatever the epoch holds (quotes, escapes, non-ASCII)."""
    reply = protocol.subscribed(rid, channel, epoch, offset, recovered, snapshot, delivery)
    frame = protocol.subscribed_frame(rid, channel, epoch, offset, recovered, snapshot,
                                      delivery, codec)
    assert frame == protocol.encode(reply, codec)
    if codec is protocol.Codec.JSON:
        assert json.loads(frame) == reply
