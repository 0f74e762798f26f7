"""The broker's decisions, from the attacker's side: each denial has its own reason code and
a logged decision; a release opens only for the embassy and request it answers."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from embassy.attest.ek import load_pem_bundle
from embassy.broker.decision_log import parse_entry, verify_decision_log
from embassy.broker.facts import session_open
from embassy.broker.release import Outcome, decide
from embassy.errors import BadPayloadError, StorageError
from embassy.weights.release import (
    Denial,
    Release,
    ReleaseRequest,
    open_release,
    verify_broker_signature,
)
from embassy.wire.codec import canonical_json
from tests.fakes import FakeTpm
from tests.unit.broker.broker_fixtures import (
    KEY_ID,
    MODEL,
    WEIGHTS_KEY,
    BrokerEnv,
    broker_data,
    env,
    private_keys,
    release_request,
    session_manager,
)

__all__ = ["env"]


def _logged(env: BrokerEnv, outcome: Outcome) -> dict[str, Any]:
    """The outcome's decision, read back from the store, after the whole log verifies."""
    assert env.store is not None
    entries = env.store.decisions(0)
    broker = env.brokers[-1]
    verify_decision_log(entries, broker.signing_key.public_key())
    assert outcome.logged is not None
    assert entries[-1].seq == outcome.logged.seq
    return parse_entry(entries[-1].entry).decision


def _denied(env: BrokerEnv, outcome: Outcome, reason: str) -> dict[str, Any]:
    assert isinstance(outcome.answer, Denial), outcome.answer
    assert outcome.answer.reason == reason, outcome.answer.message
    verify_broker_signature(outcome.answer, env.brokers[-1].signing_key.public_key())
    decision = _logged(env, outcome)
    assert decision["decision"] == "deny"
    assert decision["reason"] == reason
    assert decision["decision_id"] == outcome.answer.decision_id
    return decision


def test_release_granted_opens_only_for_its_embassy(env: BrokerEnv) -> None:
    broker = env.broker(broker_data(require_sealed=False))
    a = env.embassy("a")
    request = release_request(a, broker)
    outcome = decide(broker, request)
    assert isinstance(outcome.answer, Release), outcome.answer
    assert outcome.answer.suite == "mlkem768-x25519"  # the hybrid suite, when offered
    verify_broker_signature(outcome.answer, broker.signing_key.public_key())
    assert open_release(outcome.answer, request.request, private_keys=private_keys(a)) == (
        WEIGHTS_KEY
    )
    decision = _logged(env, outcome)
    assert decision["decision"] == "allow"
    assert decision["reason"] is None
    assert decision["policy_sha256"] == broker.policy.sha256.hex()
    assert outcome.policy_input is not None
    assert decision["input_sha256"] == (
        hashlib.sha256(canonical_json(outcome.policy_input)).hexdigest()
    )
    assert decision["request_sha256"] == request.request.digest().hex()
    # The policy input is what the evidence proved, not what the request said.
    facts = outcome.policy_input
    assert facts["attestation"]["ak_certified"] is True
    assert facts["attestation"]["tpm_kind"] == "software"
    assert set(facts["attestation"]["boot_pcrs"]) == {"4", "11", "12"}
    assert facts["workload"]["name"] == "answerer"
    assert facts["sealed"] is False
    # Embassy B holds other keys: the same release does not open there.
    b = env.embassy("b", FakeTpm(b"b"), master=bytes(range(1, 33)))
    with pytest.raises(BadPayloadError, match="does not unwrap"):
        open_release(outcome.answer, request.request, private_keys=private_keys(b))


def test_image_not_allowed(env: BrokerEnv) -> None:
    data = broker_data(require_sealed=False)
    data["broker"]["models"][MODEL]["image_digests"] = ["sha256:" + "cd" * 32]
    broker = env.broker(data)
    decision = _denied(
        env, decide(broker, release_request(env.embassy(), broker)), "image-not-allowed"
    )
    assert decision["input_sha256"] is not None
    assert decision["embassy_keyid"] is not None


