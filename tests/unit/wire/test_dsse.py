"""DSSE v1: the PAE bytes, signing, and every way verification must refuse."""

from __future__ import annotations

import hashlib
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from embassy.errors import SignatureError, WireFormatError
from embassy.wire.codec import b64encode
from embassy.wire.dsse import (
    IN_TOTO_PAYLOAD_TYPE,
    MAX_ENVELOPE_BYTES,
    keyid,
    pae,
    parse_envelope,
    raw_public_key,
    sign_envelope,
    verify_envelope,
)

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
PAYLOAD = b'{"hello":"world"}'


def test_pae_matches_the_dsse_spec_example() -> None:
    assert pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


def test_pae_counts_bytes_not_characters() -> None:
    assert pae("é", b"\x00") == b"DSSEv1 2 \xc3\xa9 1 \x00"
    assert pae("", b"") == b"DSSEv1 0  0 "


def test_sign_verify_round_trip() -> None:
    raw = sign_envelope(PAYLOAD, KEY)
    envelope = parse_envelope(raw)
    assert envelope.raw == raw
    assert envelope.digest == hashlib.sha256(raw).digest()
    assert envelope.payload_type == IN_TOTO_PAYLOAD_TYPE
    assert (
        envelope.signatures[0].keyid == hashlib.sha256(raw_public_key(KEY.public_key())).hexdigest()
    )
    assert verify_envelope(envelope, KEY.public_key()) == PAYLOAD


def test_the_signature_is_over_pae() -> None:
    envelope = parse_envelope(sign_envelope(PAYLOAD, KEY))
    KEY.public_key().verify(envelope.signatures[0].sig, pae(IN_TOTO_PAYLOAD_TYPE, PAYLOAD))


def test_wrong_key_is_refused() -> None:
    envelope = parse_envelope(sign_envelope(PAYLOAD, OTHER))
    with pytest.raises(SignatureError, match=f"no signature by key {keyid(KEY.public_key())[:16]}"):
        verify_envelope(envelope, KEY.public_key())


def test_a_signature_under_the_right_keyid_but_by_another_key_is_refused() -> None:
    obj = json.loads(sign_envelope(PAYLOAD, OTHER))
    obj["signatures"][0]["keyid"] = keyid(KEY.public_key())
    envelope = parse_envelope(json.dumps(obj).encode())
    with pytest.raises(SignatureError, match="does not verify"):
        verify_envelope(envelope, KEY.public_key())


def test_one_good_signature_among_several_is_enough() -> None:
    good = json.loads(sign_envelope(PAYLOAD, KEY))["signatures"][0]
    obj = json.loads(sign_envelope(PAYLOAD, OTHER))
    bad = {"keyid": good["keyid"], "sig": obj["signatures"][0]["sig"]}
    obj["signatures"] = [bad, good]
    assert verify_envelope(parse_envelope(json.dumps(obj).encode()), KEY.public_key()) == PAYLOAD


def test_changed_payload_type_is_refused_and_cannot_be_swapped() -> None:
    obj = json.loads(sign_envelope(PAYLOAD, KEY))
    obj["payloadType"] = "text/plain"
    envelope = parse_envelope(json.dumps(obj).encode())
    with pytest.raises(WireFormatError, match="payloadType 'text/plain'"):
        verify_envelope(envelope, KEY.public_key())
    with pytest.raises(SignatureError, match="does not verify"):
        verify_envelope(envelope, KEY.public_key(), payload_type="text/plain")


def test_changed_payload_is_refused() -> None:
    obj = json.loads(sign_envelope(PAYLOAD, KEY))
    obj["payload"] = b64encode(PAYLOAD.replace(b"world", b"World"))
    with pytest.raises(SignatureError, match="does not verify"):
        verify_envelope(parse_envelope(json.dumps(obj).encode()), KEY.public_key())


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda o: o.update(extra=1), "unknown field"),
        (lambda o: o.update(signatures=[]), "no signatures"),
        (lambda o: o.pop("payload"), "missing field 'payload'"),
        (lambda o: o["signatures"][0].update(extra=1), r"signatures\[0\]: unknown field"),
        (lambda o: o.update(signatures=["x"]), r"signatures\[0\]: expected an object"),
        (lambda o: o.update(payload=o["payload"].rstrip("=")), "not valid base64"),
    ],
)
def test_parse_refuses_malformed_envelopes(mutate: object, reason: str) -> None:
    obj = json.loads(sign_envelope(PAYLOAD, KEY))
    mutate(obj)  # type: ignore[operator]
    with pytest.raises(WireFormatError, match=reason):
        parse_envelope(json.dumps(obj).encode())


def test_parse_refuses_oversize_before_parsing() -> None:
    raw = sign_envelope(PAYLOAD, KEY)
    parse_envelope(raw + b" " * (MAX_ENVELOPE_BYTES - len(raw)))
    with pytest.raises(WireFormatError, match="exceeds"):
        parse_envelope(raw + b" " * (MAX_ENVELOPE_BYTES - len(raw) + 1))
