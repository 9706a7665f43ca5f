"""Strict JSON decoding, shared by everything that reads JSON from outside: the client
protocol (common/protocol.py) and the HTTP publish API (ingest/http_api.py).

Python's `json.loads` accepts more than JSON (RFC 8259): the literals ``NaN``,
``Infinity`` and ``-Infinity``, bytes in UTF-16 or UTF-32, and ``\\ud800``-style escapes of
lone surrogates, which make strings that cannot be encoded to UTF-8 again (Redis
arguments, frames to clients: the error would surface far from the input, as a
`UnicodeEncodeError`). `loads` refuses all of them with a `ValueError`, as it refuses any
other malformed input.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any, NoReturn

# A JSON escape that can start a surrogate (\uD800-\uDFFF), any case: only frames that
# have one are searched for lone surrogates after decoding (a valid pair decodes to one
# character outside the surrogate range).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


# One decoder for every call: `json.loads` with an argument builds a new one (and its
# scanner, a reference cycle with it) per call.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def loads(data: str | bytes) -> Any:
    """Decode `data` (text, or UTF-8 bytes) as standard JSON; ValueError if it is not.
    RecursionError for nesting deeper than the interpreter's limit, as `json.loads`."""
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    obj = _DECODER.decode(text)
    if _SURROGATE_ESCAPE.search(text) is not None and _has_lone_surrogate(obj):
        raise ValueError("a string holds an unpaired surrogate (\\ud800-\\udfff)")
    return obj


def _has_lone_surrogate(value: object) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item) is not None:
                return True
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def compact_encoder(*, allow_nan: bool, check_circular: bool = True) -> Callable[[object], str]:
    """`json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=...)`, byte for
    byte, calling the C encoder that `JSONEncoder.encode` builds on every call (and reaches
    through two Python frames) once built (json.dumps with options even builds a
    JSONEncoder per call): a third of the JSON cost of a small message. With
    `check_circular` the circular-reference markers are shared, so the function is not
    thread-safe (one per user); without, it is (a circular structure then fails with
    RecursionError instead of ValueError). Falls back to `JSONEncoder.encode` without the
    C accelerator."""
    base = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=allow_nan,
                            check_circular=check_circular)
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return base.encode
    markers: dict[int, object] | None = {} if check_circular else None
    encode = make(markers, base.default, json.encoder.encode_basestring, None,
                  base.key_separator, base.item_separator, base.sort_keys, base.skipkeys,
                  base.allow_nan)
    join = "".join

    def dumps(obj: object) -> str:
        if isinstance(obj, str):  # the C encoder takes containers; JSONEncoder.encode not
            return base.encode(obj)
        try:
            return join(encode(obj, 0))
        except BaseException:
            if markers is not None:
                markers.clear()  # left holding the containers being encoded when it raised
            raise

    return dumps
