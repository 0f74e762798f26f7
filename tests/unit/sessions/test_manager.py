"""The session manager: ordering, the locked key release, crash recovery from the log alone.

Runs on FakeTpm and an in-memory seal; the real link gate is tested from the attacker's side
in tests/integration. Every crash point is replayed by raising where the daemon would die.
"""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from embassy.daemon.runtime import Embassy
from embassy.errors import (
    BadPayloadError,
    ConflictError,
    ForbiddenError,
    NotFoundError,
    PayloadReplayedError,
    RequestError,
    SealError,
)
from embassy.log.entry import EntryType
from embassy.net.identity import NetnsId
from embassy.seal.rules import seal_rules
from embassy.sessions.manager import (
    MAX_DEADLINE_SECONDS,
    MIN_DEADLINE_SECONDS,
    SessionManager,
    WorkloadIdentity,
)
from embassy.wire.dsse import parse_envelope
from embassy.wire.statement import (
    LIFECYCLE_V1,
    SEAL_V2,
    SESSION_ABORT_V2,
    UNSEAL_V2,
    parse_statement,
)
from tests.fakes import FakeTpm, MemorySeal
from tests.unit.conftest import EmbassyFactory

WORKLOAD = WorkloadIdentity("sha256:" + "ab" * 32, "c0ffee", bytes(32))
KEY = bytes(range(32))


class Crash(Exception):
    pass


class Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


def manager(
    embassy: Embassy, seal: MemorySeal, clock: Clock, crash_at: str | None = None
) -> SessionManager:
    m = SessionManager(log=embassy.log, seal=seal, workload=WORKLOAD, token_key=KEY, now=clock)
    if crash_at is not None:

        def point(name: str) -> None:
            if name == crash_at:
                raise Crash(name)

        m._point = point  # type: ignore[method-assign]
    return m


def statement(envelope: bytes) -> tuple[str, dict[str, Any]]:
    s = parse_statement(parse_envelope(envelope).payload)
    return s.predicate_type, dict(s.body)


def session_statements(embassy: Embassy, kind: str) -> list[dict[str, Any]]:
    return [
        statement(e.data)[1]
        for e in embassy.log.entries
        if e.type is EntryType.STATEMENT and statement(e.data)[0] == kind
    ]


def release_key(session: bytes) -> bytes:
    return b"key-for-" + session


@pytest.fixture
def seal() -> MemorySeal:
    return MemorySeal()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_the_gate_closes_before_the_seal_statement_and_opens_after_the_unseal(
    embassy: Embassy, seal: MemorySeal, clock: Clock
) -> None:
    m = manager(embassy, seal, clock)
    seen: list[bool] = []
    opened = m.open(60, release=lambda s: seen.append(seal.closed) or release_key(s))
    assert seen == [True], "the key left while the gate was closed"
    assert opened.released == b"key-for-" + opened.session
    kind, body = statement(opened.envelope)
    assert kind == SEAL_V2
    assert body["session"] == opened.session.hex()
    assert body["seal"] == {
        "backend": "veth-link+iptables-legacy-netns",
        "gate": "link",
        "link": "ewfake",
        "rules_sha256": seal_rules().digest,
    }
    assert body["workload"] == WORKLOAD.to_json()
    assert body["deadline_unix"] == int(clock.t) + 60
    last_at_open: list[str] = []
    real_open = seal.open

    def watched_open() -> str:
        last_at_open.append(statement(embassy.log.entries[-1].data)[0])
        return real_open()

    seal.open = watched_open  # type: ignore[method-assign]
    unseal = m.close(opened.session, opened.token, hashlib.sha256(b"out").digest())
    kind, body = statement(unseal)
    assert kind == UNSEAL_V2
    assert body["gate"] == "unsealed"
    assert body["output_sha256"] == hashlib.sha256(b"out").hexdigest()
    assert body["seal_statement_sha256"] == hashlib.sha256(opened.envelope).hexdigest()
    assert seal.closed is False
    assert seal.history == ["close", "open"]
    assert last_at_open == [UNSEAL_V2], "stated first, then opened: the window is sealed"


def test_only_the_token_holder_closes_and_a_retried_close_gets_the_same_statement(
    embassy: Embassy, seal: MemorySeal, clock: Clock
) -> None:
    m = manager(embassy, seal, clock)
    opened = m.open(60, release=release_key)
    with pytest.raises(ForbiddenError, match="does not hold the session"):
        m.close(opened.session, b"\x00" * 32, None)
    with pytest.raises(ForbiddenError):  # an unknown session is not told apart from a bad token
        m.close(b"\x01" * 16, opened.token, None)
    assert seal.closed
    first = m.close(opened.session, opened.token, None)
    assert m.close(opened.session, opened.token, None) == first  # idempotent, not 409
    assert len(session_statements(embassy, UNSEAL_V2)) == 1


@pytest.mark.parametrize("seconds", [0, 1, MIN_DEADLINE_SECONDS - 1, MAX_DEADLINE_SECONDS + 1])
def test_a_deadline_out_of_bounds_is_refused_before_anything_changes(
    embassy: Embassy, seal: MemorySeal, clock: Clock, seconds: int
) -> None:
    with pytest.raises(RequestError, match="deadline_seconds"):
        manager(embassy, seal, clock).open(seconds, release=release_key)
    assert seal.history == []


