"""The honest and hostile runs behind the result and completeness vectors (scripts/gen_vectors.py).

An embassy with a (fake) workload serves an identity, results and evidence; each hostile
case is made the way an attacker with the host would make it: a session of another
workload, a restart between seal and unseal, a TPM clock past the deadline, a genuine but
tail-truncated log shown as complete. Deterministic: fixed times, session ids from a
counter, a FakeTpm whose clock ticks once per read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embassy.daemon.runtime import Embassy
from embassy.sessions import manager as manager_module
from embassy.sessions.manager import SessionManager, WorkloadIdentity
from embassy.wire.codec import b64encode, canonical_json
from embassy.wire.statement import LIFECYCLE_V1
from tests.fakes import FakeSealedWorkload, FakeTpm, MemorySeal

# start(data_dir, tpm, workload section) -> a started embassy (a restart if data_dir exists)
Start = Callable[[Path, FakeTpm, dict[str, Any]], Embassy]

WORKLOAD = {"name": "answerer", "image": "example/answerer:1"}
OTHER_IMAGE = "sha256:" + "cd" * 32
PAYLOAD = bytes(range(16))
OUTPUT = b'{"answer":42}'
NOW = 1_800_000_000
NONCE_BEFORE = hashlib.sha256(b"user nonce before sending").digest()
NONCE_AFTER = hashlib.sha256(b"user nonce after receiving").digest()
NONCE_COMPLETE = hashlib.sha256(b"auditor nonce, log complete").digest()


@dataclass
class ResultRun:
    identity: bytes = b""
    restarted_identity: bytes = b""
    results: dict[str, bytes] = field(default_factory=dict)
    evidence: dict[str, bytes] = field(default_factory=dict)
    segments: dict[str, bytes] = field(default_factory=dict)


@contextmanager
def _counted_session_ids() -> Iterator[None]:
    """Session ids from a counter instead of the OS: vectors are byte-for-byte stable."""
    real = manager_module.secrets
    counter = iter(range(1, 1 << 16))

    class _Secrets:
        @staticmethod
        def token_bytes(n: int) -> bytes:
            return next(counter).to_bytes(n, "big")

    manager_module.secrets = _Secrets  # type: ignore[assignment]
    try:
        yield
    finally:
        manager_module.secrets = real


def _manager(embassy: Embassy, workload: WorkloadIdentity | None = None) -> SessionManager:
    assert isinstance(embassy.workload, FakeSealedWorkload)
    return SessionManager(
        log=embassy.log,
        seal=MemorySeal(),
        workload=workload or embassy.workload.identity,
        token_key=bytes(32),
        now=lambda: NOW,
    )


def _bundle(embassy: Embassy, seal: bytes, unseal: bytes) -> bytes:
    seq = next(e.seq for e in embassy.log.entries if e.data == seal)
    bundle = {
        "v": 1,
        "type": "embassy-result",
        "output": b64encode(OUTPUT),
        "seal_statement": b64encode(seal),
        "unseal_statement": b64encode(unseal),
        "log": embassy.log_segment(seq)["segment"],
    }
    return canonical_json(bundle)


def _session(embassy: Embassy, m: SessionManager, tpm: FakeTpm, run_ms: int = 5) -> bytes:
    opened = m.open(60, payload_id=PAYLOAD, release=lambda session: None)
    tpm.tick(run_ms)
    unseal = m.close(opened.session, opened.token, hashlib.sha256(OUTPUT).digest())
    return _bundle(embassy, opened.envelope, unseal)


def result_run(tmp: Path, tpm: FakeTpm, start: Start) -> ResultRun:
    out = ResultRun()
    data = tmp / "with-workload"
    with _counted_session_ids():
        e1 = start(data, tpm, WORKLOAD)
        out.identity = canonical_json(e1.identity_document())
        # Honest, with the user's evidence before sending and after receiving.
        out.evidence["before"] = canonical_json(e1.evidence(NONCE_BEFORE))
        out.results["honest"] = _session(e1, _manager(e1), tpm)
        out.evidence["after"] = canonical_json(e1.evidence(NONCE_AFTER))
        # A session of another workload, signed by the same embassy key.
        assert isinstance(e1.workload, FakeSealedWorkload)
        ours = e1.workload.identity
        other = WorkloadIdentity(OTHER_IMAGE, ours.container_id, ours.launch_digest)
        out.results["other-workload"] = _session(e1, _manager(e1, other), tpm)
        # The embassy's wall clock stands still while the TPM's runs 70 s of a 60 s session.
        out.results["past-deadline"] = _session(e1, _manager(e1), tpm, run_ms=70_000)
        # A log fetched, then grown: the earlier segment shown as complete.
        out.segments["earlier"] = canonical_json(e1.log_segment(0))
        out.evidence["complete-at-earlier"] = canonical_json(e1.evidence(NONCE_COMPLETE))
        for n in range(3):
            e1.log.append_statement(LIFECYCLE_V1, [], {"event": "test", "n": n})
        out.evidence["complete-later"] = canonical_json(e1.evidence(NONCE_COMPLETE))
        # A session sealed before a restart (same measurement, same workload), closed after.
        opened = _manager(e1).open(60, payload_id=PAYLOAD, release=lambda session: None)
        e1.log.close()  # a crash: same TPM boot, same data dir
        e2 = start(data, tpm, WORKLOAD)
        out.restarted_identity = canonical_json(e2.identity_document())
        m2 = _manager(e2)
        m2.reconcile()
        unseal = m2.close(opened.session, opened.token, hashlib.sha256(OUTPUT).digest())
        out.results["restart-between"] = _bundle(e2, opened.envelope, unseal)
        e2.log.close()
    json.loads(out.identity)  # canonical JSON, parsed back as a sanity check
    return out
