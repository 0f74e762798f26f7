"""in-toto Statement v1 with the embassy header: round trip and strict parsing."""

from __future__ import annotations

import json

import pytest

from embassy.attest.types import ClockInfo, TpmMode
from embassy.errors import WireFormatError
from embassy.wire.codec import canonical_json
from embassy.wire.statement import (
    IDENTITY_V1,
    LIFECYCLE_V1,
    STATEMENT_TYPE,
    Header,
    Statement,
    Subject,
    parse_statement,
)

HEADER = Header(
    seq=7, prev=bytes(range(32)), clock=ClockInfo(123456, 3, 1, True), tpm_mode=TpmMode.HARDWARE
)
STATEMENT = Statement(
    LIFECYCLE_V1, (Subject("thing", b"\x11" * 32),), HEADER, {"event": "start", "n": 2}
)


def test_round_trip() -> None:
    payload = STATEMENT.encode()
    parsed = parse_statement(payload)
    assert parsed == STATEMENT
    assert parsed.encode() == payload


def test_encoding_is_canonical_in_toto() -> None:
    obj = json.loads(STATEMENT.encode())
    assert obj["_type"] == STATEMENT_TYPE
    assert obj["subject"] == [{"name": "thing", "digest": {"sha256": "11" * 32}}]
    assert obj["predicate"]["header"] == {
        "log": {"seq": 7, "prev": bytes(range(32)).hex()},
        "tpm_clock": {"clock": 123456, "reset_count": 3, "restart_count": 1, "safe": True},
        "tpm_mode": "hardware",
    }
    assert canonical_json(obj) == STATEMENT.encode()


def test_body_cannot_define_the_header() -> None:
    with pytest.raises(ValueError, match="must not define 'header'"):
        Statement(LIFECYCLE_V1, STATEMENT.subjects, HEADER, {"header": {}}).encode()


def _payload(change: object) -> bytes:
    obj = json.loads(STATEMENT.encode())
    change(obj)  # type: ignore[operator]
    return json.dumps(obj).encode()


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda o: o.update(predicateType=LIFECYCLE_V1[:-1] + "9"), "unknown 'urn:embassy"),
        (lambda o: o.update(predicateType="https://slsa.dev/provenance/v1"), "unknown"),
        (lambda o: o.update(_type="https://in-toto.io/Statement/v0.1"), "statement._type"),
        (lambda o: o.update(extra=1), "unknown field"),
        (lambda o: o["predicate"].pop("header"), "header: expected an object"),
        (lambda o: o["predicate"]["header"]["log"].update(seq=-1), "log.seq: negative"),
        (lambda o: o["predicate"]["header"]["log"].update(seq=True), "expected int, got bool"),
        (lambda o: o["predicate"]["header"]["log"].update(prev="00"), "expected 32 bytes"),
        (lambda o: o["predicate"]["header"].update(tpm_mode="emulated"), "unknown mode"),
        (lambda o: o["predicate"]["header"]["tpm_clock"].update(clock=-5), "negative counter"),
        (lambda o: o["predicate"]["header"]["tpm_clock"].update(x=1), "unknown field"),
        (lambda o: o["predicate"]["header"].update(x=1), "unknown field"),
        (lambda o: o["subject"][0].update(uri="x"), r"subject\[0\]: unknown field"),
        (lambda o: o["subject"][0]["digest"].update(sha256="AA" * 32), "lower-case"),
    ],
)
def test_parse_refuses(change: object, reason: str) -> None:
    with pytest.raises(WireFormatError, match=reason):
        parse_statement(_payload(change))


def test_every_known_predicate_parses() -> None:
    payload = Statement(IDENTITY_V1, STATEMENT.subjects, HEADER, {}).encode()
    assert parse_statement(payload).predicate_type == IDENTITY_V1