def test_stays_sealed_until_the_last_session_closes(
    embassy: Embassy, seal: MemorySeal, clock: Clock
) -> None:
    m = manager(embassy, seal, clock)
    a, b = m.open(60, release=release_key), m.open(60, release=release_key)
    assert statement(m.close(a.session, a.token, None))[1]["gate"] == "still-sealed"
    assert seal.closed
    assert statement(m.close(b.session, b.token, None))[1]["gate"] == "unsealed"
    assert not seal.closed


def test_past_its_deadline_a_session_is_aborted_and_its_close_refused(
    embassy: Embassy, seal: MemorySeal, clock: Clock
) -> None:
    m = manager(embassy, seal, clock)
    short = m.open(10, release=release_key)
    m.open(600, release=release_key)
    clock.t += 10
    with pytest.raises(ConflictError, match="passed its deadline"):
        m.close(short.session, short.token, b"\x11" * 32)
    assert seal.closed, "the other session still needs the seal"
    assert [b["reason"] for b in session_statements(embassy, SESSION_ABORT_V2)] == [
        "deadline-passed"
    ]
    assert session_statements(embassy, UNSEAL_V2) == [], "no unseal for an expired session"
    with pytest.raises(ConflictError, match="aborted"):
        m.close(short.session, short.token, None)
    clock.t += 600
    assert m.abort_expired() == 1
    assert not seal.closed


@pytest.mark.parametrize("check", [1, 2], ids=["before-the-statement", "right-before-release"])
def test_no_key_leaves_when_the_seal_is_lifted_before_the_release(
    embassy: Embassy, seal: MemorySeal, clock: Clock, check: int
) -> None:
    seal.lift_in_check = check
    released: list[bytes] = []
    with pytest.raises(SealError):
        manager(embassy, seal, clock).open(60, release=lambda s: released.append(s) or b"k")
    assert released == []
    if check == 2:  # the seal statement was made: an abort statement ends it
        [abort] = session_statements(embassy, SESSION_ABORT_V2)
        assert abort["reason"] == "seal-not-in-force"
    else:
        assert session_statements(embassy, SEAL_V2) == []


def test_no_key_leaves_when_the_workload_moved_to_another_namespace(
    embassy: Embassy, seal: MemorySeal, clock: Clock
) -> None:
    m = manager(embassy, seal, clock)

    def claim(session: bytes) -> None:
        seal.netns = NetnsId(1, 4242)  # a restart: a new namespace, after the seal

    released: list[bytes] = []
    with pytest.raises(SealError, match="not in force"):
        m.open(60, claim=claim, release=lambda s: released.append(s) or b"k")
    assert released == []
    assert m.status()["open_sessions"] == 0


def test_a_refused_claim_costs_no_statement_and_reopens_the_gate(
    embassy: Embassy, seal: MemorySeal, clock: Clock
) -> None:
    def claim(session: bytes) -> None:
        raise PayloadReplayedError("payload was already opened")

    with pytest.raises(PayloadReplayedError):
        manager(embassy, seal, clock).open(60, claim=claim, release=release_key)
    assert session_statements(embassy, SEAL_V2) == []
    assert not seal.closed


def test_a_refusal_in_the_release_aborts_with_its_code(
    embassy: Embassy, seal: MemorySeal, clock: Clock
) -> None:
    def release(session: bytes) -> bytes:
        raise BadPayloadError("actions do not open")

    with pytest.raises(BadPayloadError):
        manager(embassy, seal, clock).open(60, release=release)
    assert [b["reason"] for b in session_statements(embassy, SESSION_ABORT_V2)] == [
        "refused:bad-payload"
    ]
    assert not seal.closed


def test_the_reaper_cannot_unseal_between_the_check_and_the_release(
    embassy: Embassy, seal: MemorySeal, clock: Clock
) -> None:
    m = manager(embassy, seal, clock)
    events: list[str] = []
    in_release = threading.Event()

    def release(session: bytes) -> bytes:
        in_release.set()
        clock.t += MIN_DEADLINE_SECONDS + 1  # the deadline passes while the key is going out
        time.sleep(0.2)  # ... and the reaper runs meanwhile, on its own thread
        events.append(f"released sealed={seal.closed}")
        return b"k"

    def reaper() -> None:
        in_release.wait(5)
        m.abort_expired()
        events.append(f"reaped sealed={seal.closed}")

    thread = threading.Thread(target=reaper)
    thread.start()
    m.open(MIN_DEADLINE_SECONDS, release=release)
    thread.join(5)
    assert events == ["released sealed=True", "reaped sealed=False"]


