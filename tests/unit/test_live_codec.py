"""The live-message codec (common/broker/live.py): both formats round-trip any key and data
the publisher can send (JSON text with newlines, unicode, escaped control characters);
publish.lua's side of it is checked against a real server in
tests/integration/test_publish_script.py."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from common.broker.live import SEP, decode_live, encode_live, encode_live_one
from common.channels import MAX_KEY_LENGTH, validate_key

keys = st.text(st.characters(exclude_categories=["Cs"], min_codepoint=0x20),
               max_size=MAX_KEY_LENGTH)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=10,
)
# What the publisher sends: compact JSON, non-ASCII kept, sometimes indented (newlines).
data = st.builds(
    lambda value, indent: json.dumps(value, ensure_ascii=False, indent=indent,
                                     separators=(",", ":") if indent is None else None),
    json_values, st.none() | st.just(1))
epochs = st.text("0123456789abcdef", min_size=1, max_size=20)
messages = st.tuples(keys, data, st.booleans(), st.integers(0, 2**53))


@given(epochs, st.integers(1, 2**53), st.lists(messages, min_size=1, max_size=20))
def test_a_call_s_messages_round_trip(epoch: str, first: int,
                                      batch: list[tuple[str, str, bool, int]]) -> None:
    for key, _, _, _ in batch:
        validate_key(key)  # the keys the publisher accepts, no more
    pubs = decode_live("depth.X", encode_live(epoch, first, batch))
    assert [(p.channel, p.epoch, p.offset) for p in pubs] == [
        ("depth.X", epoch, first + i) for i in range(len(batch))]
    assert [(p.key, p.data, p.deleted, p.received) for p in pubs] == [
        (key, text, deleted, received / 1000) for key, text, deleted, received in batch]


@given(epochs, st.integers(1, 2**53), messages)
def test_the_one_message_format_is_still_read(epoch: str, offset: int,
                                              message: tuple[str, str, bool, int]) -> None:
    key, text, deleted, received = message
    [p] = decode_live("c", encode_live_one(epoch, offset, key, text, deleted, received))
    assert (p.epoch, p.offset, p.key, p.data, p.deleted, p.received) == (
        epoch, offset, key, text, deleted, received / 1000)


@given(data)
def test_json_text_never_holds_the_separator(text: str) -> None:
    assert SEP not in text
    assert json.dumps({"s": f"a{SEP}\n"}, ensure_ascii=False) == '{"s": "a\\u001e\\n"}'


def test_the_separator_is_not_a_valid_key_character() -> None:
    try:
        validate_key(f"a{SEP}b")
    except ValueError:
        return
    raise AssertionError("a key with the record separator was accepted")


def test_exact_bytes() -> None:
    assert encode_live("e1", 7, [("k", '{"a":"x\\ny"}', True, 1500), ("", "2", False, 0)]) == (
        '\x1ee1\n7\x1e1\nk\n1500\n{"a":"x\\ny"}\x1e0\n\n\n2')
    assert encode_live_one("e", 1, "", "1") == "e\n1\n0\n\n\n1"
