"""The broker's decision on a release request. Pure apart from the store and clock passed in.

In order, each step a denial with its own reason code when it fails:

1. ``nonce-unknown`` / ``nonce-replayed`` / ``nonce-expired``: the request's nonce is taken
   from the store, exactly once, before its expiry. It is taken before anything is checked,
   so a nonce buys one attempt whatever its outcome.
2. ``evidence-invalid``: the identity document and the evidence verify with the embassy's
   own verifier (:mod:`embassy.verify`) under the broker's trust policy, the evidence's quote
   is over ``request.evidence_nonce()`` (this request, this nonce), the request names the
   identity's own keyid, and the evidence is from the run the identity shows. The error's
   code is in the message.
3. The policy input is built from verified facts only (:mod:`embassy.broker.facts`).
4. ``unknown-model``: the broker holds no key for (model_id, key_id).
5. The Rego policy decides (:mod:`embassy.broker.policy`); its reason codes pass through.
6. ``no-hpke-key``: the identity offers no HPKE key to wrap to.

Every decision is appended to the signed decision log *before* the answer is returned; if
the append fails the answer is a denial (``log-failed``), never a release that the log
lacks.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from embassy.broker.decision_log import LoggedDecision
from embassy.broker.facts import check_same_run, input_digest, policy_input
from embassy.broker.policy import PolicyOutcome
from embassy.broker.store import BrokerStore, NonceState
from embassy.errors import EmbassyError
from embassy.payload.envelope import SUITE_MLKEM768_X25519, SUITE_X25519, hpke_public_keys
from embassy.verify.api import Verifier
from embassy.verify.policy import TrustPolicy
from embassy.weights.release import (
    NONCE_LEN,
    Denial,
    KeyRequest,
    Release,
    ReleaseRequest,
    deny,
    wrap_release,
)
from embassy.wire.codec import JsonObject
from embassy.wire.dsse import keyid

_LOG = logging.getLogger(__name__)

NONCE_TTL_S = 60
# The hybrid (post-quantum) suite first: a release recorded today stays closed later.
SUITE_PREFERENCE = (SUITE_MLKEM768_X25519, SUITE_X25519)

NONCE_REASONS = {
    NonceState.UNKNOWN: "nonce-unknown",
    NonceState.USED: "nonce-replayed",
    NonceState.EXPIRED: "nonce-expired",
}
REASON_EVIDENCE = "evidence-invalid"
REASON_UNKNOWN_MODEL = "unknown-model"
REASON_NO_HPKE = "no-hpke-key"
REASON_LOG_FAILED = "log-failed"
REASON_MALFORMED = "malformed-request"


class Policy(Protocol):
    sha256: bytes

    def evaluate(self, policy_input: Mapping[str, Any]) -> PolicyOutcome: ...


def broker_trust(trust: TrustPolicy) -> TrustPolicy:
    """The broker's trust policy for :class:`Verifier`.

    The embassy's measurement is NOT pinned here: which measurements may load which model
    is the Rego policy's call (``data`` lists them per model), so the verifier is told to
    accept any measurement and the verified one goes into the policy input. Everything else
    (EK and AK CAs, software TPMs, boot PCRs) is the broker's configured trust.
    """
    return replace(trust, expected_measurement=None, insecure_any_measurement=True)


@dataclass(frozen=True)
class Broker:
    signing_key: Ed25519PrivateKey
    keys: Mapping[tuple[str, str], bytes]
    policy: Policy
    trust: TrustPolicy
    store: BrokerStore
    clock: Callable[[], float] = time.time
    nonce_ttl_s: int = NONCE_TTL_S
    verifier: Verifier = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "verifier", Verifier(broker_trust(self.trust)))


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the broker answered, and what it logged (``logged`` is None only if the log
    could not be written, and then the answer is a ``log-failed`` denial)."""

    answer: Release | Denial
    logged: LoggedDecision | None
    policy_input: JsonObject | None = None
    policy_seconds: float = 0.0

    @property
    def allowed(self) -> bool:
        return isinstance(self.answer, Release)


def issue_nonce(broker: Broker) -> tuple[bytes, int]:
    """A fresh nonce for one release request, valid for ``nonce_ttl_s``."""
    nonce = secrets.token_bytes(NONCE_LEN)
    expires = int(broker.clock()) + broker.nonce_ttl_s
    broker.store.issue_nonce(nonce, expires)
    return nonce, expires


def _decision(
    decision_id: str,
    now: int,
    request_sha256: bytes,
    request: KeyRequest | None,
    *,
    reason: str | None,
    embassy_keyid: str | None = None,
    policy_sha256: bytes | None = None,
    input_sha256: bytes | None = None,
) -> dict[str, Any]:
    return {
        "decision_id": decision_id,
        "time_unix": now,
        "decision": "allow" if reason is None else "deny",
        "reason": reason,
        "model_id": None if request is None else request.model_id,
        "key_id": None if request is None else request.key_id,
        "tenant": None if request is None else request.tenant,
        "operation": None if request is None else request.operation,
        "request_sha256": request_sha256.hex(),
        "embassy_keyid": embassy_keyid,
        "policy_sha256": None if policy_sha256 is None else policy_sha256.hex(),
        "input_sha256": None if input_sha256 is None else input_sha256.hex(),
    }


def _append(broker: Broker, decision: dict[str, Any]) -> LoggedDecision | None:
    try:
        return broker.store.append_decision(decision, broker.signing_key.sign)
    except Exception as exc:  # any failure to log is a denial: fail closed
        _LOG.error(
            "decision %s could not be logged (%s): denied",
            decision["decision_id"],
            exc.code if isinstance(exc, EmbassyError) else type(exc).__name__,
        )
        return None


