"""Fuzzing, in the normal suite: hypothesis drives the protocol decoder and a session's
request handling (a real `Session` over a scripted WebSocket and a scripted hub); the short
live run against a real edge process is tests/integration/test_fuzz.py.

Whatever a client sends, it gets only documented answers: an object (or an array of them)
of a server message type, error codes from the table, close codes from the table, and never
exception text; the edge logs no error or traceback and keeps serving everyone else."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from common import protocol
from common.auth import sign_token
from common.config import EdgeConfig
from common.errors import Disconnect, RequestError
from common.protocol import Codec, Frame
from edge.session import Session
from edge.stats import EdgeStats
from tests.support import fuzzing
from tests.support.fuzzing import CLOSE_CODES, ERROR_CODES, SERVER_TYPES, exception_text
from tests.support.scripted import Records, ScriptedHub, ScriptedWebSocket

EXAMPLES = int(os.environ.get("FANOUT_FUZZ_EXAMPLES", "300"))
SECRET = "s" * 40
CODECS = [Codec.JSON, Codec.MSGPACK]


# --- the decoder (pure) -----------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "Traceback (most recent call last):", 'File "/x/edge/session.py", line 5, in run',
    "KeyError('type')", "ValueError: bad", "UnicodeEncodeError", "redis.exceptions.RedisError",
    "ConnectionError", "internal Exception",
])
def test_exception_text_is_recognised(text: str) -> None:
    assert exception_text(text) is not None


@pytest.mark.parametrize("text", [
    "unknown type 'x': expected one of connect, subscribe", "malformed frame",
    "channel 'nope' has no namespace: expected e.g. quotes.MNQ", "type must be a string",
    "id must be a non-negative integer", "quotes.ES 1..5 is not retained",
])
def test_documented_messages_are_not_exception_text(text: str) -> None:
    assert exception_text(text) is None


@settings(max_examples=EXAMPLES, deadline=None)
@given(data=st.data(), codec=st.sampled_from(CODECS))
def test_decoder_gives_an_object_or_closes_with_3500(data: st.DataObject, codec: Codec) -> None:
    frame = data.draw(fuzzing.frames(codec) | st.binary() | st.text())
    try:
        obj = protocol.decode_frame(frame, codec)
    except Disconnect as exc:
        assert exc.code == 3500 and exc.reason in (
            "malformed frame", "frame must be an object"), exc
        return
    assert isinstance(obj, dict)


@settings(max_examples=EXAMPLES, deadline=None)
@given(obj=fuzzing.objects)
def test_parser_gives_a_command_or_a_documented_error(obj: dict[str, Any]) -> None:
    try:
        command = protocol.parse_command(obj)
    except RequestError as exc:
        assert exc.code in ERROR_CODES
        assert exception_text(exc.message) is None, exc.message
        reply = protocol.error(protocol.request_id_of(obj), exc)
        for codec in CODECS:
            encoded = protocol.encode(reply, codec)
            if isinstance(encoded, str):
                encoded.encode()  # valid UTF-8: it can go in a text frame
        return
    assert isinstance(command, protocol.Connect | protocol.Subscribe | protocol.Unsubscribe
                      | protocol.History | protocol.Ping | protocol.Pong | protocol.Refresh)
    if obj.get("type") == "pong":
        assert command == protocol.Pong()


@settings(max_examples=EXAMPLES, deadline=None)
@given(obj=fuzzing.objects, codec=st.sampled_from(CODECS))
def test_what_decodes_parses_the_same_from_either_codec(
    obj: dict[str, Any], codec: Codec
) -> None:
    try:
        frame: Frame = (json.dumps(obj) if codec is Codec.JSON
                        else msgpack.packb(obj, use_bin_type=True))
    except OverflowError:  # an integer msgpack cannot hold: no such frame can be sent
        return
    decoded = protocol.decode_frame(frame, codec)
    assert decoded == obj


# --- a session, in process ------------------------------------------------------------------


def server_messages(frames: list[Frame], codec: Codec) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for frame in frames:
        value = msgpack.unpackb(frame, raw=False) if codec is Codec.MSGPACK else \
            json.loads(frame)
        items = value if isinstance(value, list) else [value]
        assert items and all(isinstance(m, dict) for m in items), value
        out.extend(items)
    return out


@settings(max_examples=max(EXAMPLES // 3, 20), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data(), codec=st.sampled_from(CODECS), auth=st.booleans(),
       valid_connect=st.booleans())
def test_a_session_answers_any_frames_only_as_documented(
    data: st.DataObject, codec: Codec, auth: bool, valid_connect: bool
) -> None:
    token = sign_token({"sub": "fuzz", "exp": 2**40, "channels": ["quotes.*", "trades.*"]},
                       SECRET.encode()) if auth else None
    first: Frame
    if valid_connect:
        connect = {"type": "connect", "id": 1, "token": token}
        first = json.dumps(connect) if codec is Codec.JSON else msgpack.packb(connect)
    else:
        first = data.draw(fuzzing.frames(codec))
    # Requests (valid, mutated, anything that decodes to an object), then perhaps a frame
    # that closes the connection: a session must get through the requests first.
    inbox = [first, *data.draw(st.lists(fuzzing.frames(codec, objects_only=True), max_size=25))]
    last = data.draw(st.none() | fuzzing.frames(codec))
    if last is not None:
        inbox.append(last)
    config = EdgeConfig(auth_secret=SECRET if auth else "", direct_write=False,
                        request_burst=20, max_subscriptions=5)
    ws = ScriptedWebSocket(inbox)
    handler = Records()
    log = logging.getLogger(f"fuzz.session.{os.urandom(3).hex()}")
    log.addHandler(handler)
    log.propagate = False

    async def run() -> Session:
        session = Session(ws, ScriptedHub(), config, EdgeStats(), log, codec,  # type: ignore[arg-type]
                          "n-1")
        ws.session = session
        await asyncio.wait_for(session.run(), 10)
        return session

    asyncio.run(run())
    bad = [r for r in handler.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [r.getMessage() for r in bad]
    if ws.closed is not None:
        code, reason = ws.closed
        event(f"closed {code}")
        assert code in CLOSE_CODES, ws.closed
        assert exception_text(reason) is None, reason
    for msg in server_messages(ws.sent, codec):
        assert msg.get("type") in SERVER_TYPES, msg
        event(f"got {msg['type']}")
        if msg["type"] == "error":
            event(f"error {msg['code']}")
            assert msg["code"] in ERROR_CODES, msg
        text = json.dumps(msg, default=repr)
        assert exception_text(text) is None, msg
