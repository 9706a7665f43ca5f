"""The client wire protocol: parsing, validation and building of frames. Pure: no I/O.

Every frame is one message, an object with a ``type``. JSON text frames by default;
msgpack binary frames when the client asks for the ``fanout.msgpack`` subprotocol.
docs/protocol.md is the reference; this module is its implementation, and the edge's
session only moves bytes between it and the socket.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, cast

import msgpack

from common import strictjson
from common.channels import Channel, parse_channel
from common.errors import BadRequest, CloseCode, Disconnect, RequestError, UnknownType
from common.strictjson import compact_encoder

PROTOCOL_VERSION = 1

SUBPROTOCOL_JSON = "fanout.json"
SUBPROTOCOL_MSGPACK = "fanout.msgpack"
SUBPROTOCOLS = (SUBPROTOCOL_JSON, SUBPROTOCOL_MSGPACK)

MAX_TOKEN_LENGTH = 8192
MAX_REQUEST_ID = 2**53 - 1  # what a JavaScript number holds exactly


class Codec(StrEnum):
    JSON = "json"
    MSGPACK = "msgpack"

    @classmethod
    def for_subprotocols(cls, offered: list[str]) -> tuple[Codec, str | None]:
        """The codec, and the subprotocol to accept, for what a client offered."""
        if SUBPROTOCOL_MSGPACK in offered:
            return cls.MSGPACK, SUBPROTOCOL_MSGPACK
        if SUBPROTOCOL_JSON in offered:
            return cls.JSON, SUBPROTOCOL_JSON
        return cls.JSON, None


Frame = str | bytes


# --- client -> server ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Position:
    """Where a client is in a channel: the last offset it saw, in which epoch."""

    offset: int
    epoch: str


@dataclass(frozen=True, slots=True)
class Connect:
    id: int | None
    token: str | None
    name: str | None


@dataclass(frozen=True, slots=True)
class Subscribe:
    id: int | None
    channel: Channel
    recover: Position | None
    snapshot: bool
    max_rate: float | None = None  # most frames per second for this channel; None = all


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    id: int | None
    channel: Channel


@dataclass(frozen=True, slots=True)
class Ping:
    """A client's own ping; answered with a pong reply."""

    id: int | None


@dataclass(frozen=True, slots=True)
class Pong:
    """The answer to a server ping."""


@dataclass(frozen=True, slots=True)
class History:
    """Backfill: the publications `first`..`last` of a channel (after a gap notice)."""

    id: int | None
    channel: Channel
    epoch: str
    first: int
    last: int


@dataclass(frozen=True, slots=True)
class Refresh:
    """A fresh token for this connection, before the current one expires."""

    id: int | None
    token: str


Command = Connect | Subscribe | Unsubscribe | History | Ping | Pong | Refresh

_COMMAND_TYPES = ("connect", "subscribe", "unsubscribe", "history", "ping", "pong", "refresh")
MAX_RATE = 1000.0


def decode_frame(frame: Frame, codec: Codec) -> dict[str, Any]:
    """Decode one client frame into an object; a frame that is not one closes the connection.

    A frame we cannot even read gives us no request id to answer, so it is a protocol
    violation (close 3500), not a request error. JSON is read strictly (common/strictjson.py:
    no NaN or Infinity, UTF-8 only, no unpaired surrogates), as the HTTP API reads it.
    """
    try:
        if codec is Codec.MSGPACK:
            if isinstance(frame, str):
                raise ValueError("text frame on the msgpack subprotocol")
            obj = msgpack.unpackb(frame, raw=False, strict_map_key=True)
        else:
            obj = strictjson.loads(frame)
    except (
        ValueError, TypeError, RecursionError,
        msgpack.ExtraData, msgpack.FormatError, msgpack.StackError,
    ):
        raise Disconnect(CloseCode.BAD_REQUEST, "malformed frame") from None
    if not isinstance(obj, dict):
        raise Disconnect(CloseCode.BAD_REQUEST, "frame must be an object")
    return obj


def _request_id(obj: dict[str, Any]) -> int | None:
    rid = obj.get("id")
    if rid is None:
        return None
    if isinstance(rid, bool) or not isinstance(rid, int) or not 0 <= rid <= MAX_REQUEST_ID:
        raise BadRequest("id must be a non-negative integer")
    return rid


def request_id_of(obj: dict[str, Any]) -> int | None:
    """The request id to put in an error reply, when the request has a usable one."""
    try:
        return _request_id(obj)
    except RequestError:
        return None


