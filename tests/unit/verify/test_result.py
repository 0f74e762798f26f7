"""`embassy verify result` on results made by the real runtime on FakeTpm, with a (fake)
workload launched beside it: each forgery is refused with its own reason."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Iterator

import pytest

from embassy.daemon.runtime import Embassy
from embassy.errors import (
    DeadlineError,
    EmbassyError,
    EmbassyRestartedError,
    LogIntegrityError,
    ResultMismatchError,
    TimeWindowError,
    WorkloadMismatchError,
)
from embassy.sessions.manager import SessionManager, WorkloadIdentity
from embassy.verify import VerifiedEvidence, VerifiedIdentity, VerifiedResult, Verifier
from embassy.verify.policy import TrustPolicy
from embassy.verify.result import verify_result
from embassy.wire.codec import canonical_json
from tests.fakes import FakeTpm, MemorySeal
from tests.unit.conftest import EmbassyFactory
from tests.unit.verify.conftest import sealed_workload, start_with_workload

PAYLOAD = bytes(range(16))
OUTPUT = b'{"answer":42}'
NOW = 1_800_000_000.0


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture
def identity(workload_embassy: Embassy, policy: TrustPolicy) -> VerifiedIdentity:
    return Verifier(policy).identity(canonical_json(workload_embassy.identity_document()))


def _manager(
    embassy: Embassy,
    workload: WorkloadIdentity | None = None,
    now: Callable[[], float] = lambda: NOW,
) -> SessionManager:
    return SessionManager(
        log=embassy.log,
        seal=MemorySeal(),
        workload=workload or sealed_workload(embassy).identity,
        token_key=bytes(32),
        now=now,
    )


def _bundle_of(
    embassy: Embassy, seal_env: bytes, unseal_env: bytes, output: bytes
) -> dict[str, object]:
    seal_seq = next(e.seq for e in reversed(embassy.log.entries) if e.data == seal_env)
    return {
        "v": 1,
        "type": "embassy-result",
        "output": _b64(output),
        "seal_statement": _b64(seal_env),
        "unseal_statement": _b64(unseal_env),
        "log": embassy.log_segment(seal_seq)["segment"],
    }


def _bundle(
    embassy: Embassy, m: SessionManager, output: bytes = OUTPUT, committed: bytes = OUTPUT
) -> dict[str, object]:
    opened = m.open(60, payload_id=PAYLOAD, release=lambda session: None)
    unseal = m.close(opened.session, opened.token, hashlib.sha256(committed).digest())
    return _bundle_of(embassy, opened.envelope, unseal, output)


def _check(
    bundle: dict[str, object],
    identity: VerifiedIdentity,
    policy: TrustPolicy,
    payload: bytes | None = PAYLOAD,
) -> VerifiedResult:
    return verify_result(json.dumps(bundle).encode(), identity, policy, expected_payload_id=payload)


def test_an_honest_result_verifies_and_says_when(
    workload_embassy: Embassy, identity: VerifiedIdentity, policy: TrustPolicy
) -> None:
    result = _check(_bundle(workload_embassy, _manager(workload_embassy)), identity, policy)
    for check in ("output-digest", "identity-workload", "no-restart", "deadline", "payload-id"):
        assert check in result.checks
    assert result.payload_id == PAYLOAD.hex()
    assert identity.workload is not None
    assert result.workload["launch_digest"] == identity.workload.launch_digest.hex()
    assert result.window is not None
    assert result.window.seal.wall_time_unix == int(NOW)
    assert result.window.tpm_ms == (
        result.unseal.statement.header.clock.clock - result.seal.statement.header.clock.clock
    )
    facts = "\n".join(result.facts())
    assert f"sealed at seq {result.seal.entry.seq}, TPM clock " in facts
    assert f"wall time {int(NOW)} (unix s)" in facts
    assert "unsealed before its deadline" in facts


def test_the_identity_reports_the_launched_workload(
    workload_embassy: Embassy, identity: VerifiedIdentity
) -> None:
    from embassy.workload.spec import launch_config_digest

    workload = identity.workload
    assert workload is not None
    assert (workload.name, workload.image) == ("answerer", "example/answerer:1")
    assert workload.image_digest == sealed_workload(workload_embassy).identity.image_digest
    # The verifier recomputes the launch digest from the logged events exactly as the
    # daemon computes it from the spec for the container it creates.
    spec = workload_embassy.config.workload
    assert spec is not None
    assert workload.launch_digest == launch_config_digest(spec, workload.image_digest)
    assert workload.seal_policy["backend"] == "fake"


def test_a_tampered_output_is_refused(
    workload_embassy: Embassy, identity: VerifiedIdentity, policy: TrustPolicy
) -> None:
    bundle = _bundle(workload_embassy, _manager(workload_embassy), output=b'{"answer":43}')
    with pytest.raises(
        ResultMismatchError,
        match=r"output_sha256: the output is not the one the workload committed to .*"
        r"the output's SHA-256 is [0-9a-f]{64}, the statement says [0-9a-f]{64}\)",
    ):
        _check(bundle, identity, policy)


def test_a_swapped_statement_is_refused(
    workload_embassy: Embassy, identity: VerifiedIdentity, policy: TrustPolicy
) -> None:
    m = _manager(workload_embassy)
    first, second = _bundle(workload_embassy, m), _bundle(workload_embassy, m)
    first["unseal_statement"] = second["unseal_statement"]
    first["log"] = workload_embassy.log_segment(0)["segment"]
    with pytest.raises(
        ResultMismatchError,
        match=r"session: .*different sessions \(seal: [0-9a-f]{32}, unseal: [0-9a-f]{32}\)",
    ):
        _check(first, identity, policy)


def test_the_wrong_payload_and_a_statement_outside_the_log(
    workload_embassy: Embassy, identity: VerifiedIdentity, policy: TrustPolicy
) -> None:
    m = _manager(workload_embassy)
    bundle = _bundle(workload_embassy, m)
    with pytest.raises(ResultMismatchError, match="not yours"):
        _check(bundle, identity, policy, payload=b"\xff" * 16)
    later = _bundle(workload_embassy, m)
    bundle["seal_statement"] = later["seal_statement"]  # not in the first bundle's segment
    with pytest.raises(LogIntegrityError, match="not in the verified log segment"):
        _check(bundle, identity, policy)


def test_a_malformed_bundle(identity: VerifiedIdentity, policy: TrustPolicy) -> None:
    with pytest.raises(EmbassyError) as info:
        verify_result(b'{"v":1,"type":"embassy-result","v":2}', identity, policy)
    assert info.value.code == "malformed"


# -- another workload ------------------------------------------------------------------------


def test_a_result_from_another_workload_is_refused(
    workload_embassy: Embassy, identity: VerifiedIdentity, policy: TrustPolicy
) -> None:
    ours = sealed_workload(workload_embassy).identity
    other_image = WorkloadIdentity("sha256:" + "cd" * 32, ours.container_id, ours.launch_digest)
    bundle = _bundle(workload_embassy, _manager(workload_embassy, other_image))
    with pytest.raises(WorkloadMismatchError, match=r"workload.image_digest is sha256:cdcd"):
        _check(bundle, identity, policy)
    other_launch = WorkloadIdentity(ours.image_digest, ours.container_id, b"\x01" * 32)
    bundle = _bundle(workload_embassy, _manager(workload_embassy, other_launch))
    with pytest.raises(WorkloadMismatchError, match="launch_digest is 0101") as info:
        _check(bundle, identity, policy)
    assert info.value.code == "workload-mismatch"
    assert "another workload" in info.value.message


def test_a_result_against_an_identity_without_a_workload_is_refused(
    embassy: Embassy, policy: TrustPolicy
) -> None:
    identity = Verifier(policy).identity(canonical_json(embassy.identity_document()))
    assert identity.workload is None
    workload = WorkloadIdentity("sha256:" + "ab" * 32, "c0ffee", bytes(32))
    bundle = _bundle(embassy, _manager(embassy, workload))
    with pytest.raises(WorkloadMismatchError, match="launched none"):
        _check(bundle, identity, policy)


def test_the_workload_pins(workload_embassy: Embassy, policy: TrustPolicy, tpm: FakeTpm) -> None:
    from dataclasses import replace

    doc = canonical_json(workload_embassy.identity_document())
    ours = sealed_workload(workload_embassy).identity
    pinned = Verifier(
        replace(
            policy,
            expected_image_digest=ours.image_digest,
            expected_launch_digest=ours.launch_digest,
        )
    ).identity(doc)
    assert {"workload-image", "workload-launch"} <= set(pinned.checks)
    with pytest.raises(WorkloadMismatchError, match="workload image digest is sha256:abab"):
        Verifier(replace(policy, expected_image_digest="sha256:" + "00" * 32)).identity(doc)
    with pytest.raises(WorkloadMismatchError, match="workload launch digest is"):
        Verifier(replace(policy, expected_launch_digest=bytes(32))).identity(doc)


# -- restarts --------------------------------------------------------------------------------


def test_a_restart_between_seal_and_unseal_is_refused(
    make_embassy: EmbassyFactory, tpm: FakeTpm, policy: TrustPolicy
) -> None:
    first = start_with_workload(make_embassy, tpm)
    identity = Verifier(policy).identity(canonical_json(first.identity_document()))
    opened = _manager(first).open(60, payload_id=PAYLOAD, release=lambda session: None)
    make_embassy.crash(first)
    second = start_with_workload(make_embassy, tpm)  # same measurement, same workload
    m2 = _manager(second)
    m2.reconcile()  # the session is still open after the restart: it can be closed
    unseal = m2.close(opened.session, opened.token, hashlib.sha256(OUTPUT).digest())
    bundle = _bundle_of(second, opened.envelope, unseal, OUTPUT)
    with pytest.raises(EmbassyRestartedError, match=r"\(embassy-start\) is between the seal and"):
        _check(bundle, identity, policy)
    # Verified against the second run's identity, the seal is from an earlier run.
    identity2 = Verifier(policy).identity(canonical_json(second.identity_document()))
    with pytest.raises(EmbassyRestartedError, match="made by an earlier run"):
        _check(bundle, identity2, policy)


def test_a_restart_before_the_seal_is_refused_even_unseen(
    make_embassy: EmbassyFactory, tpm: FakeTpm, policy: TrustPolicy
) -> None:
    first = start_with_workload(make_embassy, tpm)
    identity = Verifier(policy).identity(canonical_json(first.identity_document()))
    make_embassy.crash(first)
    second = start_with_workload(make_embassy, tpm)
    m2 = _manager(second)
    m2.reconcile()
    second.log.checkpoint()  # the result's segment is anchored after the restart
    bundle = _bundle(second, m2)
    segment = bundle["log"]
    assert isinstance(segment, dict)
    assert segment["anchor"] is not None
    with pytest.raises(EmbassyRestartedError, match="differs from the identity's quote"):
        _check(bundle, identity, policy)


def test_a_restart_after_the_unseal_is_harmless(
    make_embassy: EmbassyFactory, tpm: FakeTpm, policy: TrustPolicy
) -> None:
    first = start_with_workload(make_embassy, tpm)
    identity = Verifier(policy).identity(canonical_json(first.identity_document()))
    m = _manager(first)
    opened = m.open(60, payload_id=PAYLOAD, release=lambda session: None)
    unseal = m.close(opened.session, opened.token, hashlib.sha256(OUTPUT).digest())
    make_embassy.crash(first)
    second = start_with_workload(make_embassy, tpm, image="example/other:2")
    bundle = _bundle_of(second, opened.envelope, unseal, OUTPUT)
    assert "no-restart" in _check(bundle, identity, policy).checks


def test_a_result_from_another_boot_is_refused(
    make_embassy: EmbassyFactory, tpm: FakeTpm, policy: TrustPolicy
) -> None:
    first = start_with_workload(make_embassy, tpm)
    identity = Verifier(policy).identity(canonical_json(first.identity_document()))
    make_embassy.crash(first)
    tpm.reset()
    second = start_with_workload(make_embassy, tpm)
    with pytest.raises(EmbassyRestartedError, match="from TPM boot 2, the identity's from boot 1"):
        _check(_bundle(second, _manager(second)), identity, policy)


# -- deadline --------------------------------------------------------------------------------


def test_a_session_past_its_deadline_on_the_tpm_clock_is_refused(
    workload_embassy: Embassy, identity: VerifiedIdentity, policy: TrustPolicy, tpm: FakeTpm
) -> None:
    # The embassy's wall clock stands still (it says the deadline is not reached) while the
    # TPM's runs 70 s through a 60 s session.
    m = _manager(workload_embassy)
    opened = m.open(60, payload_id=PAYLOAD, release=lambda session: None)
    tpm.tick(70_000)
    unseal = m.close(opened.session, opened.token, hashlib.sha256(OUTPUT).digest())
    bundle = _bundle_of(workload_embassy, opened.envelope, unseal, OUTPUT)
    with pytest.raises(DeadlineError, match="the session unsealed past its deadline") as info:
        _check(bundle, identity, policy)
    assert info.value.code == "deadline-passed"


def test_an_unseal_dated_past_the_deadline_is_refused(
    workload_embassy: Embassy, identity: VerifiedIdentity, policy: TrustPolicy
) -> None:
    def times() -> Iterator[float]:
        yield from (NOW, NOW, NOW + 59)  # open: deadline, wall time; close: its check
        while True:
            yield NOW + 61  # the unseal's wall time: the clock moved on past the check

    clock = times()
    m = _manager(workload_embassy, now=lambda: next(clock))
    opened = m.open(60, payload_id=PAYLOAD, release=lambda session: None)
    unseal = m.close(opened.session, opened.token, hashlib.sha256(OUTPUT).digest())
    bundle = _bundle_of(workload_embassy, opened.envelope, unseal, OUTPUT)
    with pytest.raises(DeadlineError, match="wall_time_unix is 1800000061, at or past"):
        _check(bundle, identity, policy)


# -- the time window -------------------------------------------------------------------------


def _evidence(
    embassy: Embassy, verifier: Verifier, identity: VerifiedIdentity, label: bytes
) -> VerifiedEvidence:
    nonce = hashlib.sha256(label).digest()
    return verifier.evidence(identity, canonical_json(embassy.evidence(nonce)), nonce)


def test_the_window_between_the_users_own_evidence(
    workload_embassy: Embassy, identity: VerifiedIdentity, policy: TrustPolicy
) -> None:
    verifier = Verifier(policy)
    before = _evidence(workload_embassy, verifier, identity, b"before")
    bundle = json.dumps(_bundle(workload_embassy, _manager(workload_embassy))).encode()
    after = _evidence(workload_embassy, verifier, identity, b"after")
    result = verifier.result(identity, bundle, payload_id=PAYLOAD, before=before, after=after)
    assert "time-window" in result.checks
    facts = "\n".join(result.facts())
    assert f"after your before-evidence over nonce {before.nonce.hex()}" in facts
    assert f"before your after-evidence over nonce {after.nonce.hex()}" in facts
    assert "the whole session lies between your two nonces" in facts
    # Evidence taken after the result cannot stand for "before sending", nor the reverse.
    with pytest.raises(TimeWindowError, match="sealed before you asked for that quote"):
        verifier.result(identity, bundle, before=after)
    with pytest.raises(TimeWindowError, match="take the after-evidence once you have"):
        verifier.result(identity, bundle, after=before)
