"""Signed payloads have one byte form: a statement or event the embassy's key signed in any
encoding but the canonical one is refused after its signature verifies, naming where."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from embassy.attest.types import ClockInfo, TpmMode
from embassy.errors import WireFormatError
from embassy.log.entry import GENESIS, EntryType, encode_entry
from embassy.log.event import EVENT_PAYLOAD_TYPE, encode_event, parse_event
from embassy.log.verify_entry import authenticate_entry
from embassy.wire.codec import parse_json_object, require_canonical
from embassy.wire.dsse import raw_public_key, sign_envelope
from embassy.wire.statement import (
    LIFECYCLE_V1,
    Header,
    Statement,
    embassy_subject,
    parse_statement,
)

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
HEADER = Header(1, GENESIS, ClockInfo(5, 1, 0, True), TpmMode.SOFTWARE)
PAYLOAD = Statement(
    LIFECYCLE_V1,
    (embassy_subject(raw_public_key(KEY.public_key())),),
    HEADER,
    {"event": "test", "note": "é"},
).encode()


def _variants(payload: bytes) -> dict[str, bytes]:
    obj = json.loads(payload)
    return {
        "spaces": json.dumps(obj, sort_keys=True, separators=(", ", ": ")).encode(),
        "indented": json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False).encode(),
        "key order": json.dumps(dict(reversed(obj.items())), separators=(",", ":")).encode(),
        "ASCII escapes": json.dumps(obj, sort_keys=True, separators=(",", ":")).encode(),
        "trailing newline": payload + b"\n",
        "leading space": b" " + payload,
    }


@pytest.mark.parametrize("variant", sorted(_variants(PAYLOAD)))
def test_a_signed_non_canonical_statement_is_refused(variant: str) -> None:
    loose = _variants(PAYLOAD)[variant]
    assert loose != PAYLOAD
    assert json.loads(loose) == json.loads(PAYLOAD)
    entry = encode_entry(
        seq=1, prev=GENESIS, reset_count=1, pcr=14, type=EntryType.STATEMENT,
        data=sign_envelope(loose, KEY),
    )  # fmt: skip
    # The signature verifies (the refusal is not a signature error) ...
    with pytest.raises(WireFormatError, match=r"statement: not canonical JSON .* at byte \d+"):
        authenticate_entry(entry, KEY.public_key())
    # ... and the canonical bytes of the same statement are accepted.
    canonical = encode_entry(
        seq=1, prev=GENESIS, reset_count=1, pcr=14, type=EntryType.STATEMENT,
        data=sign_envelope(PAYLOAD, KEY),
    )  # fmt: skip
    assert authenticate_entry(canonical, KEY.public_key()) == parse_statement(PAYLOAD)


def test_a_signed_non_canonical_event_is_refused() -> None:
    payload = encode_event(EntryType.EMBASSY_START.value, 0, GENESIS, {"code": "ab"})
    assert parse_event(payload).body == {"code": "ab"}
    for loose in _variants(payload).values():
        if loose == payload:
            continue  # nothing to escape in this event
        entry = encode_entry(
            seq=0, prev=GENESIS, reset_count=1, pcr=13, type=EntryType.EMBASSY_START,
            data=sign_envelope(loose, KEY, EVENT_PAYLOAD_TYPE),
        )  # fmt: skip
        with pytest.raises(WireFormatError, match="event: not canonical JSON"):
            authenticate_entry(entry, KEY.public_key())


def test_the_message_says_where_and_what() -> None:
    loose = PAYLOAD.replace(b'"event":"test"', b'"event": "test"')
    with pytest.raises(WireFormatError) as caught:
        parse_statement(loose)
    at = PAYLOAD.index(b'"event":"test"') + len(b'"event":')
    assert caught.value.message.endswith(
        f"first difference at byte {at}, where the canonical encoding has "
        f"{PAYLOAD[at : at + 12]!r}, not {loose[at : at + 12]!r}"
    )


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b'{"a":1.5}', "a float"),
        (b'{"a":"\\ud800"}', "a lone surrogate"),
        (b'{"a":1}' + b" " * 3, "first difference at byte 7"),
    ],
)
def test_values_with_no_canonical_form(data: bytes, reason: str) -> None:
    with pytest.raises(WireFormatError, match=reason):
        require_canonical(data, parse_json_object(data, "x"), "x")


@pytest.mark.parametrize("number", [b"1.5", b"1e3", b"-0.0", b"10E-2"])
def test_a_float_in_a_signed_payload_is_refused_while_parsing(number: bytes) -> None:
    """Statements and events are parsed integers-only, so the canonical check can skip its
    walk for floats: a float never gets that far."""
    data = PAYLOAD.replace(b'"event":"test"', b'"event":' + number)
    assert data != PAYLOAD
    with pytest.raises(WireFormatError, match="only integers"):
        parse_statement(data)
    with pytest.raises(WireFormatError, match="only integers"):
        parse_json_object(data, "x", integers_only=True)
    assert parse_json_object(data, "x")["predicate"]["event"] == float(number)