def parse_command(obj: dict[str, Any]) -> Command:
    """Validate a decoded frame into a command; raise a RequestError naming the problem."""
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise BadRequest("type must be a string" if "type" in obj else "missing type")
    if kind == "pong":
        return Pong()  # never answered, whatever else it holds (an id included)
    rid = _request_id(obj)
    if kind == "subscribe":
        channel = parse_channel(obj.get("channel"))
        snapshot = obj.get("snapshot")
        if snapshot is None:
            snapshot = False
        if not isinstance(snapshot, bool):
            raise BadRequest("snapshot must be a boolean")
        max_rate = obj.get("max_rate")
        if max_rate is not None and (
            isinstance(max_rate, bool) or not isinstance(max_rate, int | float)
            or not 0 < max_rate <= MAX_RATE
        ):
            raise BadRequest(f"max_rate must be a number above 0 and at most {MAX_RATE:g}")
        return Subscribe(
            rid, channel, _position(obj.get("recover")), snapshot,
            None if max_rate is None else float(max_rate),
        )
    if kind == "history":
        channel = parse_channel(obj.get("channel"))
        first, last, epoch = obj.get("from"), obj.get("to"), obj.get("epoch")
        for label, value in (("from", first), ("to", last)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BadRequest(f"{label} must be a positive integer")
        assert isinstance(first, int) and isinstance(last, int)
        if last < first:
            raise BadRequest("to must not be below from")
        if not isinstance(epoch, str) or not 0 < len(epoch) <= 64:
            raise BadRequest("epoch must be a non-empty string")
        return History(rid, channel, epoch, first, last)
    if kind == "unsubscribe":
        return Unsubscribe(rid, parse_channel(obj.get("channel")))
    if kind == "ping":
        return Ping(rid)
    if kind == "connect":
        token = obj.get("token")
        if token is not None and (not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH):
            raise BadRequest(f"token must be a string of at most {MAX_TOKEN_LENGTH} characters")
        name = obj.get("name")
        if name is not None and (not isinstance(name, str) or len(name) > 64):
            raise BadRequest("name must be a string of at most 64 characters")
        return Connect(rid, token, name)
    if kind == "refresh":
        token = obj.get("token")
        if not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN_LENGTH:
            raise BadRequest(f"token must be a string of 1 to {MAX_TOKEN_LENGTH} characters")
        return Refresh(rid, token)
    raise UnknownType(f"unknown type {kind[:32]!r}: expected one of {', '.join(_COMMAND_TYPES)}")


def _position(raw: object) -> Position | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise BadRequest("recover must be an object {offset, epoch}")
    offset, epoch = raw.get("offset"), raw.get("epoch")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise BadRequest("recover.offset must be a non-negative integer")
    if not isinstance(epoch, str) or not 0 < len(epoch) <= 64:
        raise BadRequest("recover.epoch must be a non-empty string")
    return Position(offset, epoch)


# --- server -> client ----------------------------------------------------------------------


def connected(
    rid: int | None, client_id: str, ping_interval: float, pong_timeout: float,
    expires_in: float | None = None,
) -> dict[str, Any]:
    """`expires_in`: seconds until the connection's token expires (authentication on)."""
    reply: dict[str, Any] = {
        "type": "connected",
        "id": rid,
        "client": client_id,
        "version": PROTOCOL_VERSION,
        "ping_interval": ping_interval,
        "pong_timeout": pong_timeout,
    }
    if expires_in is not None:
        reply["expires_in"] = round(expires_in, 3)
    return reply


def refreshed(rid: int | None, expires_in: float) -> dict[str, Any]:
    return {"type": "refreshed", "id": rid, "expires_in": round(expires_in, 3)}


def subscribed(
    rid: int | None,
    channel: str,
    epoch: str,
    offset: int,
    recovered: bool,
    snapshot: dict[str, Any] | None,
    delivery: str = "all",
) -> dict[str, Any]:
    """The subscribe reply. After it, the client receives every publication whose offset
    is above its position: the offset it asked to recover from when `recovered`, else
    `offset` (the channel's position, which `snapshot` reflects)."""
    reply: dict[str, Any] = {
        "type": "subscribed",
        "id": rid,
        "channel": channel,
        "epoch": epoch,
        "offset": offset,
        "recovered": recovered,
        "delivery": delivery,
    }
    if snapshot is not None:
        reply["snapshot"] = snapshot
    return reply


_quote = json.encoder.encode_basestring  # a JSON string literal, non-ASCII kept (C)


def subscribed_frame(
    rid: int | None,
    channel: str,
    epoch: str,
    offset: int,
    recovered: bool,
    snapshot: dict[str, Any] | None,
    delivery: str,
    codec: Codec,
) -> Frame:
    """`encode(subscribed(...), codec)`, byte for byte; a JSON reply without a snapshot
    from a template (an edge sends one per subscribe: 100,000 in a reconnect storm), as
    `pub_json` builds a publication. Channel names and deliveries are grammar-checked
    words (no escaping); a request id is a non-negative integer or None."""
    if snapshot is not None or codec is not Codec.JSON:
        return encode(subscribed(rid, channel, epoch, offset, recovered, snapshot, delivery),
                      codec)
    return (f'{{"type":"subscribed","id":{"null" if rid is None else rid},'
            f'"channel":"{channel}","epoch":{_quote(epoch)},"offset":{offset},'
            f'"recovered":{"true" if recovered else "false"},"delivery":"{delivery}"}}')


def unsubscribed(rid: int | None, channel: str) -> dict[str, Any]:
    return {"type": "unsubscribed", "id": rid, "channel": channel}


def pong(rid: int | None) -> dict[str, Any]:
    return {"type": "pong", "id": rid}


def ping() -> dict[str, Any]:
    return {"type": "ping"}


def error(rid: int | None, exc: RequestError) -> dict[str, Any]:
    reply: dict[str, Any] = {"type": "error", "id": rid, "code": exc.code,
                             "message": exc.message}
    if exc.retry_after is not None:
        reply["retry_after_ms"] = round(exc.retry_after * 1000)
    return reply


def gap(channel: str, first: int, last: int) -> dict[str, Any]:
    """The offsets `first`..`last` of `channel` were dropped for this slow client (drop
    policy); it may fetch them with a `history` request."""
    return {"type": "gap", "channel": channel, "from": first, "to": last}


def history_reply(
    rid: int | None, channel: str, epoch: str, pubs: list[Frame], codec: Codec
) -> Frame:
    """The reply to `history`: the publications as they were pushed (already encoded, not
    encoded again), in an array."""
    head = encode(
        {"type": "history", "id": rid, "channel": channel, "epoch": epoch, "publications": 0},
        codec,
    )
    # The placeholder 0 is the last thing encoded (`0}` in JSON, one byte in msgpack).
    if isinstance(head, str):
        return head[:-2] + json_array(cast(Sequence[str], pubs)) + "}"
    return head[:-1] + msgpack_array(cast(Sequence[bytes], pubs))


def array(parts: Sequence[Frame], codec: Codec, n: int | None = None) -> Frame:
    """An array of already encoded messages, built by joining them (no re-encoding): a JSON
    array, or a msgpack array. `n` counts the messages when some of `parts` are chunks of
    several (JSON texts joined by commas, msgpack objects concatenated)."""
    if codec is Codec.JSON:
        return json_array(cast(Sequence[str], parts))
    return msgpack_array(cast(Sequence[bytes], parts), n)


def json_array(parts: Sequence[str]) -> str:
    return "[" + ",".join(parts) + "]"


def msgpack_array(parts: Sequence[bytes], n: int | None = None) -> bytes:
    if n is None:
        n = len(parts)
    if n < 16:
        head = bytes((0x90 | n,))
    elif n < 0x10000:
        head = b"\xdc" + n.to_bytes(2, "big")
    else:
        head = b"\xdd" + n.to_bytes(4, "big")
    return head + b"".join(parts)


def resync(channel: str, epoch: str, offset: int, snapshot: dict[str, Any]) -> dict[str, Any]:
    """Pushed when the edge finds a subscribed channel's history lost (epoch changed or a gap
    it cannot fill): the client replaces its state with `snapshot` and goes on from `offset`."""
    return {
        "type": "resync",
        "channel": channel,
        "epoch": epoch,
        "offset": offset,
        "snapshot": snapshot,
    }


# json.dumps(message, separators=(",", ":"), ensure_ascii=False), byte for byte, without
# building an encoder per call (an edge encodes a reply per subscribe, 100,000 in a storm).
_json = compact_encoder(allow_nan=True, check_circular=False)


def encode(message: dict[str, Any], codec: Codec) -> Frame:
    if codec is Codec.MSGPACK:
        return _packb(message)
    return _json(message)


def _packb(message: object) -> bytes:
    """msgpack, with integers beyond 64 bits (valid JSON, no msgpack type) sent as strings."""
    try:
        packed: bytes = msgpack.packb(message, use_bin_type=True)
    except OverflowError:
        packed = msgpack.packb(_big_ints_as_str(message), use_bin_type=True)
    return packed


def _big_ints_as_str(value: object) -> object:
    if isinstance(value, dict):
        return {k: _big_ints_as_str(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_big_ints_as_str(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**64:
        return str(value)
    return value


def pub_json(channel: str, offset: int, key: str, data_json: str, deleted: bool = False) -> str:
    """A publication as a JSON frame, built around the publisher's JSON text without
    decoding it: the edge does this once per message, not once per client. Channel names
    are grammar-checked (no quote or backslash), so they need no escaping."""
    head = f'{{"type":"pub","channel":"{channel}","offset":{offset}'
    if key:
        head += f',"key":{json.dumps(key, ensure_ascii=False)}'
    if deleted:
        head += ',"deleted":true'
    return f'{head},"data":{data_json}}}'


def pub_msgpack(
    channel: str, offset: int, key: str, data_json: str, deleted: bool = False
) -> bytes:
    message: dict[str, Any] = {"type": "pub", "channel": channel, "offset": offset}
    if key:
        message["key"] = key
    if deleted:
        message["deleted"] = True
    message["data"] = json.loads(data_json)
    return _packb(message)


def snapshot_object(flat: dict[str, str]) -> dict[str, Any]:
    """A snapshot as the client sees it: key -> decoded value ("" is the key of an unkeyed
    channel's single value)."""
    return {k: json.loads(v) for k, v in flat.items()}
