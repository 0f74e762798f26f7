"""The embassy's side of the weights-key release (docs/protocol.md §11).

The launched workload asks for its model's key in two steps, carrying every message to and
from the key broker itself (the embassy has no network):

1. :meth:`WeightsKeys.request`: the embassy makes the :class:`KeyRequest` (its own keyid,
   the broker's nonce), answers it with fresh evidence whose quote is over
   ``request.evidence_nonce()``, and remembers it as pending: in memory only, for
   ``ttl_seconds``, at most ``max_pending`` at a time (the oldest is forgotten first).
2. :meth:`WeightsKeys.release`: the broker's release must answer a pending request (by its
   digest), for the same model and key id, and unwrap with this embassy's HPKE key under
   an ``info`` that binds every field of it. Only then is the request taken (one use), a
   ``weights-key-released`` statement appended, and the key handed out. A release that
   does not open leaves the request pending: only the workload can call, and a corrupted
   relay should not cost it a broker round trip. :meth:`WeightsKeys.denied` records a
   broker's denial the same way (``weights-key-denied``), taking the request.

What the embassy does not check: the broker's signature. It holds no broker key; the release
is bound to its own pending request and key, and the statement names the broker's keyid,
decision id and policy digest, which an auditor checks against the broker's signed decision
log. A workload that forged a "release" of a key it already knows gains nothing but a
statement whose decision the broker's log lacks.

Keys never touch disk, and are not logged. Python cannot wipe them: the HPKE library
returns immutable ``bytes``, the answer carries them as a base64 ``str``, and the encoded
response is ``bytes`` too; those copies are freed when the request ends, not overwritten.
The one copy held here is a ``bytearray`` zeroed as soon as the answer is built.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from embassy.errors import (
    BadPayloadError,
    UnsupportedSuiteError,
    WeightsReleaseMismatchError,
    WeightsRequestExpiredError,
    WeightsRequestUnknownError,
    WeightsRequestUsedError,
    WeightsUnwrapError,
)
from embassy.payload.envelope import HpkePrivateKey
from embassy.sessions.manager import WorkloadIdentity
from embassy.weights.release import (
    Denial,
    KeyRequest,
    Release,
    ReleaseRequest,
    open_release,
)
from embassy.wire.codec import b64encode, canonical_json, hex_decode
from embassy.wire.statement import WEIGHTS_KEY_DENIED_V1, WEIGHTS_KEY_RELEASED_V1, Subject

_LOG = logging.getLogger(__name__)

DEFAULT_TTL_SECONDS = 120
DEFAULT_MAX_PENDING = 16
# How long a taken or expired request is still told apart from one never made.
_REMEMBER_FACTOR = 4
SUBJECT_PREFIX = "weights-request:"


class StatementSink(Protocol):
    def append_statement(
        self, predicate_type: str, subjects: list[Subject], body: Mapping[str, Any]
    ) -> Any: ...


@dataclass(frozen=True, slots=True)
class _Pending:
    request: KeyRequest
    expires: float  # monotonic seconds


def subject(request: KeyRequest) -> Subject:
    """The statement's in-toto subject: the key request itself (its canonical bytes'
    SHA-256, the digest the broker's release and decision name), named by its model."""
    return Subject(SUBJECT_PREFIX + request.model_id, request.digest())


def _request_fields(request: KeyRequest) -> dict[str, Any]:
    return {
        "model_id": request.model_id,
        "key_id": request.key_id,
        "tenant": request.tenant,
        "operation": request.operation,
        "request_sha256": request.digest().hex(),
    }


def released_body(
    request: KeyRequest, release: Release, workload: WorkloadIdentity, wall_time: int
) -> dict[str, Any]:
    """The ``weights-key-released`` body: the request (the embassy's own record of it), the
    broker's decision, and the workload the key went to."""
    return {
        **_request_fields(request),
        "decision_id": release.decision_id,
        "policy_sha256": release.policy_sha256.hex(),
        "broker_keyid": release.broker_keyid,
        "suite": release.suite,
        "workload": workload.to_json(),
        "wall_time_unix": wall_time,
    }


