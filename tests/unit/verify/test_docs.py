"""The example in docs/verifying.md runs, against an in-process embassy with a workload."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from embassy.daemon.runtime import Embassy
from embassy.sessions.manager import SessionManager
from embassy.verify.policy import TrustPolicy
from embassy.wire.codec import b64encode, canonical_json
from tests.fakes import MemorySeal
from tests.unit.conftest import MEASUREMENT
from tests.unit.verify.conftest import sealed_workload

DOC = Path(__file__).resolve().parents[3] / "docs" / "verifying.md"
OUTPUT = b"the answer"
PAYLOAD = bytes(range(16))


def _example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    assert len(blocks) == 1
    return blocks[0]


def test_the_documented_example_runs(workload_embassy: Embassy, policy: TrustPolicy) -> None:
    embassy = workload_embassy
    workload = sealed_workload(embassy).identity
    nonce_before, nonce_after = (hashlib.sha256(n).digest() for n in (b"b", b"a"))
    evidence_before = canonical_json(embassy.evidence(nonce_before))
    m = SessionManager(log=embassy.log, seal=MemorySeal(), workload=workload, token_key=bytes(32))
    opened = m.open(60, payload_id=PAYLOAD, release=lambda session: None)
    unseal = m.close(opened.session, opened.token, hashlib.sha256(OUTPUT).digest())
    seal_seq = next(e.seq for e in embassy.log.entries if e.data == opened.envelope)
    segment = embassy.log_segment(seal_seq)
    bundle = {
        "v": 1,
        "type": "embassy-result",
        "output": b64encode(OUTPUT),
        "seal_statement": b64encode(opened.envelope),
        "unseal_statement": b64encode(unseal),
        "log": segment["segment"],
    }
    pinned_in_the_example = {
        "ek_cas",
        "expected_measurement",
        "expected_image_digest",
        "expected_launch_digest",
    }
    insecure = {
        k: getattr(policy, k) for k in policy.__dataclass_fields__ if k not in pinned_in_the_example
    }
    printed: list[Any] = []
    namespace: dict[str, Any] = {
        "ek_cas": policy.ek_cas,
        "measurement": MEASUREMENT.digest,
        "image_digest": workload.image_digest,
        "launch_digest": workload.launch_digest,
        "insecure_for_this_example": insecure,
        "identity_document": canonical_json(embassy.identity_document()),
        "evidence_before": evidence_before,
        "nonce_before": nonce_before,
        "result_bundle": json.dumps(bundle).encode(),
        "payload_id": PAYLOAD,
        "log_segment": canonical_json(segment),
        "evidence_after": canonical_json(embassy.evidence(nonce_after)),
        "nonce_after": nonce_after,
        "expected_output": OUTPUT,
        "print": lambda *args: printed.append(args),
    }
    exec(compile(_example(), str(DOC), "exec"), namespace)
    facts = "\n".join(str(p) for p in printed)
    assert "the whole session lies between your two nonces" in facts
    assert "complete: seq" in facts
    assert namespace["result"].output == OUTPUT
