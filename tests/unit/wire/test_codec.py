"""Canonical JSON out, strict JSON in, canonical base64 and hex."""

from __future__ import annotations

import base64

import pytest

from embassy.errors import WireFormatError
from embassy.wire.codec import (
    b64decode,
    b64encode,
    canonical_json,
    field,
    hex_decode,
    only_fields,
    parse_json_object,
)


def test_canonical_json_sorts_keys_without_whitespace() -> None:
    assert canonical_json({"b": 1, "a": {"d": [1, 2], "c": "é"}}) == (
        '{"a":{"c":"é","d":[1,2]},"b":1}'.encode()
    )


def test_canonical_json_is_independent_of_insertion_order() -> None:
    assert canonical_json({"x": 1, "y": 2}) == canonical_json({"y": 2, "x": 1})


@pytest.mark.parametrize("value", [{"f": 1.0}, {"a": [1, {"b": 0.5}]}, {"t": (1, 2.5)}])
def test_canonical_json_refuses_floats(value: dict[str, object]) -> None:
    with pytest.raises(TypeError, match="floats have no canonical encoding"):
        canonical_json(value)


def test_strict_parse_accepts_an_object() -> None:
    assert parse_json_object(b'{"a":[1,"x"],"b":{"c":null}}', "doc") == {
        "a": [1, "x"],
        "b": {"c": None},
    }


def test_strict_parse_refuses_duplicate_keys_also_nested() -> None:
    with pytest.raises(WireFormatError, match="duplicate JSON key 'a'"):
        parse_json_object(b'{"a":1,"a":2}', "doc")
    with pytest.raises(WireFormatError, match="duplicate JSON key 'k'"):
        parse_json_object(b'{"a":{"k":1,"k":1}}', "doc")


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_strict_parse_refuses_non_finite_constants(constant: bytes) -> None:
    with pytest.raises(WireFormatError, match=f"constant {constant.decode()} is not allowed"):
        parse_json_object(b'{"a":' + constant + b"}", "doc")


@pytest.mark.parametrize(("data", "kind"), [(b"[1]", "list"), (b'"s"', "str"), (b"3", "int")])
def test_strict_parse_refuses_non_objects(data: bytes, kind: str) -> None:
    with pytest.raises(WireFormatError, match=f"doc: expected a JSON object, got {kind}"):
        parse_json_object(data, "doc")


def test_strict_parse_refuses_non_utf8_and_truncation() -> None:
    with pytest.raises(WireFormatError, match="doc: not UTF-8 at byte 7"):
        parse_json_object(b'{"a":"x\xff"}', "doc")
    with pytest.raises(WireFormatError, match="doc: invalid JSON"):
        parse_json_object(b'{"a":', "doc")


def test_strict_parse_refuses_deep_nesting() -> None:
    with pytest.raises(WireFormatError, match="nested too deeply"):
        parse_json_object(b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "doc")


def test_b64_round_trip() -> None:
    for data in (b"", b"a", b"ab", b"abc", bytes(range(256))):
        assert b64decode(b64encode(data), "x") == data


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("aGk", "not valid base64"),  # missing padding
        ("aGk=\n", "not valid base64"),  # whitespace
        ("aG-_", "not valid base64"),  # url-safe alphabet
        ("aGl=", "base64 is not in canonical form"),  # non-zero unused bits, decodes to b"hi"
    ],
)
def test_b64_refuses_non_canonical(text: str, reason: str) -> None:
    with pytest.raises(WireFormatError, match=f"field: {reason}"):
        b64decode(text, "field")


def test_b64_non_canonical_example_is_really_an_alias() -> None:
    assert base64.b64decode("aGl=") == base64.b64decode("aGk=") == b"hi"


def test_b64_refuses_non_strings() -> None:
    with pytest.raises(WireFormatError, match="expected a base64 string"):
        b64decode(b"aGk=", "field")


def test_hex_decode_is_lowercase_and_sized() -> None:
    assert hex_decode("00ff", "h", size=2) == b"\x00\xff"
    with pytest.raises(WireFormatError, match="lower-case"):
        hex_decode("00FF", "h")
    with pytest.raises(WireFormatError, match="expected 3 bytes, got 2"):
        hex_decode("00ff", "h", size=3)
    with pytest.raises(WireFormatError, match="not valid hex"):
        hex_decode("0g", "h")


def test_field_refuses_bool_for_int_and_wrong_types() -> None:
    assert field({"n": 3}, "n", int, "obj") == 3
    with pytest.raises(WireFormatError, match=r"obj\.n: expected int, got bool"):
        field({"n": True}, "n", int, "obj")
    with pytest.raises(WireFormatError, match=r"obj\.n: expected int, got str"):
        field({"n": "3"}, "n", int, "obj")
    with pytest.raises(WireFormatError, match="obj: missing field 'n'"):
        field({}, "n", int, "obj")


def test_only_fields_names_the_unknown_ones() -> None:
    only_fields({"a": 1}, {"a", "b"}, "obj")
    with pytest.raises(WireFormatError, match="obj: unknown field\\(s\\) 'x', 'z'"):
        only_fields({"a": 1, "z": 2, "x": 3}, {"a"}, "obj")