def denied_body(
    request: KeyRequest, denial: Denial, workload: WorkloadIdentity, wall_time: int
) -> dict[str, Any]:
    """The ``weights-key-denied`` body: the broker's reason code (its free-text message is
    not stated: it is the relaying workload's to change)."""
    return {
        **_request_fields(request),
        "decision_id": denial.decision_id,
        "reason": denial.reason,
        "policy_sha256": None if denial.policy_sha256 is None else denial.policy_sha256.hex(),
        "broker_keyid": denial.broker_keyid,
        "workload": workload.to_json(),
        "wall_time_unix": wall_time,
    }


class WeightsKeys:
    """Pending weights-key requests of one embassy run, and the release of their keys."""

    def __init__(
        self,
        *,
        log: StatementSink,
        own_keyid: str,
        private_keys: Mapping[str, HpkePrivateKey],
        identity_document: Callable[[], Mapping[str, Any]],
        evidence: Callable[[bytes], Mapping[str, Any]],
        ttl_seconds: float = DEFAULT_TTL_SECONDS,
        max_pending: int = DEFAULT_MAX_PENDING,
        monotonic: Callable[[], float] = time.monotonic,
        wall_time: Callable[[], float] = time.time,
    ) -> None:
        self._log = log
        self._own_keyid = own_keyid
        self._private_keys = dict(private_keys)
        self._identity_document = identity_document
        self._evidence = evidence
        self._ttl = ttl_seconds
        self._max_pending = max_pending
        self._monotonic = monotonic
        self._wall_time = wall_time
        self._lock = threading.Lock()
        self._pending: OrderedDict[bytes, _Pending] = OrderedDict()
        # Requests answered (taken) or expired, kept a while so a replay or a late release
        # gets its own code rather than "unknown": digest -> (what, forget at).
        self._ended: OrderedDict[bytes, tuple[str, float]] = OrderedDict()

    # -- step 1: the release request -------------------------------------------------------

    def request(
        self, *, model_id: str, key_id: str, tenant: str, operation: str, nonce: bytes
    ) -> dict[str, Any]:
        """A release request for the broker: the key request and fresh evidence over it.

        The evidence is drawn from the same quote budget as ``GET /v1/evidence``
        (``rate-limited`` when spent); the request is pending only once it is answered.
        """
        request = KeyRequest(
            model_id=model_id,
            key_id=key_id,
            tenant=tenant,
            operation=operation,
            nonce=nonce,
            embassy_keyid=self._own_keyid,
        )
        evidence = self._evidence(request.evidence_nonce())
        answer = ReleaseRequest(
            request, canonical_json(self._identity_document()), canonical_json(evidence)
        ).to_json()
        with self._lock:
            now = self._monotonic()
            self._prune(now)
            digest = request.digest()
            self._pending.pop(digest, None)  # the same nonce again: a fresh time to live
            self._ended.pop(digest, None)
            while len(self._pending) >= self._max_pending:
                forgotten, _ = self._pending.popitem(last=False)
                _LOG.warning(
                    "weights: %d requests pending; forgot the oldest, %s",
                    self._max_pending,
                    forgotten.hex(),
                )
            self._pending[digest] = _Pending(request, now + self._ttl)
        _LOG.info(
            "weights: key request %s for model %r key %r pending",
            digest.hex(),
            request.model_id,
            request.key_id,
        )
        return answer

    # -- step 2: the broker's answer -------------------------------------------------------

    def release(self, release: Release, workload: WorkloadIdentity) -> dict[str, Any]:
        """Open ``release`` for its pending request, state it, and return the key."""
        hex_decode(release.broker_keyid, "release.broker_keyid", size=32)
        with self._lock:
            request = self._find(release.request_sha256).request
            if (release.model_id, release.key_id) != (request.model_id, request.key_id):
                raise WeightsReleaseMismatchError(
                    f"the release is for model {release.model_id!r} key {release.key_id!r}; "
                    f"request {release.request_sha256.hex()} asked for model "
                    f"{request.model_id!r} key {request.key_id!r}"
                )
            if release.suite not in self._private_keys:
                raise UnsupportedSuiteError(
                    f"release.suite: this embassy has no {release.suite!r} HPKE key "
                    f"(it has {', '.join(sorted(self._private_keys))})"
                )
            try:
                key = bytearray(open_release(release, request, private_keys=self._private_keys))
            except BadPayloadError as exc:
                raise WeightsUnwrapError(exc.message) from None
            try:
                # Taken before the statement: if stating fails, the request is spent and
                # the key is not handed out (ask the broker again).
                self._take(release.request_sha256)
                body = released_body(request, release, workload, int(self._wall_time()))
                appended = self._log.append_statement(
                    WEIGHTS_KEY_RELEASED_V1, [subject(request)], body
                )
                answer = {"key": b64encode(bytes(key)), "statement": b64encode(appended.envelope)}
            finally:
                key[:] = bytes(len(key))
        _LOG.info(
            "weights: released key %r of model %r to the workload (request %s, decision %s)",
            request.key_id,
            request.model_id,
            release.request_sha256.hex(),
            release.decision_id,
        )
        return answer

    def denied(self, denial: Denial, workload: WorkloadIdentity) -> dict[str, Any]:
        """Record the broker's ``denial`` of a pending request (taken: it is answered)."""
        hex_decode(denial.broker_keyid, "denial.broker_keyid", size=32)
        with self._lock:
            request = self._find(denial.request_sha256).request
            self._take(denial.request_sha256)
            body = denied_body(request, denial, workload, int(self._wall_time()))
            appended = self._log.append_statement(WEIGHTS_KEY_DENIED_V1, [subject(request)], body)
        _LOG.info(
            "weights: the broker denied request %s (model %r): %s",
            denial.request_sha256.hex(),
            request.model_id,
            denial.reason,
        )
        return {"reason": denial.reason, "statement": b64encode(appended.envelope)}

    def pending(self) -> int:
        with self._lock:
            self._prune(self._monotonic())
            return len(self._pending)

    # -- bookkeeping (under the lock) -------------------------------------------------------

    def _find(self, digest: bytes) -> _Pending:
        now = self._monotonic()
        self._prune(now)
        pending = self._pending.get(digest)
        if pending is not None:
            return pending
        ended = self._ended.get(digest)
        if ended is not None and ended[0] == "used":
            raise WeightsRequestUsedError(
                f"request {digest.hex()} was answered already: a key request is answered once "
                "(ask for a new one, with a new broker nonce)"
            )
        if ended is not None:
            raise WeightsRequestExpiredError(
                f"request {digest.hex()} expired: a release must come back within "
                f"{self._ttl:g} seconds of its request"
            )
        raise WeightsRequestUnknownError(
            f"request_sha256 {digest.hex()} names no request this embassy made since it "
            "started (another embassy's, another request's, or forgotten)"
        )

    def _take(self, digest: bytes) -> None:
        del self._pending[digest]
        self._remember(digest, "used", self._monotonic())

    def _remember(self, digest: bytes, what: str, now: float) -> None:
        self._ended[digest] = (what, now + _REMEMBER_FACTOR * self._ttl)
        while len(self._ended) > _REMEMBER_FACTOR * self._max_pending:
            self._ended.popitem(last=False)

    def _prune(self, now: float) -> None:
        for digest in [d for d, p in self._pending.items() if p.expires <= now]:
            del self._pending[digest]
            self._remember(digest, "expired", now)
        for digest in [d for d, (_, until) in self._ended.items() if until <= now]:
            del self._ended[digest]
