"""The SignalR JSON hub protocol, pure: handshake records, framing, encoding, parsing, URLs
and negotiate responses."""

from __future__ import annotations

from typing import Any

import pytest

from ingest.feeds.signalr import (
    RECORD_SEPARATOR,
    Close,
    Completion,
    HandshakeError,
    Invocation,
    Negotiated,
    NegotiateError,
    Other,
    Ping,
    ProtocolError,
    encode_message,
    handshake_request,
    negotiate_url,
    parse_handshake_response,
    parse_message,
    parse_negotiate_response,
    redact,
    split_records,
    websocket_url,
)

RS = RECORD_SEPARATOR

# --- framing and messages (pure) -----------------------------------------------------------


def test_handshake_request_is_the_exact_record() -> None:
    assert handshake_request() == '{"protocol":"json","version":1}\x1e'


def test_handshake_response() -> None:
    parse_handshake_response("{}")
    with pytest.raises(HandshakeError, match="Requested protocol 'x' is not available"):
        parse_handshake_response('{"error":"Requested protocol \'x\' is not available."}')
    with pytest.raises(HandshakeError):
        parse_handshake_response("not json")
    with pytest.raises(HandshakeError):
        parse_handshake_response("[]")


@pytest.mark.parametrize(
    ("data", "records", "rest"),
    [
        ("", [], ""),
        ('{"type":6}\x1e', ['{"type":6}'], ""),
        ('{"type":6}\x1e{"type":6}\x1e', ['{"type":6}', '{"type":6}'], ""),
        ('{"type":6}\x1e{"type":1,"tar', ['{"type":6}'], '{"type":1,"tar'),
        ('{"type":1,"tar', [], '{"type":1,"tar'),
        ("\x1e\x1e", [], ""),
    ],
)
def test_split_records(data: str, records: list[str], rest: str) -> None:
    assert split_records(data) == (records, rest)


def test_encoding_is_exact() -> None:
    assert encode_message(Invocation("SubscribeOrders", [123], "0")) == (
        '{"type":1,"invocationId":"0","target":"SubscribeOrders","arguments":[123]}' + RS
    )
    assert encode_message(Invocation("Fire", ["a"])) == (
        '{"type":1,"target":"Fire","arguments":["a"]}' + RS
    )
    assert encode_message(Completion("4", result={"x": 1})) == (
        '{"type":3,"invocationId":"4","result":{"x":1}}' + RS
    )
    assert encode_message(Completion("4", error="boom")) == (
        '{"type":3,"invocationId":"4","error":"boom"}' + RS
    )
    assert encode_message(Completion("4")) == '{"type":3,"invocationId":"4"}' + RS
    assert encode_message(Ping()) == '{"type":6}' + RS
    assert encode_message(Close()) == '{"type":7}' + RS
    assert encode_message(Close("bye", True)) == (
        '{"type":7,"error":"bye","allowReconnect":true}' + RS
    )


@pytest.mark.parametrize(
    "message",
    [
        Invocation("GatewayQuote", ["CON.F.US.MNQ.Z25", {"bestBid": 1.5}]),
        Invocation("Method", [], "17"),
        Completion("1", result=[1, 2]),
        Completion("2", error="Unauthorized"),
        Completion("3"),
        Ping(),
        Close(),
        Close("Server is shutting down", allow_reconnect=True),
        Other(8, {"type": 8, "sequenceId": 3}),
    ],
)
def test_messages_round_trip(message: Any) -> None:
    records, rest = split_records(encode_message(message))
    assert rest == "" and len(records) == 1
    assert parse_message(records[0]) == message


def test_parse_message_details() -> None:
    assert parse_message('{"type":1,"target":"T"}') == Invocation("T", [])
    assert parse_message('{"type":3,"invocationId":"9","result":null}') == Completion("9")
    assert parse_message('{"type":7,"allowReconnect":"yes"}') == Close(None, False)
    assert parse_message('{"type":2,"invocationId":"1","item":5}') == Other(
        2, {"type": 2, "invocationId": "1", "item": 5}
    )


@pytest.mark.parametrize(
    "record",
    [
        "nope",
        "[1]",
        '{"target":"T"}',
        '{"type":"1"}',
        '{"type":true}',
        '{"type":1,"arguments":[]}',
        '{"type":1,"target":"T","arguments":{}}',
        '{"type":1,"target":"T","arguments":[],"invocationId":5}',
        '{"type":3,"result":1}',
    ],
)
def test_parse_message_rejects(record: str) -> None:
    with pytest.raises(ProtocolError):
        parse_message(record)


def test_urls() -> None:
    assert websocket_url("https://rtc.example.com/hubs/market", access_token="a b+c") == (
        "wss://rtc.example.com/hubs/market?access_token=a+b%2Bc"
    )
    assert websocket_url("http://h:5000/hubs/user?x=1", connection_token="tok") == (
        "ws://h:5000/hubs/user?x=1&id=tok"
    )
    # A token already in the URL (as in ProjectX's samples) is replaced, not duplicated.
    assert websocket_url("wss://h/hubs/user?access_token=old", access_token="new") == (
        "wss://h/hubs/user?access_token=new"
    )
    assert negotiate_url("wss://h/hubs/user/?access_token=t") == (
        "https://h/hubs/user/negotiate?access_token=t&negotiateVersion=1"
    )
    assert redact("wss://h/hubs/user?id=abc&access_token=secret") == (
        "wss://h/hubs/user?id=***&access_token=***"
    )
    with pytest.raises(ValueError):
        websocket_url("ftp://h/hubs/user")


def test_negotiate_responses() -> None:
    websockets = [{"transport": "WebSockets", "transferFormats": ["Text", "Binary"]}]
    assert parse_negotiate_response(
        {"connectionId": "i", "connectionToken": "t", "negotiateVersion": 1,
         "availableTransports": websockets}
    ) == Negotiated(connection_token="t")
    assert parse_negotiate_response(
        {"connectionId": "i", "availableTransports": websockets}
    ) == Negotiated(connection_token="i")
    assert parse_negotiate_response(
        {"url": "https://other/hub", "accessToken": "az"}
    ) == Negotiated(redirect_url="https://other/hub", access_token="az")
    with pytest.raises(NegotiateError, match="refused: nope"):
        parse_negotiate_response({"error": "nope"})
    with pytest.raises(NegotiateError, match="no WebSockets"):
        parse_negotiate_response(
            {"connectionToken": "t", "negotiateVersion": 1,
             "availableTransports": [{"transport": "LongPolling", "transferFormats": ["Text"]}]}
        )
    with pytest.raises(NegotiateError, match="without a connection token"):
        parse_negotiate_response({"negotiateVersion": 1})
