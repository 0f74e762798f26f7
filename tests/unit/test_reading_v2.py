"""Meter readings of version 2: the authority's model digests and calibrations travel with
the meters, version 1 readings still open, and a malformed version 2 is refused."""

from __future__ import annotations

import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from embassy.errors import WireFormatError
from embassy.metering import reading as reading_module
from embassy.metering.reading import (
    Meter,
    ModelCalibration,
    Reading,
    open_reading,
    reading_predicate,
    reply_public_bytes,
)
from embassy.wire.codec import b64encode, canonical_json
from embassy.wire.dsse import keyid, sign_envelope
from embassy.wire.statement import METER_READING_V1, Header, Statement, Subject
from tests.fakes import FakeTpm

AISI = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
EMBASSY = Ed25519PrivateKey.from_private_bytes(bytes(range(2, 34)))
EMBASSY_ID = keyid(EMBASSY.public_key())
INSTRUCTION = bytes(range(32))
MODEL = ModelCalibration("ab" * 32, 384, "cd" * 32, (("bio", 412_000), ("cyber", -3)))
READING = Reading(
    "aisi",
    INSTRUCTION,
    "embassy-centroid-window-v2",
    8,
    (Meter("bio", 12, 1, 7), Meter("cyber", 0, 0, None)),
    models=(MODEL,),
)


def _sign(subjects: list[Subject], body: dict[str, Any]) -> bytes:
    tpm = FakeTpm()
    header = Header(seq=9, prev=bytes(32), clock=tpm.clock(), tpm_mode=tpm.mode)
    return sign_envelope(
        Statement(METER_READING_V1, tuple(subjects), header, body).encode(), EMBASSY
    )


def _open(data: bytes) -> Reading:
    return open_reading(
        data,
        embassy_key=EMBASSY.public_key(),
        embassy_keyid=EMBASSY_ID,
        signing_key=AISI,
        authority="aisi",
        instruction_sha256=INSTRUCTION,
    )


def _with_plaintext(obj: dict[str, Any]) -> bytes:
    """A reading statement whose encrypted JSON is ``obj`` as given (a hostile embassy)."""
    recipient = reading_module.reply_key(AISI).public_key()
    info = reading_module._info("aisi", EMBASSY_ID, INSTRUCTION)
    ciphertext = reading_module._HPKE.encrypt(
        reading_module._pad(canonical_json(obj)), recipient, info=info
    )
    body = {
        "authority": "aisi",
        "instruction_sha256": INSTRUCTION.hex(),
        "suite": "x25519",
        "ciphertext": b64encode(ciphertext),
    }
    return _sign([Subject("instruction", INSTRUCTION)], body)


def test_a_v2_reading_carries_models_and_calibrations() -> None:
    subjects, body = reading_predicate(READING, reply_public_bytes(AISI), EMBASSY_ID)
    got = _open(_sign(subjects, body))
    assert got.version == 2
    assert got.models == (MODEL,)
    assert got.meters == READING.meters
    assert got.formula == "embassy-centroid-window-v2"


def test_a_v1_reading_still_opens() -> None:
    old = READING.to_json()
    old["v"] = 1
    del old["models"]
    got = _open(_with_plaintext(old))
    assert got.version == 1
    assert got.models == ()
    assert got.meters == READING.meters


def test_a_v1_reading_cannot_be_written_with_models() -> None:
    with pytest.raises(ValueError, match="version 1 carries no models"):
        Reading("aisi", INSTRUCTION, "f", 1, (), models=(MODEL,), version=1).to_json()


def _mutated(change: str) -> dict[str, Any]:
    obj = json.loads(canonical_json(READING.to_json()))
    model = obj["models"][0]
    if change == "v1-with-models":
        obj["v"] = 1
    elif change == "v2-without-models":
        del obj["models"]
    elif change == "v3":
        obj["v"] = 3
    elif change == "short-digest":
        model["model_sha256"] = "cd" * 31
    elif change == "upper-hex":
        model["tensor_sha256"] = "AB" * 32
    elif change == "unsorted":
        model["calibration"].reverse()
    elif change == "duplicate":
        model["calibration"].append(model["calibration"][-1])
    elif change == "threshold-out-of-range":
        model["calibration"][0]["threshold"] = 1_000_001
    elif change == "threshold-bool":
        model["calibration"][0]["threshold"] = True
    elif change == "dim-zero":
        model["dim"] = 0
    elif change == "extra-field":
        model["note"] = "x"
    else:  # pragma: no cover - a typo in the parameter list
        raise AssertionError(change)
    return obj


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("v1-with-models", "unknown field"),
        ("v2-without-models", "missing field 'models'"),
        ("v3", "unsupported version 3"),
        ("short-digest", "model_sha256: 64 lowercase hex"),
        ("upper-hex", "tensor_sha256: 64 lowercase hex"),
        ("unsorted", "sorted and unique"),
        ("duplicate", "sorted and unique"),
        ("threshold-out-of-range", "out of"),
        ("threshold-bool", "expected int, got bool"),
        ("dim-zero", "dim: must be positive"),
        ("extra-field", "unknown field"),
    ],
)
def test_a_malformed_v2_reading_is_refused(change: str, message: str) -> None:
    with pytest.raises(WireFormatError, match=message):
        _open(_with_plaintext(_mutated(change)))
