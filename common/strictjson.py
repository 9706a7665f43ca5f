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
