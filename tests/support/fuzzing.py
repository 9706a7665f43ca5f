"""What fuzzing shares (not a test module): the documented answers a client may get, the
signs of exception text in what it gets, and the hypothesis strategies of client frames:
valid requests, valid requests mutated, arbitrary JSON and msgpack, and plain garbage."""

from __future__ import annotations

import json
import re
from typing import Any

from hypothesis import strategies as st

from common import protocol
from common.protocol import Codec

# docs/protocol.md, "Error codes" (without `internal`: an unexpected server error).
ERROR_CODES = frozenset({
    "bad_request", "unknown_type", "bad_channel", "already_subscribed", "not_subscribed",
    "too_many_subscriptions", "permission_denied", "unauthorized", "history_unavailable",
    "unavailable",
})
# What the edge may close a fuzzed connection with: bad frames (3500), bad tokens (3501),
# too many requests (3007), the WebSocket layer (1002 framing, 1007 a close frame whose
# reason is not UTF-8, 1009 size).
CLOSE_CODES = frozenset({1002, 1007, 1009, 3500, 3501, 3007})
SERVER_TYPES = frozenset({
    "connected", "subscribed", "unsubscribed", "history", "pong", "refreshed", "error",
    "pub", "ping", "gap", "resync",
})
# Exception text that must never reach a client: a traceback, a source location, an
# exception's repr or type name (fanout's own messages name no exception).
EXCEPTION_TEXT = re.compile(
    r"Traceback|File \"|\.py\"|line \d+, in|Error\(|Exception|Error:|"
    r"\b(?:Key|Value|Type|Attribute|Index|Unicode\w*|Runtime|Assertion|Recursion|Overflow"
    r"|ZeroDivision|Redis|Connection|Timeout)Error\b"
)


def exception_text(text: str) -> str | None:
    m = EXCEPTION_TEXT.search(text)
    return m.group(0) if m else None


# --- strategies ------------------------------------------------------------------------------

# Text without the words that would look like exception text when echoed back.
safe_text = st.text(max_size=40).filter(lambda s: exception_text(s) is None)

json_scalars = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | safe_text
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(safe_text, inner, max_size=4),
    max_leaves=12,
)

channels = st.sampled_from([
    "quotes.ES", "trades.ES", "depth.NQ", "bars.1m.ES", "account.A1.orders",
    "account.B-2.balance", "quotes.CON.F.US.MNQ.Z25", "quotes.", "nope", "quotes.A B", "",
    "trades." + "X" * 130, "account.1.secrets",
]) | safe_text
ids = st.none() | st.integers(-5, 2**54) | st.sampled_from(["1", 1.5, True, [1]])
epochs = st.sampled_from(["e1", "", "x" * 65]) | safe_text
offsets = st.integers(-3, 2**64) | st.sampled_from([None, "3", 2.0, True])


def _requests() -> st.SearchStrategy[dict[str, Any]]:
    subscribe = st.fixed_dictionaries(
        {"type": st.just("subscribe"), "channel": channels},
        optional={
            "id": ids, "snapshot": st.booleans() | json_values,
            "recover": st.none() | st.fixed_dictionaries(
                {}, optional={"offset": offsets, "epoch": epochs}) | json_values,
            "max_rate": st.none() | st.floats(-1, 2000) | st.integers(-1, 2000) | json_values,
        },
    )
    history = st.fixed_dictionaries(
        {"type": st.just("history"), "channel": channels},
        optional={"id": ids, "epoch": epochs, "from": offsets, "to": offsets},
    )
    simple = st.fixed_dictionaries(
        {"type": st.sampled_from(["unsubscribe", "ping", "pong", "refresh", "connect"])},
        optional={"id": ids, "channel": channels, "token": safe_text | json_values,
                  "name": safe_text | json_values},
    )
    other = st.fixed_dictionaries(
        {"type": json_values | st.sampled_from(["Ping", "publish", "SUBSCRIBE", ""])},
        optional={"id": ids},
    )
    return subscribe | history | simple | other


