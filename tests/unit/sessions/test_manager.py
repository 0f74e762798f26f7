"""The session manager's ordering and crash recovery, on FakeTpm and an in-memory firewall.

The real netfilter seal is tested from the attacker's side in tests/integration; here the
firewall only records the state so every crash point can be replayed quickly.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from embassy.daemon.runtime import Embassy
from embassy.errors import ConflictError, ForbiddenError, NotFoundError, RequestError
from embassy.log.entry import EntryType
from embassy.seal.firewall import SealState
from embassy.seal.rules import seal_rules
from embassy.sessions.manager import SessionManager, WorkloadIdentity
from embassy.wire.dsse import parse_envelope
from embassy.wire.statement import (
    LIFECYCLE_V1,
    SEAL_V1,
    SESSION_ABORT_V1,
    UNSEAL_V1,
    parse_statement,
)
from tests.fakes import FakeTpm, MemoryFirewall
from tests.unit.conftest import EmbassyFactory

NETNS = Path("/proc/1/ns/net")
WORKLOAD = WorkloadIdentity("sha256:" + "ab" * 32, "c0ffee", "h01d", bytes(32))


State = SealState
RULES = seal_rules()


class Crash(Exception):
    pass


class Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


def manager(
    embassy: Embassy, firewall: MemoryFirewall, clock: Clock, crash_at: str | None = None
) -> SessionManager:
    m = SessionManager(
        journal_path=embassy.config.data_dir / "seal-journal.jsonl",
        firewall=firewall,
        netns=lambda: NETNS,
        log=embassy.log,
        workload=WORKLOAD,
        now=clock,
    )
    if crash_at is not None:

        def point(name: str) -> None:
            if name == crash_at:
                raise Crash(name)

        m._point = point  # type: ignore[method-assign]
    return m


def statement(envelope: bytes) -> tuple[str, dict[str, object]]:
    s = parse_statement(parse_envelope(envelope).payload)
    return s.predicate_type, dict(s.body)


@pytest.fixture
def firewall() -> MemoryFirewall:
    return MemoryFirewall()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_open_seals_before_the_statement_and_close_unseals(
    embassy: Embassy, firewall: MemoryFirewall, clock: Clock
) -> None:
    m = manager(embassy, firewall, clock)
    opened = m.open(60)
    assert firewall.current is State.SEALED
    kind, body = statement(opened.envelope)
    assert kind == SEAL_V1
    assert body["session"] == opened.session.hex()
    assert body["seal"] == {
        "rules_sha256": RULES.digest,
        "backend": "iptables-legacy-netns",
    }
    assert body["workload"] == WORKLOAD.to_json()
    unseal = m.close(opened.session, opened.token, hashlib.sha256(b"out").digest())
    kind, body = statement(unseal)
    assert kind == UNSEAL_V1
    assert body["firewall"] == "unsealed"
    assert body["output_sha256"] == hashlib.sha256(b"out").hexdigest()
    assert body["seal_statement_sha256"] == hashlib.sha256(opened.envelope).hexdigest()
    assert firewall.current is State.UNSEALED


def test_only_the_token_holder_closes(
    embassy: Embassy, firewall: MemoryFirewall, clock: Clock
) -> None:
    m = manager(embassy, firewall, clock)
    opened = m.open(60)
    with pytest.raises(ForbiddenError, match="does not hold the session"):
        m.close(opened.session, b"\x00" * 32, None)
    with pytest.raises(NotFoundError):
        m.close(b"\x01" * 16, opened.token, None)
    assert firewall.current is State.SEALED
    m.close(opened.session, opened.token, None)
    with pytest.raises(ConflictError, match="already closed"):
        m.close(opened.session, opened.token, None)
    with pytest.raises(RequestError):
        m.open(0)


def test_stays_sealed_until_the_last_session_closes(
    embassy: Embassy, firewall: MemoryFirewall, clock: Clock
) -> None:
    m = manager(embassy, firewall, clock)
    a, b = m.open(60), m.open(60)
    assert statement(m.close(a.session, a.token, None))[1]["firewall"] == "still-sealed"
    assert firewall.current is State.SEALED
    assert statement(m.close(b.session, b.token, None))[1]["firewall"] == "unsealed"
    assert firewall.current is State.UNSEALED


def test_a_session_past_its_deadline_is_aborted_with_a_statement(
    embassy: Embassy, firewall: MemoryFirewall, clock: Clock
) -> None:
    m = manager(embassy, firewall, clock)
    short, long_ = m.open(5), m.open(600)
    clock.t += 6
    assert m.abort_expired() == 1
    assert firewall.current is State.SEALED, "the other session still needs the seal"
    with pytest.raises(ConflictError, match="aborted"):
        m.close(short.session, short.token, None)
    aborts = [
        statement(e.data)
        for e in embassy.log.entries
        if e.data and b"session-abort" in parse_envelope(e.data).payload
    ]
    assert [a[1]["session"] for a in aborts] == [short.session.hex()]
    m.close(long_.session, long_.token, None)
    assert firewall.current is State.UNSEALED


@pytest.mark.parametrize(
    ("point", "expect_abort"),
    [("seal:after-intent", True), ("seal:after-rules", True), ("seal:after-statement", True)],
)
def test_crash_while_opening_reseals_then_aborts_on_restart(
    make_embassy: EmbassyFactory,
    tpm: FakeTpm,
    firewall: MemoryFirewall,
    clock: Clock,
    point: str,
    expect_abort: bool,
) -> None:
    embassy = make_embassy(tpm)
    with pytest.raises(Crash):
        manager(embassy, firewall, clock, crash_at=point).open(60)
    make_embassy.crash(embassy)
    firewall.current = State.UNSEALED if point == "seal:after-intent" else firewall.current
    restarted = make_embassy(tpm)
    report = manager(restarted, firewall, clock).reconcile()
    # The firewall was sealed again before anything else, then the half-open session (whose
    # token never left the daemon) was aborted and the last seal lifted.
    assert firewall.history[-2:] == ["seal", "unseal"]
    assert report["open_sessions"] == 0
    assert any(a.startswith("aborted") for a in report["actions"]) is expect_abort


def test_crash_after_close_before_unseal_is_finished_on_restart(
    make_embassy: EmbassyFactory, tpm: FakeTpm, firewall: MemoryFirewall, clock: Clock
) -> None:
    embassy = make_embassy(tpm)
    first = manager(embassy, firewall, clock, crash_at="unseal:after-intent")
    opened = first.open(60)
    with pytest.raises(Crash):
        first.close(opened.session, opened.token, None)
    assert firewall.current is State.SEALED
    make_embassy.crash(embassy)
    restarted = make_embassy(tpm)
    report = manager(restarted, firewall, clock).reconcile()
    assert firewall.current is State.UNSEALED
    assert report["actions"] == [f"ended {opened.session.hex()}"]
    assert report["problems"] == []
    # The signed log, too, shows the session ended: no seal statement is left dangling.
    ends = [
        statement(e.data)[1]
        for e in restarted.log.entries
        if e.type is EntryType.STATEMENT and statement(e.data)[0] == SESSION_ABORT_V1
    ]
    assert [(b["session"], b["reason"]) for b in ends] == [
        (opened.session.hex(), "ended before its statement was issued")
    ]


def test_a_kernel_unsealed_behind_an_open_session_is_resealed_and_reported(
    make_embassy: EmbassyFactory, tpm: FakeTpm, firewall: MemoryFirewall, clock: Clock
) -> None:
    embassy = make_embassy(tpm)
    opened = manager(embassy, firewall, clock).open(60)
    make_embassy.crash(embassy)
    firewall.current = State.UNSEALED  # someone flushed the rules while the daemon was down
    restarted = make_embassy(tpm)
    m = manager(restarted, firewall, clock)
    report = m.reconcile()
    assert firewall.current is State.SEALED
    assert report["problems"] == ["kernel was unsealed while sessions were open: resealed"]
    assert statement(restarted.log.entries[-1].data)[0] == LIFECYCLE_V1
    m.close(opened.session, opened.token, None)  # the holder can still close it
    assert firewall.current is State.UNSEALED


def test_a_lost_journal_does_not_unseal_a_session_the_log_shows_open(
    make_embassy: EmbassyFactory, tpm: FakeTpm, firewall: MemoryFirewall, clock: Clock
) -> None:
    embassy = make_embassy(tpm)
    manager(embassy, firewall, clock).open(60)
    make_embassy.crash(embassy)
    (embassy.config.data_dir / "seal-journal.jsonl").unlink()  # the host deletes it
    restarted = make_embassy(tpm)
    m = manager(restarted, firewall, clock)
    report = m.reconcile()
    assert firewall.current is State.SEALED
    assert report["problems"][0].startswith("journal lost open session")
    clock.t += 61  # ... until the deadline signed in its seal statement
    assert m.abort_expired() == 1
    assert firewall.current is State.UNSEALED
    kinds = [statement(e.data)[0] for e in restarted.log.entries if e.type is EntryType.STATEMENT]
    assert SESSION_ABORT_V1 in kinds