def test_measurement_not_allowed(env: BrokerEnv) -> None:
    data = broker_data(require_sealed=False)
    data["broker"]["models"][MODEL]["measurements"] = ["00" * 32]
    broker = env.broker(data)
    _denied(env, decide(broker, release_request(env.embassy(), broker)), "measurement-not-allowed")


def test_model_not_for_tenant(env: BrokerEnv) -> None:
    broker = env.broker(broker_data(require_sealed=False))
    outcome = decide(broker, release_request(env.embassy(), broker, tenant="globex"))
    decision = _denied(env, outcome, "model-not-for-tenant")
    assert decision["tenant"] == "globex"


def test_not_sealed_then_sealed(env: BrokerEnv) -> None:
    broker = env.broker(broker_data(require_sealed=True))
    embassy = env.embassy()
    _denied(env, decide(broker, release_request(embassy, broker)), "not-sealed")
    sessions = session_manager(embassy)
    opened = sessions.open(60, release=lambda session: None)
    outcome = decide(broker, release_request(embassy, broker))
    assert isinstance(outcome.answer, Release), outcome.answer
    assert outcome.policy_input is not None
    assert outcome.policy_input["sealed"] is True
    sessions.close(opened.session, opened.token, bytes(32))
    _denied(env, decide(broker, release_request(embassy, broker)), "not-sealed")


def test_unknown_model(env: BrokerEnv) -> None:
    broker = env.broker(broker_data(require_sealed=False))
    outcome = decide(broker, release_request(env.embassy(), broker, key_id="k2"))
    decision = _denied(env, outcome, "unknown-model")
    assert decision["key_id"] == "k2"


def test_replayed_request_refused(env: BrokerEnv) -> None:
    broker = env.broker(broker_data(require_sealed=False))
    request = release_request(env.embassy(), broker)
    assert decide(broker, request).allowed
    decision = _denied(env, decide(broker, request), "nonce-replayed")
    assert decision["input_sha256"] is None  # refused before anything was verified


def test_stale_nonce_refused(env: BrokerEnv) -> None:
    broker = env.broker(broker_data(require_sealed=False))
    request = release_request(env.embassy(), broker)
    env.clock.now += broker.nonce_ttl_s + 1
    _denied(env, decide(broker, request), "nonce-expired")


def test_unknown_nonce_refused(env: BrokerEnv) -> None:
    broker = env.broker(broker_data(require_sealed=False))
    _denied(
        env,
        decide(broker, release_request(env.embassy(), broker, nonce=bytes(32))),
        "nonce-unknown",
    )


def test_evidence_for_another_request_refused(env: BrokerEnv) -> None:
    """Evidence is over the request's own evidence nonce: old evidence does not answer it."""
    broker = env.broker(broker_data(require_sealed=False))
    outcome = decide(broker, release_request(env.embassy(), broker, evidence_nonce=bytes(32)))
    assert isinstance(outcome.answer, Denial)
    assert "stale-nonce" in outcome.answer.message
    _denied(env, outcome, "evidence-invalid")


def test_request_naming_another_embassy_refused(env: BrokerEnv) -> None:
    tpm_b = FakeTpm(b"b")
    broker = env.broker(
        broker_data(require_sealed=False),
        software_ek_cas=(*load_pem_bundle(env.tpm.ca_pem()), *load_pem_bundle(tpm_b.ca_pem())),
    )
    a, b = env.embassy("a"), env.embassy("b", tpm_b, master=bytes(range(1, 33)))
    request = release_request(a, broker)
    # A's key request and evidence, with B's identity document in place of A's.
    swapped = ReleaseRequest(
        request.request, canonical_json(b.identity_document()), request.evidence
    )
    outcome = decide(broker, swapped)
    assert isinstance(outcome.answer, Denial)
    assert "embassy_keyid" in outcome.answer.message
    _denied(env, outcome, "evidence-invalid")


