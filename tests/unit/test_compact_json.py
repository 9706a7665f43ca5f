"""common/strictjson.py `compact_encoder`, the C encoder built once (the publisher's JSON of
a message's data, the edge's protocol messages): byte for byte what json.dumps gives with
its options, the same errors, and usable again after one."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import pytest

from common.strictjson import compact_encoder

SAMPLES: list[Any] = [
    {"price": 21034.25, "size": 3, "side": "buy", "ts": 1733400000123, "id": "abc123"},
    {"nested": {"a": [1, 2.5, None, True, False, "x"], "b": {}}, "empty": []},
    "plain text", "naïve ☃ \u2028 \"quoted\" \\ \n\t\x00", 0, -1, 1e16, 1.5e-7, 2**70, None,
    True, [], {}, {7: "int key", 2.5: "float key", None: "none", False: "bool"},
    [{"ü": "é"}, ["deep", ["deeper", ["deepest"]]]], ("a", "tuple"),
]


def expected(obj: object, allow_nan: bool = False) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=allow_nan)


def json_encoder() -> Callable[[object], str]:
    """The publisher's: NaN refused, circular references checked."""
    return compact_encoder(allow_nan=False)


@pytest.mark.parametrize("obj", SAMPLES)
def test_same_text_as_json_dumps(obj: object) -> None:
    assert json_encoder()(obj) == expected(obj)


@pytest.mark.parametrize("obj", [*SAMPLES, math.nan, [math.inf, -math.inf]])
def test_the_protocols_encoder_same_text_as_json_dumps(obj: object) -> None:
    """The edge's (common/protocol.py `encode`): NaN allowed as json.dumps allows it by
    default, no circular check (thread-safe)."""
    assert compact_encoder(allow_nan=True, check_circular=False)(obj) == expected(obj, True)


def test_without_the_circular_check_a_loop_is_a_recursion_error() -> None:
    loop: list[Any] = []
    loop.append(loop)
    dumps = compact_encoder(allow_nan=True, check_circular=False)
    with pytest.raises(RecursionError):
        dumps(loop)
    assert dumps([1]) == "[1]"


@pytest.mark.parametrize("bad", [math.nan, math.inf, [1, -math.inf], {"x": {1, 2}}, object()])
def test_same_errors_and_usable_after_one(bad: object) -> None:
    dumps = json_encoder()
    with pytest.raises((ValueError, TypeError)) as mine:
        dumps(bad)
    with pytest.raises((ValueError, TypeError)) as theirs:
        expected(bad)
    assert type(mine.value) is type(theirs.value)
    shared: dict[str, Any] = {"k": [1]}
    # The markers of the containers it was inside when it raised are gone: the same
    # containers encode again (a stale marker would be taken for a circular reference).
    assert dumps([shared, shared]) == expected([shared, shared])


def test_circular_reference_is_a_value_error() -> None:
    loop: list[Any] = []
    loop.append(loop)
    dumps = json_encoder()
    with pytest.raises(ValueError, match="Circular reference"):
        dumps(loop)
    assert dumps({"ok": [loop[:0]]}) == '{"ok":[[]]}'


def test_a_container_that_failed_encodes_once_fixed() -> None:
    dumps = json_encoder()
    data: dict[str, Any] = {"ok": [1], "bad": {1, 2}}
    with pytest.raises(TypeError):
        dumps(data)
    del data["bad"]
    assert dumps(data) == '{"ok":[1]}'  # not "Circular reference detected"
