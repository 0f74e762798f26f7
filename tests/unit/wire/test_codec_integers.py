"""The strict JSON reader caps integers: a format error, never Python's ValueError."""

from __future__ import annotations

import pytest

from embassy.errors import WireFormatError
from embassy.wire.codec import MAX_INT_MAGNITUDE, parse_json_object


@pytest.mark.parametrize("value", [0, 1, -1, 2**63, MAX_INT_MAGNITUDE, -MAX_INT_MAGNITUDE, 10**19])
def test_integers_within_64_bits_are_read(value: int) -> None:
    assert parse_json_object(b'{"n":%d}' % value, "doc") == {"n": value}


@pytest.mark.parametrize(
    "literal",
    [
        b"18446744073709551616",  # 2**64: 20 digits, one past the magnitude cap
        b"-18446744073709551616",
        b"99999999999999999999",
        b"1" * 21,
        b"-" + b"1" * 21,
        b"9" * 4301,  # where Python's int() would raise ValueError
        b"9" * 5000,
        b"9" * 100_000,
    ],
)
def test_larger_integers_are_a_wire_format_error(literal: bytes) -> None:
    for document in (b'{"n":%b}' % literal, b'{"a":{"b":[1,%b]}}' % literal):
        with pytest.raises(WireFormatError, match="JSON integer") as info:
            parse_json_object(document, "doc")
        assert len(str(info.value)) < 100  # the literal is not echoed


def test_non_ascii_digits_are_not_numbers() -> None:
    with pytest.raises(WireFormatError):
        parse_json_object('{"n":\u0663}'.encode(), "doc")
