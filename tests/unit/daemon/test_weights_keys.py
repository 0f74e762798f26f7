"""The embassy's side of the weights-key release, attacked from the relaying workload's seat.

An in-process embassy on a FakeTpm with a fake launched workload; the test plays the key
broker itself: it verifies the evidence with the embassy's own verifier and wraps the key
with ``wrap_release``. The key must come back only for this embassy's own pending request,
once, in time, untampered, to the workload's processes, and with a statement that verifies.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from embassy.daemon.api import Api
from embassy.daemon.http import Peer, Request, Response, error_response
from embassy.daemon.runtime import Embassy
from embassy.daemon.statement_log import QuoteBudget
from embassy.daemon.weights_keys import DEFAULT_TTL_SECONDS
from embassy.errors import EmbassyError
from embassy.log.entry import EntryType, parse_entry
from embassy.payload.envelope import SUITE_MLKEM768_X25519, SUITE_X25519
from embassy.verify import Verifier
from embassy.verify.identity import VerifiedIdentity
from embassy.weights.release import (
    KeyRequest,
    Release,
    ReleaseRequest,
    deny,
    parse_release_request,
    wrap_release,
)
from embassy.wire.codec import b64encode, canonical_json
from embassy.wire.dsse import keyid
from embassy.wire.statement import (
    WEIGHTS_KEY_DENIED_V1,
    WEIGHTS_KEY_RELEASED_V1,
    parse_statement,
)
from tests.fakes import FakeTpm
from tests.unit.conftest import BOOT_PCRS, EmbassyFactory, policy_for
from tests.unit.verify.conftest import sealed_workload, start_with_workload
from tests.unit.wire.intoto_v1 import envelope_violations

PEER = Peer(pid=4242, uid=1000, gid=1000, started=1)
KEY = bytes(range(7, 39))
POLICY = bytes([0x5A]) * 32
ASK: dict[str, Any] = {
    "model_id": "minilm-l6",
    "key_id": "k1",
    "tenant": "acme",
    "operation": "decrypt-for-load",
}


def call(embassy: Embassy, path: str, body: object, peer: Peer | None = PEER) -> Response:
    """One socket request, through the real routes and the one error mapping."""
    raw = body if isinstance(body, bytes) else canonical_json(body)  # type: ignore[arg-type]
    try:
        return Api(embassy)(Request("POST", path, {}, raw, peer))
    except EmbassyError as exc:
        return error_response(exc)


def code(response: Response) -> str:
    assert response.status >= 400, response.body
    return str(response.body["error"]["code"])


class Broker:
    """The test's key broker: checks evidence as the real one would, and wraps keys."""

    def __init__(self, tpm: FakeTpm) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.verifier = Verifier(policy_for(tpm))
        self.nonces = iter(bytes([i]) * 32 for i in range(1, 255))

    def nonce(self) -> str:
        return next(self.nonces).hex()

    def check(self, answer: dict[str, Any]) -> tuple[ReleaseRequest, VerifiedIdentity]:
        request = parse_release_request(canonical_json(answer))
        identity = self.verifier.identity(request.identity)
        # The evidence's quote is over this very request: the broker's nonce, the model,
        # the key, the tenant, the operation and the embassy's keyid.
        self.verifier.evidence(identity, request.evidence, request.request.evidence_nonce())
        return request, identity

    def release(
        self,
        request: KeyRequest,
        identity: VerifiedIdentity,
        *,
        suite: str = SUITE_X25519,
        key: bytes = KEY,
        decision_id: str = "d-1",
    ) -> Release:
        return wrap_release(
            request,
            key,
            identity.keys,
            suite=suite,
            decision_id=decision_id,
            policy_sha256=POLICY,
            broker_key=self.key,
        )


@pytest.fixture
def embassy(make_embassy: EmbassyFactory, tpm: FakeTpm, monkeypatch: pytest.MonkeyPatch) -> Embassy:
    embassy = start_with_workload(make_embassy, tpm)
    monkeypatch.setattr(sealed_workload(embassy), "own_processes", True)
    return embassy


@pytest.fixture
def broker(tpm: FakeTpm) -> Broker:
    return Broker(tpm)


