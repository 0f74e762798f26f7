"""`embassy verify result` on results made by the real runtime on FakeTpm."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest

from embassy.attest.ek import load_pem_bundle
from embassy.daemon.runtime import Embassy
from embassy.errors import EmbassyError, LogIntegrityError, ResultMismatchError
from embassy.sessions.manager import SessionManager, WorkloadIdentity
from embassy.verify.identity import VerifiedIdentity, verify_identity_document
from embassy.verify.policy import TrustPolicy
from embassy.verify.result import verify_result
from embassy.wire.codec import canonical_json
from tests.fakes import FakeTpm, MemorySeal
from tests.unit.conftest import MEASUREMENT

PAYLOAD = bytes(range(16))
OUTPUT = b'{"answer":42}'


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture
def policy(tpm: FakeTpm) -> TrustPolicy:
    import datetime

    return TrustPolicy(
        ek_cas=tuple(load_pem_bundle(tpm.ca_pem())),
        expected_measurement=MEASUREMENT.digest,
        allow_software_tpm=True,
        at=datetime.datetime(2026, 6, 1, tzinfo=datetime.UTC),
    )


@pytest.fixture
def identity(embassy: Embassy, policy: TrustPolicy) -> VerifiedIdentity:
    return verify_identity_document(canonical_json(embassy.identity_document()), policy)


def _manager(embassy: Embassy) -> SessionManager:
    return SessionManager(
        log=embassy.log,
        seal=MemorySeal(),
        workload=WorkloadIdentity("sha256:" + "ab" * 32, "c0ffee", bytes(32)),
        token_key=bytes(32),
    )


def _bundle(
    embassy: Embassy, m: SessionManager, output: bytes = OUTPUT, committed: bytes = OUTPUT
) -> dict[str, object]:
    opened = m.open(60, payload_id=PAYLOAD, release=lambda session: None)
    seal_seq = next(e.seq for e in reversed(embassy.log.entries) if e.data == opened.envelope)
    unseal = m.close(opened.session, opened.token, hashlib.sha256(committed).digest())
    return {
        "v": 1,
        "type": "embassy-result",
        "output": _b64(output),
        "seal_statement": _b64(opened.envelope),
        "unseal_statement": _b64(unseal),
        "log": embassy.log_segment(seal_seq)["segment"],
    }


def _check(
    bundle: dict[str, object],
    identity: VerifiedIdentity,
    policy: TrustPolicy,
    payload: bytes | None = PAYLOAD,
) -> object:
    return verify_result(json.dumps(bundle).encode(), identity, policy, expected_payload_id=payload)


def test_an_honest_result_verifies(
    embassy: Embassy, identity: VerifiedIdentity, policy: TrustPolicy
) -> None:
    result = _check(_bundle(embassy, _manager(embassy)), identity, policy)
    assert "output-digest" in result.checks  # type: ignore[attr-defined]
    assert result.payload_id == PAYLOAD.hex()  # type: ignore[attr-defined]


def test_a_tampered_output_is_refused(
    embassy: Embassy, identity: VerifiedIdentity, policy: TrustPolicy
) -> None:
    bundle = _bundle(embassy, _manager(embassy), output=b'{"answer":43}')
    with pytest.raises(ResultMismatchError, match="not the one the workload committed"):
        _check(bundle, identity, policy)


def test_a_swapped_statement_is_refused(
    embassy: Embassy, identity: VerifiedIdentity, policy: TrustPolicy
) -> None:
    m = _manager(embassy)
    first, second = _bundle(embassy, m), _bundle(embassy, m)
    first["unseal_statement"] = second["unseal_statement"]
    first["log"] = embassy.log_segment(0)["segment"]
    with pytest.raises(ResultMismatchError, match="different sessions"):
        _check(first, identity, policy)


def test_the_wrong_payload_and_a_statement_outside_the_log(
    embassy: Embassy, identity: VerifiedIdentity, policy: TrustPolicy
) -> None:
    m = _manager(embassy)
    bundle = _bundle(embassy, m)
    with pytest.raises(ResultMismatchError, match="not yours"):
        _check(bundle, identity, policy, payload=b"\xff" * 16)
    later = _bundle(embassy, m)
    bundle["seal_statement"] = later["seal_statement"]  # not in the first bundle's segment
    with pytest.raises(LogIntegrityError, match="not in the verified log segment"):
        _check(bundle, identity, policy)


def test_a_malformed_bundle(identity: VerifiedIdentity, policy: TrustPolicy) -> None:
    with pytest.raises(EmbassyError) as info:
        verify_result(b'{"v":1,"type":"embassy-result","v":2}', identity, policy)
    assert info.value.code == "malformed"