def _finish_denial(
    broker: Broker,
    decision: dict[str, Any],
    request_sha256: bytes,
    message: str,
    policy_sha256: bytes | None,
    **extra: Any,
) -> Outcome:
    logged = _append(broker, decision)
    reason = decision["reason"] if logged is not None else REASON_LOG_FAILED
    if logged is None:
        message = "the decision could not be logged, so nothing is released"
    denial = deny(
        request_sha256,
        decision_id=decision["decision_id"],
        reason=reason,
        message=message,
        policy_sha256=policy_sha256,
        broker_key=broker.signing_key,
    )
    return Outcome(denial, logged, **extra)


def deny_malformed(broker: Broker, request: KeyRequest, message: str) -> Outcome:
    """A logged denial for a request whose key request parsed but the rest did not."""
    decision_id = secrets.token_hex(16)
    decision = _decision(
        decision_id, int(broker.clock()), request.digest(), request, reason=REASON_MALFORMED
    )
    return _finish_denial(broker, decision, request.digest(), message, None)


class _Denied(Exception):
    """A step refused the request: ``reason``, ``message``, and what the log records."""

    def __init__(self, reason: str, message: str, **found: Any) -> None:
        super().__init__(reason)
        self.reason = reason
        self.message = message
        self.found = found


@dataclass(frozen=True, slots=True)
class _Granted:
    weights_key: bytes
    suite: str
    identity_keys: Mapping[str, Any]  # the verified identity's keys, to wrap to
    embassy_keyid: str
    facts: JsonObject
    input_sha256: bytes
    policy_seconds: float


def _check(broker: Broker, release_request: ReleaseRequest, now: int) -> _Granted:
    """Steps 1-6 of the module docstring; raises :class:`_Denied` at the first that fails."""
    request = release_request.request
    state = broker.store.take_nonce(request.nonce, now)
    if state is not NonceState.OK:
        raise _Denied(
            NONCE_REASONS.get(state, "nonce-unknown"),
            f"nonce: {state.value} (ask POST /v1/nonce for a fresh one; each is good once, "
            f"for {broker.nonce_ttl_s} s)",
        )
    try:
        identity = broker.verifier.identity(release_request.identity)
        own = keyid(identity.signing_key)
        if own != request.embassy_keyid:
            raise _Denied(
                REASON_EVIDENCE,
                f"embassy_keyid: the request names {request.embassy_keyid}, the verified "
                f"identity is {own}",
            )
        evidence = broker.verifier.evidence(
            identity, release_request.evidence, request.evidence_nonce()
        )
        check_same_run(identity, evidence)
        facts = policy_input(identity, evidence, release_request.evidence, request)
        offered = hpke_public_keys(identity.keys)
    except EmbassyError as exc:
        raise _Denied(REASON_EVIDENCE, f"{exc.code}: {exc.message}") from None
    found: dict[str, Any] = {
        "embassy_keyid": own,
        "input_sha256": input_digest(facts),
        "policy_input": facts,
    }
    weights_key = broker.keys.get((request.model_id, request.key_id))
    if weights_key is None:
        raise _Denied(
            REASON_UNKNOWN_MODEL,
            f"model_id/key_id: this broker holds no key {request.key_id!r} for model "
            f"{request.model_id!r}",
            **found,
        )
    outcome = broker.policy.evaluate(facts)
    found["policy_seconds"] = outcome.seconds
    if not outcome.allow:
        raise _Denied(outcome.reason or "policy-denied", outcome.message, **found)
    suite = next((s for s in SUITE_PREFERENCE if s in offered), None)
    if suite is None:
        raise _Denied(
            REASON_NO_HPKE, "the identity offers no HPKE key this broker can wrap to", **found
        )
    return _Granted(
        weights_key, suite, identity.keys, own, facts, found["input_sha256"], outcome.seconds
    )


def decide(broker: Broker, release_request: ReleaseRequest) -> Outcome:
    """Verify, evaluate, log and answer one release request (see the module docstring)."""
    request = release_request.request
    request_sha256 = request.digest()
    decision_id = secrets.token_hex(16)
    now = int(broker.clock())
    policy_sha256 = broker.policy.sha256
    try:
        granted = _check(broker, release_request, now)
    except _Denied as refusal:
        found = dict(refusal.found)
        extra = {k: found.pop(k) for k in ("policy_input", "policy_seconds") if k in found}
        decision = _decision(
            decision_id,
            now,
            request_sha256,
            request,
            reason=refusal.reason,
            policy_sha256=policy_sha256,
            **found,
        )
        return _finish_denial(
            broker, decision, request_sha256, refusal.message, policy_sha256, **extra
        )
    release = wrap_release(
        request,
        granted.weights_key,
        granted.identity_keys,
        suite=granted.suite,
        decision_id=decision_id,
        policy_sha256=policy_sha256,
        broker_key=broker.signing_key,
    )
    decision = _decision(
        decision_id,
        now,
        request_sha256,
        request,
        reason=None,
        embassy_keyid=granted.embassy_keyid,
        policy_sha256=policy_sha256,
        input_sha256=granted.input_sha256,
    )
    logged = _append(broker, decision)
    if logged is None:
        return _finish_denial(
            broker,
            {**decision, "decision": "deny", "reason": REASON_LOG_FAILED},
            request_sha256,
            "the release could not be logged, so it is not given",
            policy_sha256,
            policy_input=granted.facts,
            policy_seconds=granted.policy_seconds,
        )
    return Outcome(release, logged, granted.facts, granted.policy_seconds)