def ask(
    embassy: Embassy, broker: Broker, **changes: object
) -> tuple[ReleaseRequest, VerifiedIdentity]:
    answer = call(embassy, "/v1/weights/request", {**ASK, "nonce": broker.nonce(), **changes})
    assert answer.status == 200, answer.body
    return broker.check(answer.body)


def hand(embassy: Embassy, release: Release | dict[str, Any]) -> Response:
    body = release if isinstance(release, dict) else release.to_json()
    return call(embassy, "/v1/weights/key", {"release": body})


def statements(embassy: Embassy, kind: str) -> list[bytes]:
    lines = (embassy.config.data_dir / "log.jsonl").read_bytes().splitlines()
    found = []
    for entry in (parse_entry(line) for line in lines):
        if entry.type is not EntryType.STATEMENT:
            continue
        payload = base64.b64decode(json.loads(entry.data)["payload"])
        if parse_statement(payload).predicate_type == kind:
            found.append(entry.data)
    return found


# -- the key comes back, stated ----------------------------------------------------------


@pytest.mark.parametrize("suite", [SUITE_X25519, SUITE_MLKEM768_X25519])
def test_the_workload_gets_its_key_and_the_release_is_stated(
    embassy: Embassy, broker: Broker, suite: str
) -> None:
    request, identity = ask(embassy, broker)
    assert request.request.embassy_keyid == keyid(embassy.keys.signing.public_key())
    answer = hand(embassy, broker.release(request.request, identity, suite=suite))
    assert answer.status == 200, answer.body
    assert set(answer.body) == {"key", "statement"}
    assert base64.b64decode(answer.body["key"]) == KEY

    envelope = base64.b64decode(answer.body["statement"])
    assert statements(embassy, WEIGHTS_KEY_RELEASED_V1) == [envelope]
    assert envelope_violations(envelope) == []  # the independent in-toto v1 reader
    # The embassy's verifier finds it in a verified segment of the log.
    segment = canonical_json(embassy.log_segment(0))
    verified = broker.verifier.statement(identity, envelope, segment)
    statement = verified.logged.statement
    assert statement.predicate_type == WEIGHTS_KEY_RELEASED_V1
    assert [(s.name, s.sha256) for s in statement.subjects] == [
        ("weights-request:minilm-l6", request.request.digest())
    ]
    workload = sealed_workload(embassy).identity
    body = dict(statement.body)
    assert isinstance(body.pop("wall_time_unix"), int)
    assert body == {
        **ASK,
        "request_sha256": request.request.digest().hex(),
        "decision_id": "d-1",
        "policy_sha256": POLICY.hex(),
        "broker_keyid": keyid(broker.key.public_key()),
        "suite": suite,
        "workload": workload.to_json(),
    }
    # The verifier's own view of the workload agrees with the statement's.
    assert identity.workload is not None
    assert identity.workload.image_digest == body["workload"]["image_digest"]
    assert identity.workload.launch_digest.hex() == body["workload"]["launch_digest"]