def test_an_intrusion_aborts_every_session_and_a_quarantine_keeps_the_gate_closed(
    embassy: Embassy, seal: MemorySeal, clock: Clock
) -> None:
    m = manager(embassy, seal, clock)
    a, b = m.open(60, release=release_key), m.open(60, release=release_key)
    seal.quarantined = True
    assert m.abort_all("intrusion") == 2
    gates = [body["gate"] for body in session_statements(embassy, SESSION_ABORT_V2)]
    assert gates == ["still-sealed", "quarantined"]
    assert seal.closed
    with pytest.raises(ConflictError, match="aborted"):
        m.close(a.session, a.token, None)
    del b


# -- crashes: the log alone tells the restart what was open ------------------------------


def _restart(
    make_embassy: EmbassyFactory, tpm: FakeTpm, embassy: Embassy, seal: MemorySeal, clock: Clock
) -> tuple[Embassy, SessionManager, dict[str, Any]]:
    make_embassy.crash(embassy)
    restarted = make_embassy(tpm)
    m = manager(restarted, seal, clock)
    return restarted, m, m.reconcile()


def test_crash_after_the_gate_closed_but_before_the_statement_reopens_it(
    make_embassy: EmbassyFactory, tpm: FakeTpm, seal: MemorySeal, clock: Clock
) -> None:
    embassy = make_embassy(tpm)
    with pytest.raises(Crash):
        manager(embassy, seal, clock, crash_at="seal:before-statement").open(
            60, release=release_key
        )
    assert seal.closed
    _, _, report = _restart(make_embassy, tpm, embassy, seal, clock)
    assert report["open_sessions"] == 0
    assert not seal.closed, "no session was ever stated, no token left: nothing to keep sealed"


def test_crash_after_the_seal_statement_keeps_the_session_and_its_token(
    make_embassy: EmbassyFactory, tpm: FakeTpm, seal: MemorySeal, clock: Clock
) -> None:
    embassy = make_embassy(tpm)
    first = manager(embassy, seal, clock)
    opened = first.open(60, release=release_key)
    seal.closed = False  # someone opened the gate while the daemon was down
    restarted, m, report = _restart(make_embassy, tpm, embassy, seal, clock)
    assert seal.closed, "an open session in the log is resealed first"
    assert report["open_sessions"] == 1
    assert statement(restarted.log.entries[-1].data)[0] == LIFECYCLE_V1
    # The token is derived, not stored: the holder closes it after the restart.
    m.close(opened.session, opened.token, None)
    assert not seal.closed


def test_crash_after_the_unseal_statement_answers_a_retry_with_it(
    make_embassy: EmbassyFactory, tpm: FakeTpm, seal: MemorySeal, clock: Clock
) -> None:
    embassy = make_embassy(tpm)
    first = manager(embassy, seal, clock, crash_at="unseal:after-statement")
    opened = first.open(60, release=release_key)
    with pytest.raises(Crash):
        first.close(opened.session, opened.token, None)
    assert seal.closed, "stated, not yet opened: still sealed"
    restarted, m, report = _restart(make_embassy, tpm, embassy, seal, clock)
    assert report["open_sessions"] == 0
    assert not seal.closed
    [unseal] = [
        e.data
        for e in restarted.log.entries
        if e.type is EntryType.STATEMENT and statement(e.data)[0] == UNSEAL_V2
    ]
    assert m.close(opened.session, opened.token, None) == unseal


def test_a_deadline_that_passed_while_the_daemon_was_down_aborts_at_restart(
    make_embassy: EmbassyFactory, tpm: FakeTpm, seal: MemorySeal, clock: Clock
) -> None:
    embassy = make_embassy(tpm)
    opened = manager(embassy, seal, clock).open(30, release=release_key)
    clock.t += 31
    restarted, m, report = _restart(make_embassy, tpm, embassy, seal, clock)
    assert report["open_sessions"] == 0
    assert not seal.closed
    [abort] = session_statements(restarted, SESSION_ABORT_V2)
    assert abort["reason"] == "deadline-passed-while-down"
    with pytest.raises(ConflictError):
        m.close(opened.session, opened.token, None)


def test_an_unknown_session_with_a_valid_token_is_not_found(
    embassy: Embassy, seal: MemorySeal, clock: Clock
) -> None:
    m = manager(embassy, seal, clock)
    session = b"\x07" * 16
    with pytest.raises(NotFoundError):
        m.close(session, m._token(session), None)


def test_the_log_restores_claims_the_replay_store_lost(
    embassy: Embassy, seal: MemorySeal, clock: Clock, tmp_path: Path
) -> None:
    """A claim is not fsync'd on its own: the seal statement naming the payload is its
    durable witness, and a store that lost it (a power cut) gets it back at start."""
    from embassy.sessions.manager import opened_payloads
    from embassy.sessions.replay import ReplayStore

    payload = b"\\x42" * 16
    opened = manager(embassy, seal, clock).open(60, payload_id=payload, release=release_key)
    store = ReplayStore(tmp_path / "empty.sqlite")  # what survived: nothing
    try:
        assert store.remember(opened_payloads(embassy.log)) == 1
        assert store.remember(opened_payloads(embassy.log)) == 0  # idempotent
        with pytest.raises(PayloadReplayedError, match=opened.session.hex()):
            store.check(payload)
        store.check(b"\\x43" * 16)  # another payload still opens
    finally:
        store.close()