def test_tampered_identity_refused(env: BrokerEnv) -> None:
    broker = env.broker(broker_data(require_sealed=False))
    embassy = env.embassy()
    identity = embassy.identity_document()
    identity["ak_certificates"] = []  # an uncertified AK
    outcome = decide(broker, release_request(embassy, broker, identity=identity))
    assert isinstance(outcome.answer, Denial)
    assert "ak-not-certified" in outcome.answer.message
    _denied(env, outcome, "evidence-invalid")


def test_evidence_from_a_later_run_refused(env: BrokerEnv) -> None:
    """The keys outlive a restart: an old identity with a new run's evidence is refused."""
    broker = env.broker(broker_data(require_sealed=False))
    embassy = env.embassy()
    old_identity = embassy.identity_document()
    env.make_embassy.crash(embassy)
    restarted = env.embassy()
    outcome = decide(broker, release_request(restarted, broker, identity=old_identity))
    assert isinstance(outcome.answer, Denial)
    assert "embassy-restarted" in outcome.answer.message
    _denied(env, outcome, "evidence-invalid")


def test_policy_error_denies(env: BrokerEnv) -> None:
    conflicting = "package embassy.weights\nimport rego.v1\nallow := true\nallow := false if true\n"
    broker = env.broker({}, policy_text=conflicting)
    decision = _denied(env, decide(broker, release_request(env.embassy(), broker)), "policy-error")
    assert decision["policy_sha256"] == broker.policy.sha256.hex()


def test_policy_undefined_denies(env: BrokerEnv) -> None:
    broker = env.broker({}, policy_text="package embassy.weights\nimport rego.v1\nx := 1\n")
    _denied(env, decide(broker, release_request(env.embassy(), broker)), "policy-undefined")


class _BrokenStore:
    """Nonces work; the decision log cannot be written."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def issue_nonce(self, nonce: bytes, expires_unix: int) -> None:
        self._inner.issue_nonce(nonce, expires_unix)

    def take_nonce(self, nonce: bytes, now_unix: int) -> Any:
        return self._inner.take_nonce(nonce, now_unix)

    def append_decision(self, decision: Any, sign: Any) -> Any:
        raise StorageError("disk full")

    def decisions(self, from_seq: int = 0) -> list[Any]:
        return []

    def close(self) -> None:
        pass


def test_unloggable_release_is_denied(env: BrokerEnv, tmp_path: Any) -> None:
    from embassy.broker.store import SqliteStore

    inner = SqliteStore(tmp_path / "other.db")
    try:
        broker = env.broker(broker_data(require_sealed=False), store=_BrokenStore(inner))
        outcome = decide(broker, release_request(env.embassy(), broker))
    finally:
        inner.close()
    assert isinstance(outcome.answer, Denial)
    assert outcome.answer.reason == "log-failed"
    assert outcome.logged is None


def test_session_open_is_the_last_seal_unanswered(env: BrokerEnv) -> None:
    embassy = env.embassy()
    from embassy.verify.api import Verifier
    from tests.unit.conftest import policy_for

    verifier = Verifier(policy_for(env.tpm))
    identity = verifier.identity(canonical_json(embassy.identity_document()))

    def sealed_now() -> bool:
        nonce = bytes(range(32))
        evidence = verifier.evidence(identity, canonical_json(embassy.evidence(nonce)), nonce)
        return session_open(evidence.segment)

    assert not sealed_now()
    sessions = session_manager(embassy)
    opened = sessions.open(60, release=lambda session: None)
    assert sealed_now()
    sessions.close(opened.session, opened.token, bytes(32))
    assert not sealed_now()
    opened = sessions.open(60, release=lambda session: None)
    assert sealed_now()


def test_decision_log_names_every_field(env: BrokerEnv) -> None:
    broker = env.broker(broker_data(require_sealed=False))
    outcome = decide(broker, release_request(env.embassy(), broker))
    decision = _logged(env, outcome)
    assert json.loads(json.dumps(decision))["model_id"] == MODEL
    assert decision["key_id"] == KEY_ID
    assert decision["operation"] == "decrypt-for-load"