def test_the_key_is_in_no_file_and_no_log_line(
    embassy: Embassy, broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    request, identity = ask(embassy, broker)
    assert hand(embassy, broker.release(request.request, identity)).status == 200
    for forms in (KEY, KEY.hex().encode(), b64encode(KEY).encode()):
        for path in embassy.config.data_dir.rglob("*"):
            if path.is_file():
                assert forms not in path.read_bytes(), path
        assert forms.decode("latin-1") not in caplog.text


# -- refused: not this embassy's request, or not its key ---------------------------------


def test_a_release_for_a_request_never_made_here_is_unknown(
    embassy: Embassy, broker: Broker
) -> None:
    request, identity = ask(embassy, broker)
    other = dataclasses.replace(request.request, nonce=bytes(32))  # never asked for
    answer = hand(embassy, broker.release(other, identity))
    assert (answer.status, code(answer)) == (409, "weights-request-unknown")
    assert "key" not in answer.body
    # Pointed at the pending request, it does not unwrap: the digest is in the HPKE info.
    forged = dataclasses.replace(
        broker.release(other, identity), request_sha256=request.request.digest()
    )
    answer = hand(embassy, forged)
    assert (answer.status, code(answer)) == (400, "weights-release-unwrap")
    assert statements(embassy, WEIGHTS_KEY_RELEASED_V1) == []


def test_another_embassys_request_and_release_are_refused(
    make_embassy: EmbassyFactory,
    embassy: Embassy,
    broker: Broker,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    other_tpm = FakeTpm(b"other")
    # Another master secret: other signing and HPKE keys (test embassies share MASTER).
    (tmp_path / "other").mkdir(mode=0o700)
    (tmp_path / "other" / "master.sealed").write_bytes(other_tpm.seal(bytes(32), BOOT_PCRS))
    other = start_with_workload(make_embassy, other_tpm, "other")
    assert keyid(other.keys.signing.public_key()) != keyid(embassy.keys.signing.public_key())
    monkeypatch.setattr(sealed_workload(other), "own_processes", True)
    mine, my_identity = ask(embassy, broker)
    theirs, their_identity = Broker(other_tpm).check(
        call(other, "/v1/weights/request", {**ASK, "nonce": broker.nonce()}).body
    )
    # Their request (their keyid in it), released to them, relayed here: unknown here.
    answer = hand(embassy, broker.release(theirs.request, their_identity))
    assert code(answer) == "weights-request-unknown"
    # Our request, wrapped to their identity key (a broker fooled into it): does not open.
    answer = hand(embassy, broker.release(mine.request, their_identity))
    assert (answer.status, code(answer)) == (400, "weights-release-unwrap")
    assert "key" not in answer.body
    # Ours, wrapped to us, still opens: a bad relay does not spend the request.
    answer = hand(embassy, broker.release(mine.request, my_identity))
    assert base64.b64decode(answer.body["key"]) == KEY


def test_a_release_opens_once(embassy: Embassy, broker: Broker) -> None:
    request, identity = ask(embassy, broker)
    release = broker.release(request.request, identity)
    assert hand(embassy, release).status == 200
    again = hand(embassy, release)
    assert (again.status, code(again)) == (409, "weights-request-used")
    assert "key" not in again.body
    assert len(statements(embassy, WEIGHTS_KEY_RELEASED_V1)) == 1


def test_a_release_after_the_time_to_live_is_expired(
    embassy: Embassy, broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1000.0]
    monkeypatch.setattr(embassy.weights, "_monotonic", lambda: now[0])
    request, identity = ask(embassy, broker)
    release = broker.release(request.request, identity)
    now[0] += DEFAULT_TTL_SECONDS
    answer = hand(embassy, release)
    assert (answer.status, code(answer)) == (409, "weights-request-expired")
    assert "key" not in answer.body
    assert embassy.weights.pending() == 0
    # Long after, it is forgotten altogether.
    now[0] += 10 * DEFAULT_TTL_SECONDS
    assert code(hand(embassy, release)) == "weights-request-unknown"


def test_a_request_just_inside_its_time_to_live_opens(
    embassy: Embassy, broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1000.0]
    monkeypatch.setattr(embassy.weights, "_monotonic", lambda: now[0])
    request, identity = ask(embassy, broker)
    now[0] += DEFAULT_TTL_SECONDS - 0.5
    assert hand(embassy, broker.release(request.request, identity)).status == 200


def _tampered() -> list[tuple[str, Callable[[dict[str, Any]], None], str]]:
    def flip(b64: str) -> str:
        raw = bytearray(base64.b64decode(b64))
        raw[-1] ^= 1
        return b64encode(bytes(raw))

    return [
        ("decision_id", lambda r: r.update(decision_id="d-2"), "weights-release-unwrap"),
        ("policy", lambda r: r.update(policy_sha256="00" * 32), "weights-release-unwrap"),
        ("broker_keyid", lambda r: r.update(broker_keyid="11" * 32), "weights-release-unwrap"),
        ("wrapped", lambda r: r.update(wrapped=flip(r["wrapped"])), "weights-release-unwrap"),
        (
            "suite",
            lambda r: r.update(suite=SUITE_MLKEM768_X25519),
            "weights-release-unwrap",
        ),
        ("model_id", lambda r: r.update(model_id="llama"), "weights-release-mismatch"),
        ("key_id", lambda r: r.update(key_id="k2"), "weights-release-mismatch"),
        ("request", lambda r: r.update(request_sha256="22" * 32), "weights-request-unknown"),
        ("unknown suite", lambda r: r.update(suite="p256"), "unsupported-suite"),
        ("keyid shape", lambda r: r.update(broker_keyid="broker"), "malformed"),
        ("extra field", lambda r: r.update(note="x"), "malformed"),
        ("no signature", lambda r: r.pop("signature"), "malformed"),
        ("version", lambda r: r.update(v=2), "malformed"),
    ]


@pytest.mark.parametrize(
    ("field", "change", "expected"), _tampered(), ids=[t[0] for t in _tampered()]
)
def test_a_tampered_release_gives_no_key(
    embassy: Embassy,
    broker: Broker,
    field: str,
    change: Callable[[dict[str, Any]], None],
    expected: str,
) -> None:
    del field
    request, identity = ask(embassy, broker)
    good = broker.release(request.request, identity).to_json()
    bad = json.loads(canonical_json(good))
    change(bad)
    answer = hand(embassy, bad)
    assert code(answer) == expected
    assert "key" not in answer.body
    assert statements(embassy, WEIGHTS_KEY_RELEASED_V1) == []
    # The untampered release still opens: a refused one does not spend the request.
    assert base64.b64decode(hand(embassy, good).body["key"]) == KEY


def test_the_broker_signature_is_not_what_binds_the_key(embassy: Embassy, broker: Broker) -> None:
    """The embassy holds no broker key: the HPKE info binds the release to its request. A
    re-signed (or unsigned-looking) release opens; the statement names the broker's keyid
    and decision, which an auditor checks against the broker's signed decision log."""
    request, identity = ask(embassy, broker)
    release = broker.release(request.request, identity)
    resigned = dataclasses.replace(release, signature=bytes(64))
    assert hand(embassy, resigned).status == 200


# -- who may ask, and when ---------------------------------------------------------------


def test_only_the_workloads_processes_may_ask(
    embassy: Embassy, broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    request, identity = ask(embassy, broker)
    release = broker.release(request.request, identity)
    monkeypatch.setattr(sealed_workload(embassy), "own_processes", False)
    for peer in (PEER, None):
        answer = call(embassy, "/v1/weights/request", {**ASK, "nonce": broker.nonce()}, peer)
        assert (answer.status, code(answer)) == (403, "forbidden")
        answer = call(embassy, "/v1/weights/key", {"release": release.to_json()}, peer)
        assert (answer.status, code(answer)) == (403, "forbidden")
        # Refused before the body is read: a malformed one gets 403 too.
        assert call(embassy, "/v1/weights/key", b"{", peer).status == 403
    assert embassy.weights.pending() == 1  # the host's tries made no request, spent none
    monkeypatch.setattr(sealed_workload(embassy), "own_processes", True)
    assert base64.b64decode(hand(embassy, release).body["key"]) == KEY


def test_no_workload_no_weights(embassy: Embassy, make_embassy: EmbassyFactory) -> None:
    bare = make_embassy(FakeTpm(b"bare"), "bare")
    answer = call(bare, "/v1/weights/request", {**ASK, "nonce": "ab" * 32})
    assert (answer.status, code(answer)) == (409, "conflict")


def test_nothing_is_stated_while_sealed(
    embassy: Embassy, broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sealed_workload(embassy).keeper, "closed", True)
    # Asking is fine while sealed (nothing is logged; the evidence may show the seal) ...
    request, identity = ask(embassy, broker)
    release = broker.release(request.request, identity)
    # ... but a release or denial, whose statement carries the workload's words, waits.
    answer = hand(embassy, release)
    assert (answer.status, code(answer)) == (409, "weights-workload-sealed")
    assert "key" not in answer.body
    denial = deny(
        request.request.digest(),
        decision_id="d-9",
        reason="not-sealed",
        message="",
        policy_sha256=None,
        broker_key=broker.key,
    )
    answer = call(embassy, "/v1/weights/key", {"denial": denial.to_json()})
    assert code(answer) == "weights-workload-sealed"
    assert statements(embassy, WEIGHTS_KEY_RELEASED_V1) == []
    assert statements(embassy, WEIGHTS_KEY_DENIED_V1) == []
    monkeypatch.setattr(sealed_workload(embassy).keeper, "closed", False)
    assert base64.b64decode(hand(embassy, release).body["key"]) == KEY


def test_requests_draw_on_the_evidence_quote_budget(embassy: Embassy, broker: Broker) -> None:
    embassy.log.evidence_quotes = QuoteBudget(0.001, 1)
    assert call(embassy, "/v1/weights/request", {**ASK, "nonce": broker.nonce()}).status == 200
    answer = call(embassy, "/v1/weights/request", {**ASK, "nonce": broker.nonce()})
    assert (answer.status, code(answer)) == (429, "rate-limited")
    assert embassy.weights.pending() == 1


def test_pending_requests_are_bounded_oldest_forgotten(embassy: Embassy, broker: Broker) -> None:
    embassy.weights._max_pending = 3
    asked = [ask(embassy, broker) for _ in range(4)]
    assert embassy.weights.pending() == 3
    first, identity = asked[0]
    assert code(hand(embassy, broker.release(first.request, identity))) == (
        "weights-request-unknown"
    )
    last, _ = asked[-1]
    assert hand(embassy, broker.release(last.request, identity)).status == 200


@pytest.mark.parametrize(
    "body",
    [
        {**ASK, "nonce": "ab" * 16},  # 16 bytes: a broker nonce is 32
        {**ASK, "nonce": "AB" * 32},
        {**ASK, "nonce": "ab" * 32, "embassy_keyid": "00" * 32},  # the embassy's to say
        {**ASK, "operation": "export", "nonce": "ab" * 32},
        {**ASK, "model_id": "../etc", "nonce": "ab" * 32},
        {**ASK, "tenant": "a" * 129, "nonce": "ab" * 32},
        {k: v for k, v in ASK.items() if k != "tenant"} | {"nonce": "ab" * 32},
        {**ASK, "nonce": 7},
    ],
)
def test_malformed_requests_are_refused(embassy: Embassy, body: dict[str, Any]) -> None:
    answer = call(embassy, "/v1/weights/request", body)
    assert answer.status == 400, answer.body
    assert embassy.weights.pending() == 0


def test_a_key_body_carries_exactly_one_answer(embassy: Embassy, broker: Broker) -> None:
    request, identity = ask(embassy, broker)
    release = broker.release(request.request, identity).to_json()
    for body in ({}, {"release": release, "denial": release}, {"key": release}):
        answer = call(embassy, "/v1/weights/key", body)
        assert answer.status == 400, (body, answer.body)
    assert hand(embassy, release).status == 200


# -- the broker's denial -----------------------------------------------------------------


def test_a_denial_is_stated_and_answers_the_request(embassy: Embassy, broker: Broker) -> None:
    request, identity = ask(embassy, broker)
    denial = deny(
        request.request.digest(),
        decision_id="d-9",
        reason="image-not-allowed",
        message="free text the workload could change",
        policy_sha256=POLICY,
        broker_key=broker.key,
    )
    answer = call(embassy, "/v1/weights/key", {"denial": denial.to_json()})
    assert answer.status == 200, answer.body
    assert answer.body["reason"] == "image-not-allowed"
    envelope = base64.b64decode(answer.body["statement"])
    assert statements(embassy, WEIGHTS_KEY_DENIED_V1) == [envelope]
    assert envelope_violations(envelope) == []
    segment = canonical_json(embassy.log_segment(0))
    statement = broker.verifier.statement(identity, envelope, segment).logged.statement
    assert statement.body["reason"] == "image-not-allowed"
    assert statement.body["decision_id"] == "d-9"
    assert "message" not in statement.body
    # The request is answered: a release for it now (a broker changing its mind, or a
    # workload trying both) finds it used.
    answer = hand(embassy, broker.release(request.request, identity))
    assert code(answer) == "weights-request-used"
    assert "key" not in answer.body


def release_and_deny(embassy: Embassy, tpm: FakeTpm) -> None:
    """Make ``embassy`` (with a fake workload) state one release and one denial (for the
    tests that drive every statement kind)."""
    broker = Broker(tpm)
    workload = sealed_workload(embassy)
    was, workload.own_processes = workload.own_processes, True
    try:
        request, identity = ask(embassy, broker)
        assert hand(embassy, broker.release(request.request, identity)).status == 200
        request, _ = ask(embassy, broker)
        denial = deny(
            request.request.digest(),
            decision_id="d-2",
            reason="model-not-listed",
            message="",
            policy_sha256=None,
            broker_key=broker.key,
        )
        assert call(embassy, "/v1/weights/key", {"denial": denial.to_json()}).status == 200
    finally:
        workload.own_processes = was
