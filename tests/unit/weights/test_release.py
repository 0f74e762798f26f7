"""The weights-key release messages: bound end to end, so the relaying workload can only drop
them."""

from __future__ import annotations

import dataclasses
import os

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from embassy.daemon.keys import derive_keys
from embassy.errors import BadPayloadError, SignatureError, WireFormatError
from embassy.payload.envelope import SUITE_MLKEM768_X25519, SUITE_X25519, embassy_keyid
from embassy.weights.release import (
    KeyRequest,
    ReleaseRequest,
    deny,
    open_release,
    parse_denial,
    parse_key_request,
    parse_release,
    parse_release_request,
    verify_broker_signature,
    wrap_release,
)
from embassy.wire.codec import canonical_json

EMBASSY = derive_keys(bytes(range(32)))
OTHER = derive_keys(bytes(range(1, 33)))
BROKER = Ed25519PrivateKey.from_private_bytes(bytes(32))
KEY = bytes(range(100, 132))
PRIVATE = {SUITE_X25519: EMBASSY.hpke_x25519, SUITE_MLKEM768_X25519: EMBASSY.hpke_hybrid}


def _request(**changes: object) -> KeyRequest:
    fields: dict[str, object] = {
        "model_id": "minilm-l6",
        "key_id": "k1",
        "tenant": "acme",
        "operation": "decrypt-for-load",
        "nonce": bytes(range(32)),
        "embassy_keyid": embassy_keyid(EMBASSY.public_json()),
    }
    fields.update(changes)
    return KeyRequest(**fields)  # type: ignore[arg-type]


def _release(request: KeyRequest, suite: str = SUITE_MLKEM768_X25519) -> bytes:
    release = wrap_release(
        request,
        KEY,
        EMBASSY.public_json(),
        suite=suite,
        decision_id="d-1",
        policy_sha256=bytes(32),
        broker_key=BROKER,
    )
    return canonical_json(release.to_json())


@pytest.mark.parametrize("suite", [SUITE_X25519, SUITE_MLKEM768_X25519])
def test_release_opens_for_its_request_only(suite: str) -> None:
    request = _request()
    release = parse_release(_release(request, suite))
    verify_broker_signature(release, BROKER.public_key())
    assert open_release(release, request, private_keys=PRIVATE) == KEY
    with pytest.raises(BadPayloadError, match="answers request"):
        open_release(release, _request(nonce=bytes(32)), private_keys=PRIVATE)
    other = {SUITE_X25519: OTHER.hpke_x25519, SUITE_MLKEM768_X25519: OTHER.hpke_hybrid}
    with pytest.raises(BadPayloadError, match="does not unwrap"):
        open_release(release, request, private_keys=other)


@pytest.mark.parametrize(
    "change",
    [
        {"decision_id": "d-2"},
        {"policy_sha256": bytes([1]) * 32},
        {"broker_keyid": "00" * 32},
    ],
)
def test_every_bound_field_is_in_the_hpke_info(change: dict[str, object]) -> None:
    request = _request()
    release = dataclasses.replace(parse_release(_release(request)), **change)  # type: ignore[arg-type]
    with pytest.raises(BadPayloadError, match="does not unwrap"):
        open_release(release, request, private_keys=PRIVATE)


def test_model_and_key_ids_must_match_the_request() -> None:
    request = _request()
    release = dataclasses.replace(parse_release(_release(request)), model_id="other")
    with pytest.raises(BadPayloadError, match="is for model 'other'"):
        open_release(release, request, private_keys=PRIVATE)


def test_broker_signature_is_checked() -> None:
    release = parse_release(_release(_request()))
    with pytest.raises(SignatureError, match="signed by broker"):
        verify_broker_signature(release, Ed25519PrivateKey.generate().public_key())
    forged = dataclasses.replace(release, decision_id="d-9")
    with pytest.raises(SignatureError, match="does not verify"):
        verify_broker_signature(forged, BROKER.public_key())


def test_denial_round_trip_and_signature() -> None:
    denial = deny(
        _request().digest(),
        decision_id="d-3",
        reason="image-not-allowed",
        message="the workload's image is not among the model's",
        policy_sha256=bytes(32),
        broker_key=BROKER,
    )
    parsed = parse_denial(canonical_json(denial.to_json()))
    assert parsed == denial
    verify_broker_signature(parsed, BROKER.public_key())


def test_evidence_nonce_binds_every_request_field() -> None:
    base = _request()
    nonces = {base.evidence_nonce()}
    for change in (
        {"model_id": "m2"},
        {"key_id": "k2"},
        {"tenant": "t2"},
        {"nonce": os.urandom(32)},
        {"embassy_keyid": embassy_keyid(OTHER.public_json())},
    ):
        nonces.add(_request(**change).evidence_nonce())
    assert len(nonces) == 6
    assert base.evidence_nonce() != base.digest()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model_id": ""}, "model_id"),
        ({"model_id": "../etc"}, "model_id"),
        ({"tenant": "a b"}, "tenant"),
        ({"operation": "export"}, "operation"),
        ({"nonce": b"short"}, "nonce"),
        ({"embassy_keyid": "xyz"}, "embassy_keyid"),
    ],
)
def test_key_requests_are_strict(changes: dict[str, object], message: str) -> None:
    with pytest.raises(WireFormatError, match=message):
        _request(**changes)


def test_release_request_round_trip() -> None:
    request = _request()
    doc = ReleaseRequest(request, canonical_json({"v": 2}), canonical_json({"v": 1}))
    parsed = parse_release_request(canonical_json(doc.to_json()))
    assert parsed == doc
    assert parse_key_request(request.to_json()) == request
    bad = doc.to_json() | {"extra": 1}
    with pytest.raises(WireFormatError, match="extra"):
        parse_release_request(canonical_json(bad))
