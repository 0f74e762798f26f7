"""The producing side's direct encoders (statement, envelope, log entry) write exactly the
bytes the general canonical encoder writes, and refuse what it refuses (floats)."""

from __future__ import annotations

import enum
import random
import types
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from embassy.attest.types import ClockInfo, TpmMode
from embassy.log.entry import EntryType, encode_entry
from embassy.wire.codec import b64encode, canonical_json, reject_floats
from embassy.wire.dsse import Signer, encode_envelope, keyid, pae, sign_envelope
from embassy.wire.statement import (
    LIFECYCLE_V1,
    STATEMENT_TYPE,
    Header,
    Statement,
    Subject,
    parse_statement,
)

# Keys that sort on each side of "header" and next to it, with escapes and non-ASCII.
KEYS = ["a", "head", "header0", "headers", "Header", "_", "é", "z\n", 'q"', "h\\", "\u2028", "ü"]
LEAVES: list[Any] = ["", "x", 'quote"', "back\\slash", "\x00\x1f\x7f", "é€😀", "\u2028", 0, -1]
LEAVES += [2**64 - 1, -(2**63), True, False, None]


def _value(rng: random.Random, depth: int) -> Any:
    roll = rng.random()
    if depth > 2 or roll < 0.6:
        return rng.choice(LEAVES)
    if roll < 0.8:
        return [_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(KEYS): _value(rng, depth + 1) for _ in range(rng.randrange(4))}


def _general_statement(statement: Statement) -> bytes:
    """What Statement.encode wrote before it was written directly."""
    return canonical_json(
        {
            "_type": STATEMENT_TYPE,
            "subject": [s.to_json() for s in statement.subjects],
            "predicateType": statement.predicate_type,
            "predicate": {"header": statement.header.to_json(), **statement.body},
        }
    )


def _header(rng: random.Random) -> Header:
    return Header(
        seq=rng.choice([0, 1, 2**64 - 1]),
        prev=rng.randbytes(32),
        clock=ClockInfo(
            rng.randrange(2**40), rng.randrange(9), rng.randrange(9), rng.random() < 0.5
        ),
        tpm_mode=rng.choice(list(TpmMode)),
    )


def test_statements_are_byte_identical_to_the_general_encoder() -> None:
    rng = random.Random(16)
    for _ in range(2000):
        body = {k: _value(rng, 0) for k in rng.sample(KEYS, rng.randrange(len(KEYS)))}
        subjects = tuple(
            Subject(name, rng.randbytes(32))
            for name in rng.sample(
                ["s", "é", 'n"', "\x01", "embassy-signing-key"], rng.randrange(1, 4)
            )
        )
        statement = Statement(LIFECYCLE_V1, subjects, _header(rng), body)
        payload = statement.encode()
        assert payload == _general_statement(statement)
        assert parse_statement(payload).encode() == payload


class _Key(enum.StrEnum):
    A = "a"


@pytest.mark.parametrize(
    "body",
    [
        types.MappingProxyType({"b": 1, "z": [1, {"k": None}]}),  # another Mapping
        {_Key.A: "key is a str subclass"},
        {"a": ("tuple", 1)},
        {"a": []},
        {},
    ],
)
def test_other_shapes_give_the_same_bytes(body: Any) -> None:
    statement = Statement(LIFECYCLE_V1, (Subject("s", bytes(32)),), _header(random.Random(1)), body)
    assert statement.encode() == _general_statement(statement)


@pytest.mark.parametrize(
    "body", [{"a": 1.0}, {"z": [1, 2.5]}, {"a": {"b": {"c": float("nan")}}}, {"i": 0.0}]
)
def test_a_float_anywhere_in_the_body_is_refused(body: dict[str, Any]) -> None:
    statement = Statement(LIFECYCLE_V1, (Subject("s", bytes(32)),), _header(random.Random(2)), body)
    with pytest.raises(TypeError, match="floats"):
        statement.encode()


def test_a_float_in_the_header_takes_the_general_encoder_and_is_refused() -> None:
    header = Header(1, bytes(32), ClockInfo(1.5, 0, 0, True), TpmMode.SOFTWARE)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="floats"):
        Statement(LIFECYCLE_V1, (Subject("s", bytes(32)),), header, {}).encode()


def test_reject_floats_walks_every_container_and_stops_on_a_cycle() -> None:
    class Tiny(float):
        pass

    for bad in ([1, [2, [Tiny(1)]]], {"a": (1, {"b": 0.5})}, types.MappingProxyType({"a": 1e9})):
        with pytest.raises(TypeError):
            reject_floats(bad)
    reject_floats({"a": [1, "x", None, True, {"b": (2,)}]})
    cycle: dict[str, Any] = {}
    cycle["self"] = cycle
    with pytest.raises(RecursionError):
        reject_floats(cycle)


@pytest.mark.parametrize(
    "payload_type", ["application/vnd.in-toto+json", "application/vnd.embassy.event+json", 'é"\\\n']
)
def test_envelopes_are_byte_identical_to_the_general_encoder(payload_type: str) -> None:
    key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    payload = b'{"x":1}' * 50
    sig = key.sign(pae(payload_type, payload))
    general = canonical_json(
        {
            "payload": b64encode(payload),
            "payloadType": payload_type,
            "signatures": [{"keyid": keyid(key.public_key()), "sig": b64encode(sig)}],
        }
    )
    assert encode_envelope(payload, payload_type, keyid(key.public_key()), sig) == general
    assert Signer.of(key).sign(payload, payload_type) == general  # Ed25519 is deterministic
    assert sign_envelope(payload, key, payload_type) == general


def _general_entry(**kw: Any) -> bytes:
    obj: dict[str, Any] = {
        "v": 1,
        "seq": kw["seq"],
        "prev": kw["prev"].hex(),
        "reset_count": kw["reset_count"],
        "pcr": kw["pcr"],
        "type": kw["type"].value,
        "data": b64encode(kw["data"]),
    }
    if kw.get("batch") is not None:
        obj["batch"] = list(kw["batch"])
    return canonical_json(obj)


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"batch": (5, 9)},
        {"batch": [0, 255]},
        {"seq": True},  # a bool is no int for the direct writer: the general one decides
        {"type": EntryType.LAUNCH_SEAL_POLICY, "data": b""},
        {"seq": 2**64 - 1, "reset_count": 0, "pcr": 23},
    ],
)
def test_entries_are_byte_identical_to_the_general_encoder(changes: dict[str, Any]) -> None:
    kw: dict[str, Any] = {
        "seq": 7,
        "prev": bytes(range(32)),
        "reset_count": 3,
        "pcr": 14,
        "type": EntryType.STATEMENT,
        "data": b"\x00\xff" * 300,
        **changes,
    }
    assert encode_entry(**kw).raw == _general_entry(**kw)


def test_an_entry_with_a_float_field_is_refused() -> None:
    with pytest.raises(TypeError, match="floats"):
        encode_entry(
            seq=1.0,  # type: ignore[arg-type]
            prev=bytes(32),
            reset_count=0,
            pcr=14,
            type=EntryType.STATEMENT,
            data=b"",
        )
