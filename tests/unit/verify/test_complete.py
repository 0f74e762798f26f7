"""`verify log` proves inclusion up to its last entry and says so; fresh evidence over the
verifier's nonce is what shows a log complete. A genuine but tail-truncated segment (closed
by an earlier checkpoint) presented as complete is refused with its own reason."""

from __future__ import annotations

import argparse
import hashlib

import pytest

from embassy.daemon.runtime import Embassy
from embassy.errors import (
    ConfigError,
    FreshnessError,
    IncompleteLogError,
    LogIntegrityError,
)
from embassy.verify import VerifiedIdentity, Verifier
from embassy.verify.policy import TrustPolicy
from embassy.verify.report import run
from embassy.wire.codec import canonical_json
from embassy.wire.statement import LIFECYCLE_V1

NONCE = hashlib.sha256(b"verifier's nonce").digest()


@pytest.fixture
def identity(embassy: Embassy, policy: TrustPolicy) -> VerifiedIdentity:
    return Verifier(policy).identity(canonical_json(embassy.identity_document()))


def _append(embassy: Embassy, count: int) -> None:
    for n in range(count):
        embassy.log.append_statement(LIFECYCLE_V1, [], {"event": "test", "n": n})


def _files(embassy: Embassy, **extra: bytes) -> dict[str, bytes]:
    return {"identity": canonical_json(embassy.identity_document()), **extra}


def test_a_log_says_what_it_proved(
    embassy: Embassy, identity: VerifiedIdentity, policy: TrustPolicy
) -> None:
    _append(embassy, 2)
    segment = canonical_json(embassy.log_segment(0))
    log = Verifier(policy).log(identity, segment)
    assert log.complete_at is None
    assert "complete" not in log.checks
    last = embassy.log.entries[-1].seq
    assert log.last_seq == last
    facts = "\n".join(log.facts())
    assert f"proved: entries up to seq {last}, TPM clock {log.head_clock.clock} ms (boot 1)" in (
        facts
    )
    assert "entries after that are not proven absent" in facts


def test_fresh_evidence_at_the_head_shows_the_log_complete(
    embassy: Embassy, identity: VerifiedIdentity, policy: TrustPolicy
) -> None:
    _append(embassy, 2)
    verifier = Verifier(policy)
    segment = canonical_json(embassy.log_segment(0))
    fresh = verifier.evidence(identity, canonical_json(embassy.evidence(NONCE)), NONCE)
    log = verifier.log(identity, segment, complete_with=fresh)
    assert "complete" in log.checks
    assert f"complete: seq {log.last_seq} was the log's head" in "\n".join(log.facts())


def test_a_truncated_segment_presented_as_complete_is_refused(
    embassy: Embassy, identity: VerifiedIdentity, policy: TrustPolicy
) -> None:
    verifier = Verifier(policy)
    _append(embassy, 2)
    earlier = canonical_json(embassy.log_segment(0))  # genuine, closed by a checkpoint
    cut = verifier.log(identity, earlier).last_seq
    _append(embassy, 3)  # what the host hides
    assert verifier.log(identity, earlier).last_seq == cut  # inclusion still verifies
    fresh = verifier.evidence(identity, canonical_json(embassy.evidence(NONCE)), NONCE)
    with pytest.raises(IncompleteLogError, match=f"the log has entries after seq {cut}") as info:
        verifier.log(identity, earlier, complete_with=fresh)
    assert info.value.code == "log-incomplete"
    assert f"head at seq {cut + 3}" in info.value.message


def test_evidence_older_than_the_log_does_not_show_it_complete(
    embassy: Embassy, identity: VerifiedIdentity, policy: TrustPolicy
) -> None:
    verifier = Verifier(policy)
    old = verifier.evidence(identity, canonical_json(embassy.evidence(NONCE)), NONCE)
    _append(embassy, 1)
    segment = canonical_json(embassy.log_segment(0))
    with pytest.raises(IncompleteLogError, match="older than the log"):
        verifier.log(identity, segment, complete_with=old)


def test_evidence_over_another_nonce_is_stale(
    embassy: Embassy, identity: VerifiedIdentity, policy: TrustPolicy
) -> None:
    evidence = canonical_json(embassy.evidence(NONCE))
    with pytest.raises(FreshnessError):
        Verifier(policy).evidence(identity, evidence, hashlib.sha256(b"another").digest())


def test_no_segment_is_refused(identity: VerifiedIdentity, policy: TrustPolicy) -> None:
    with pytest.raises(LogIntegrityError, match="no log segment"):
        Verifier(policy).log(identity)


# -- the CLI's layer -------------------------------------------------------------------------


def test_verify_log_complete_through_the_report(embassy: Embassy, policy: TrustPolicy) -> None:
    _append(embassy, 2)
    earlier = canonical_json(embassy.log_segment(0))
    files = _files(embassy, seg=earlier, ev=canonical_json(embassy.evidence(NONCE)))
    args = argparse.Namespace(
        identity="identity", file=["seg"], complete=True, evidence="ev", nonce=NONCE.hex()
    )
    report = run("log", args, policy, files.__getitem__)
    assert "complete" in report["checks"]
    _append(embassy, 1)
    files["ev"] = canonical_json(embassy.evidence(NONCE))
    with pytest.raises(IncompleteLogError):
        run("log", args, policy, files.__getitem__)
    plain = argparse.Namespace(identity="identity", file=["seg"])
    assert any(
        "not proven absent" in f for f in run("log", plain, policy, files.__getitem__)["facts"]
    )
    missing = argparse.Namespace(identity="identity", file=["seg"], complete=True)
    with pytest.raises(ConfigError, match="--complete needs --evidence"):
        run("log", missing, policy, files.__getitem__)
