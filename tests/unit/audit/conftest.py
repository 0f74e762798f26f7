"""A rich log from an in-process embassy with a (fake) workload: sessions that unseal, abort
and stay open, key releases and a denial, a metering batch, rejections, a job, a meter
reading for an authority; and the pinned vectors with their trust settings."""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from embassy.daemon.runtime import Embassy
from embassy.metering.reading import Meter, Reading, reading_predicate, reply_public_bytes
from embassy.sessions.manager import SessionManager
from embassy.verify.api import Verifier
from embassy.verify.identity import VerifiedIdentity
from embassy.verify.logs import VerifiedLog
from embassy.verify.policy import TrustPolicy
from embassy.wire.codec import canonical_json
from embassy.wire.dsse import keyid
from embassy.wire.statement import (
    ACTIVATION_REJECTED_V2,
    INSTRUCTION_REFUSED_V2,
    JOB_DESTROYED_V1,
    JOB_STARTED_V1,
    METER_BATCH_V1,
    METER_READING_V1,
    WEIGHTS_KEY_DENIED_V1,
    WEIGHTS_KEY_RELEASED_V1,
    Subject,
)
from tests.fakes import FakeTpm, MemorySeal
from tests.unit.conftest import EmbassyFactory
from tests.unit.test_vectors import VECTOR_DIR, _bytes
from tests.unit.test_vectors import _policy as vector_policy
from tests.unit.verify.conftest import sealed_workload, start_with_workload

# What a workload could put in a field it chooses (a tenant, a model id through an older
# daemon, a lifecycle event): the report must show it as text.
HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)></style>"\'&'
AUTHORITY = "auditor-authority"
SESSION_SECONDS = 60


@dataclass
class RichLog:
    embassy: Embassy
    verifier: Verifier
    identity: VerifiedIdentity
    identity_doc: bytes
    segment: bytes
    authority_key: Ed25519PrivateKey
    reading_envelope: bytes
    sessions: dict[str, str]  # role -> session id (hex)

    def log(self) -> VerifiedLog:
        return self.verifier.log(self.identity, self.segment)


def _subject(name: str) -> list[Subject]:
    return [Subject(name, hashlib.sha256(name.encode()).digest())]


def _workload_json(embassy: Embassy) -> dict[str, Any]:
    return dict(sealed_workload(embassy).identity.to_json())


