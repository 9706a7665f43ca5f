"""The publisher's JSON of a message's data: byte for byte what json.dumps gives with its
options, the same errors, and usable again after one."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from ingest.publisher import json_encoder

SAMPLES: list[Any] = [
    {"price": 21034.25, "size": 3, "side": "buy", "ts": 1733400000123, "id": "abc123"},
    {"nested": {"a": [1, 2.5, None, True, False, "x"], "b": {}}, "empty": []},
    "plain text", "naïve ☃ \u2028 \"quoted\" \\ \n\t\x00", 0, -1, 1e16, 1.5e-7, 2**70, None,
    True, [], {}, {7: "int key", 2.5: "float key", None: "none", False: "bool"},
    [{"ü": "é"}, ["deep", ["deeper", ["deepest"]]]], ("a", "tuple"),
]


def expected(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


@pytest.mark.parametrize("obj", SAMPLES)
def test_same_text_as_json_dumps(obj: object) -> None:
    assert json_encoder()(obj) == expected(obj)


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