requests = _requests()

# Requests that are right, on a few channels, so that sequences of them subscribe,
# recover, unsubscribe and read history (and hit already_subscribed, not_subscribed, the
# subscription limit, the FAIL channel of a test's hub that is down).
_good_channels = st.sampled_from(["quotes.ES", "trades.NQ", "depth.ES", "account.A1.orders",
                                  "trades.FAIL"])
valid_requests = st.one_of(
    st.fixed_dictionaries(
        {"type": st.just("subscribe"), "id": st.integers(1, 50), "channel": _good_channels},
        optional={"snapshot": st.booleans(),
                  "recover": st.fixed_dictionaries({"offset": st.integers(0, 12),
                                                    "epoch": st.sampled_from(["e1", "e0"])}),
                  "max_rate": st.floats(0.5, 100)},
    ),
    st.fixed_dictionaries({"type": st.just("unsubscribe"), "id": st.integers(1, 50),
                           "channel": _good_channels}),
    st.fixed_dictionaries({"type": st.just("history"), "id": st.integers(1, 50),
                           "channel": _good_channels, "epoch": st.sampled_from(["e1", "e0"]),
                           "from": st.integers(1, 12), "to": st.integers(1, 12)}),
    st.fixed_dictionaries({"type": st.sampled_from(["ping", "pong"]),
                           "id": st.integers(1, 50)}),
)


@st.composite
def mutated_requests(draw: st.DrawFn) -> dict[str, Any]:
    """A request with fields dropped, replaced by any JSON value, or added."""
    obj = dict(draw(requests))
    for _ in range(draw(st.integers(0, 3))):
        action = draw(st.sampled_from(["drop", "replace", "add"]))
        keys = sorted(obj)
        if action == "drop" and keys:
            obj.pop(draw(st.sampled_from(keys)))
        elif action == "replace" and keys:
            obj[draw(st.sampled_from(keys))] = draw(json_values)
        else:
            obj[draw(safe_text)] = draw(json_values)
    return obj


objects = (valid_requests | requests | mutated_requests()
           | st.dictionaries(safe_text, json_values, max_size=5))

# Text that is not quite JSON, or JSON that is not standard.
bad_json = st.sampled_from([
    "", "{", "}", "[", '{"type":"ping"', '{"type":"ping"}}', "NaN", "Infinity",
    '{"type":"ping","id":NaN}', '{"type":"subscribe","channel":"quotes.ES","max_rate":Infinity}',
    '{"type":"ping","x":"\\ud800"}', '{"\\udfff":1}', "[" * 5000 + "]" * 5000,
    '{"a":' * 3000 + "1" + "}" * 3000, "1" * 5000, "\ufeff{}", '{"type":"ping"} trailing',
])


@st.composite
def frames(draw: st.DrawFn, codec: Codec, objects_only: bool = False) -> str | bytes:
    """One client frame for a connection on `codec`: with `objects_only`, one that decodes
    to an object (a request, valid or not); else possibly one that does not decode."""
    kind = "object" if objects_only else draw(
        st.sampled_from(["object", "object", "object", "garbage", "flipped", "value"]))
    if kind == "garbage":
        return draw(st.binary(max_size=64) | st.text(max_size=64) | bad_json)
    value: Any = draw(objects) if kind != "value" else draw(json_values)
    if codec is Codec.MSGPACK:
        data = protocol.encode(value, codec)  # as the edge packs: huge integers as strings
        assert isinstance(data, bytes)
        if kind == "flipped" and data:
            i = draw(st.integers(0, len(data) - 1))
            data = data[:i] + bytes((data[i] ^ draw(st.integers(1, 255)),)) + data[i + 1:]
        return data
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=draw(st.booleans()))
    if kind == "flipped" and text:
        i = draw(st.integers(0, len(text) - 1))
        text = text[:i] + draw(st.characters(exclude_categories=["Cs"])) + text[i + 1:]
    return text.encode() if draw(st.booleans()) and kind != "flipped" else text