def _fill(embassy: Embassy, key: Ed25519PrivateKey) -> tuple[dict[str, str], bytes]:
    log = embassy.log
    workload = _workload_json(embassy)
    manager = SessionManager(
        log=log,
        seal=MemorySeal(),
        workload=sealed_workload(embassy).identity,
        token_key=bytes(32),
    )
    done = manager.open(SESSION_SECONDS, payload_id=bytes(16), release=lambda s: None)
    manager.close(done.session, done.token, hashlib.sha256(b"out").digest())
    request = {
        "model_id": "minilm",
        "key_id": "k1",
        "tenant": HOSTILE,
        "operation": "decrypt-for-load",
        "request_sha256": "aa" * 32,
        "broker_keyid": "bb" * 32,
        "workload": workload,
        "wall_time_unix": 1_780_000_000,
    }
    log.append_statement(
        WEIGHTS_KEY_RELEASED_V1,
        _subject("weights-request:minilm"),
        {**request, "decision_id": "d-1", "policy_sha256": "cc" * 32, "suite": "x25519"},
    )
    log.append_statement(
        WEIGHTS_KEY_DENIED_V1,
        _subject("weights-request:other"),
        {
            **request,
            "model_id": "other",
            "decision_id": "d-2",
            "reason": "policy-denied",
            "policy_sha256": None,
        },
    )
    metered = manager.open(SESSION_SECONDS, payload_id=bytes([1]) * 16, release=lambda s: None)
    for files in (1, 2):
        log.append_statement(
            METER_BATCH_V1,
            _subject(f"activation:{metered.session.hex()}:{files}"),
            {
                "batches": [f"b{files}"],
                "sessions": [
                    {
                        "session": metered.session.hex(),
                        "seq": [files, files],
                        "files": 1,
                        "signature_writes": [],
                        "meter_updates": [
                            {
                                "seq": files,
                                "authority": AUTHORITY,
                                "capabilities": ["cap-a", "cap-b"],
                                "formula": "f",
                                "model_sha256": "dd" * 32,
                                "tensor_sha256": "ee" * 32,
                            }
                        ],
                    }
                ],
            },
        )
    log.append_statement(
        ACTIVATION_REJECTED_V2,
        _subject(f"session:{metered.session.hex()}"),
        {
            "session": metered.session.hex(),
            "counts": {"activation-corrupt": 2},
            "files": 2,
            "bytes": 300,
            "summary": 1,
            "final": False,
        },
    )
    log.append_statement(
        INSTRUCTION_REFUSED_V2,
        _subject("instruction:0"),
        {
            "session": metered.session.hex(),
            "refused": [{"code": "instruction-expired", "instruction_sha256": "ff" * 32}],
            "session_continues_unmetered": True,
        },
    )
    manager.abort_all("intrusion")
    reading = Reading(
        authority=AUTHORITY,
        instruction_sha256=hashlib.sha256(b"read").digest(),
        formula="embassy-centroid-window-v2",
        as_of_seq=log.head.seq if log.head else 0,
        meters=(Meter("cap-a", 1_500_000, 2, None), Meter("cap-b", 250_000, 2, None)),
        models=(),
    )
    subjects, body = reading_predicate(
        reading, reply_public_bytes(key), keyid(embassy.keys.signing.public_key())
    )
    appended = log.append_statement(METER_READING_V1, subjects, body)
    job = "0123456789abcdef"
    job_fields = {
        "job": job,
        "payload_id": "22" * 16,
        "container_id": "c" * 64,
        "image_digest": "sha256:" + "ab" * 32,
        "runtime": "runc",
        "network": "none",
    }
    log.append_statement(
        JOB_STARTED_V1,
        _subject(f"job:{job}"),
        {**job_fields, "launch_digest": "12" * 32, "wall_time_unix": 1_780_000_100},
    )
    log.append_statement(
        JOB_DESTROYED_V1,
        _subject(f"job:{job}"),
        {
            **job_fields,
            "output_sha256": "34" * 32,
            "checked_gone": {"container": "inspect-404", "spool": "absent"},
            "wall_time_unix": 1_780_000_101,
        },
    )
    still_open = manager.open(SESSION_SECONDS, release=lambda s: None)
    roles = {
        "unsealed": done.session.hex(),
        "aborted": metered.session.hex(),
        "open": still_open.session.hex(),
    }
    return roles, appended.envelope


@pytest.fixture
def rich(make_embassy: EmbassyFactory, tpm: FakeTpm, policy: TrustPolicy) -> RichLog:
    return make_rich(make_embassy, tpm, policy)


def make_rich(make_embassy: EmbassyFactory, tpm: FakeTpm, policy: TrustPolicy) -> RichLog:
    """The rich log of an embassy ``make_embassy`` starts on ``tpm``, verified under
    ``policy``."""
    embassy = start_with_workload(make_embassy, tpm)
    key = Ed25519PrivateKey.generate()
    roles, reading = _fill(embassy, key)
    verifier = Verifier(policy)
    doc = canonical_json(embassy.identity_document())
    return RichLog(
        embassy=embassy,
        verifier=verifier,
        identity=verifier.identity(doc),
        identity_doc=doc,
        segment=canonical_json(embassy.log_segment(0)),
        authority_key=key,
        reading_envelope=reading,
        sessions=roles,
    )


@dataclass
class Vector:
    verifier: Verifier
    identity: VerifiedIdentity
    segments: list[bytes]
    inputs: dict[str, Any]
    spec: dict[str, Any]


def load_vector(name: str) -> Vector:
    """A pinned vector with its own trust settings, as tests/unit/test_vectors.py runs it."""
    vector = json.loads((VECTOR_DIR / f"{name}.json").read_text())
    verifier = Verifier(vector_policy(vector["policy"]))
    inputs = vector["input"]
    identity = verifier.identity(_bytes(inputs, "identity_b64"))
    segments = [base64.b64decode(s) for s in inputs["segments_b64"]]
    return Vector(verifier, identity, segments, inputs, vector["policy"])


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)
