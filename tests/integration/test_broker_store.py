"""PostgresStore against a real PostgreSQL: the broker's store when several replicas serve
one fleet. Replicas (separate processes) append and take nonces at once: every nonce is
taken exactly once, no seq is written twice, the chain verifies; and a row changed directly
in the database is caught by the verifier."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from embassy.broker.decision_log import parse_entry, verify_decision_log
from embassy.broker.store import SWEEP_AFTER_S, NonceState
from embassy.broker.store_pg import PostgresStore
from embassy.errors import DecisionLogError, StorageError
from tests.integration.postgres import PostgresServer

pytestmark = pytest.mark.integration

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
PUBLIC = KEY.public_key()
ROOT = Path(__file__).resolve().parents[2]
T0 = 1_780_000_000


def decision(i: int, who: str = "t") -> dict[str, Any]:
    allow = i % 3 == 0
    return {
        "decision_id": f"{who}-{i}",
        "time_unix": T0 + i,
        "decision": "allow" if allow else "deny",
        "reason": None if allow else "measurement-mismatch",
        "model_id": "minilm",
        "key_id": "k1",
        "tenant": "acme",
        "operation": "decrypt-for-load",
        "request_sha256": hashlib.sha256(f"{who}{i}".encode()).hexdigest(),
        "embassy_keyid": "ab" * 32 if allow else None,
        "policy_sha256": "cd" * 32 if allow else None,
        "input_sha256": "ef" * 32 if allow else None,
    }


def nonce(i: int) -> bytes:
    return hashlib.sha256(b"nonce%d" % i).digest()


@pytest.fixture
def dsn(postgres_server: PostgresServer) -> str:
    return postgres_server.create_database()


@pytest.fixture
def store(dsn: str) -> Iterator[PostgresStore]:
    s = PostgresStore(dsn)
    yield s
    s.close()


def test_nonces_once_expired_unknown(store: PostgresStore) -> None:
    store.issue_nonce(nonce(1), T0 + 60)
    store.issue_nonce(nonce(2), T0 + 60)
    assert store.take_nonce(nonce(1), T0) is NonceState.OK
    assert store.take_nonce(nonce(1), T0) is NonceState.USED
    assert store.take_nonce(nonce(2), T0 + 61) is NonceState.EXPIRED
    assert store.take_nonce(nonce(3), T0) is NonceState.UNKNOWN
    assert store.take_nonce(b"short", T0) is NonceState.UNKNOWN
    with pytest.raises(StorageError, match="already issued"):
        store.issue_nonce(nonce(1), T0 + 600)
    # Long expired: swept, then unknown (refused either way).
    assert store.take_nonce(nonce(9), T0 + 60 + SWEEP_AFTER_S + 1) is NonceState.UNKNOWN
    assert store.take_nonce(nonce(2), T0 + 60 + SWEEP_AFTER_S + 1) is NonceState.UNKNOWN


def test_appends_chain_verify_and_outlive_the_connection(dsn: str) -> None:
    with PostgresStore(dsn) as first:
        assert first.decisions() == []
        assert first.head() is None
        logged = [first.append_decision(decision(i), KEY.sign) for i in range(4)]
    assert [e.seq for e in logged] == [1, 2, 3, 4]
    with PostgresStore(dsn) as again:
        assert again.decisions() == logged
        assert again.decisions(3) == logged[2:]
        assert again.decisions(2, limit=1) == logged[1:2]
        assert again.head() == logged[-1]
        logged.append(again.append_decision(decision(4), KEY.sign))
        verify_decision_log(again.decisions(), PUBLIC)
        verify_decision_log(again.decisions(5), PUBLIC, after=logged[3])


def test_a_failed_signer_stores_nothing(store: PostgresStore) -> None:
    def broken(_data: bytes) -> bytes:
        raise RuntimeError("signer down")

    with pytest.raises(RuntimeError):
        store.append_decision(decision(0), broken)
    assert store.decisions() == []
    assert store.append_decision(decision(0), KEY.sign).seq == 1


def test_replicas_starting_together_create_the_schema_once(dsn: str) -> None:
    stores: list[PostgresStore] = []
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def open_one() -> None:
        start.wait()
        try:
            stores.append(PostgresStore(dsn))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for s in stores:
        s.close()


def test_another_schema_version_is_refused(dsn: str) -> None:
    PostgresStore(dsn).close()
    with psycopg.connect(dsn, autocommit=True) as db:
        db.execute("UPDATE embassy_broker.meta SET value = '2' WHERE key = 'schema_version'")
    with pytest.raises(StorageError, match="schema version 2"):
        PostgresStore(dsn)


def test_an_unreachable_server_is_a_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="cannot connect"):
        PostgresStore(f"host={tmp_path} dbname=x user=postgres", connect_timeout_s=2)


WORKER = """
import json, pathlib, sys, time
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from embassy.broker.store import NonceState
from embassy.broker.store_pg import PostgresStore
from tests.integration.test_broker_store import T0, decision, nonce
dsn, who, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
ready, go = pathlib.Path(sys.argv[4]), pathlib.Path(sys.argv[5])
key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
store = PostgresStore(dsn)
ready.touch()
while not go.exists():
    time.sleep(0.002)
taken = []
for i in range(n):
    store.append_decision(decision(i, who), key.sign)
    if store.take_nonce(nonce(i), T0) is NonceState.OK:
        taken.append(i)
store.close()
print(json.dumps(taken))
"""


def test_replicas_append_and_take_nonces_concurrently(dsn: str, tmp_path: Path) -> None:
    replicas, n = ("a", "b", "c"), 120
    with PostgresStore(dsn) as store:
        for i in range(n):
            store.issue_nonce(nonce(i), T0 + 60)
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = {
        who: subprocess.Popen(
            [sys.executable, "-c", WORKER, dsn, who, str(n), str(tmp_path / who), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        for who in replicas
    }
    deadline = time.monotonic() + 60
    while not all((tmp_path / who).exists() for who in replicas):
        for p in procs.values():
            if p.poll() is not None:
                raise AssertionError(p.communicate()[1])
        assert time.monotonic() < deadline, "replicas did not start"
        time.sleep(0.01)
    go.touch()
    taken: list[int] = []
    for p in procs.values():
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        taken += json.loads(out)
    assert sorted(taken) == list(range(n))  # every nonce taken, none twice

    with PostgresStore(dsn) as store:
        log = store.decisions()
    seqs = [e.seq for e in log]
    assert seqs == list(range(1, len(replicas) * n + 1))  # no seq repeated or skipped
    verify_decision_log(log, PUBLIC)
    owners = [parse_entry(e.entry).decision["decision_id"].split("-")[0] for e in log]
    assert sorted(owners) == sorted(w for w in replicas for _ in range(n))
    # They ran at the same time: their entries interleave.
    assert sum(a != b for a, b in itertools.pairwise(owners)) > len(replicas)


def test_the_log_refuses_updates_deletes_and_truncation_through_sql(
    store: PostgresStore, dsn: str
) -> None:
    store.append_decision(decision(0), KEY.sign)
    with psycopg.connect(dsn, autocommit=True) as db:
        for statement in (
            "UPDATE embassy_broker.decisions SET entry = '\\x00'",
            "DELETE FROM embassy_broker.decisions",
            "TRUNCATE embassy_broker.decisions",
        ):
            with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
                db.execute(statement.encode())
    assert len(store.decisions()) == 1


def _as_owner(dsn: str, *statements: tuple[str, tuple[Any, ...]]) -> None:
    """What someone with the database's owner rights can do: lift the guard, edit rows."""
    with psycopg.connect(dsn) as db:
        db.execute(b"ALTER TABLE embassy_broker.decisions DISABLE TRIGGER decisions_append_only")
        for sql, args in statements:
            db.execute(sql.encode(), args)


def test_a_row_altered_in_the_database_is_caught(store: PostgresStore, dsn: str) -> None:
    for i in range(4):
        store.append_decision(decision(i), KEY.sign)
    (victim,) = store.decisions(2, limit=1)
    forged = victim.entry.replace(b'"tenant":"acme"', b'"tenant":"evil"')
    assert forged != victim.entry
    _as_owner(
        dsn,
        (
            "UPDATE embassy_broker.decisions SET entry = %s, digest = %s WHERE seq = 2",
            (forged, hashlib.sha256(forged).digest()),
        ),
    )
    with pytest.raises(DecisionLogError) as info:
        verify_decision_log(store.decisions(), PUBLIC)
    assert info.value.reason == "signature"
    assert "seq 2" in info.value.message


def test_a_row_deleted_in_the_database_is_a_gap(store: PostgresStore, dsn: str) -> None:
    for i in range(3):
        store.append_decision(decision(i), KEY.sign)
    _as_owner(dsn, ("DELETE FROM embassy_broker.decisions WHERE seq = 2", ()))
    with pytest.raises(DecisionLogError) as info:
        verify_decision_log(store.decisions(), PUBLIC)
    assert info.value.reason == "gap"


def test_an_entry_replayed_over_another_is_caught(store: PostgresStore, dsn: str) -> None:
    """A validly signed old entry copied over a later one (its seq column kept)."""
    for i in range(3):
        store.append_decision(decision(i), KEY.sign)
    first = store.decisions(1, limit=1)[0]
    _as_owner(
        dsn,
        ("ALTER TABLE embassy_broker.decisions DROP CONSTRAINT decisions_digest_key", ()),
        (
            "UPDATE embassy_broker.decisions SET entry = %s, signature = %s, digest = %s "
            "WHERE seq = 3",
            (first.entry, first.signature, first.digest),
        ),
    )
    with pytest.raises(DecisionLogError) as info:
        verify_decision_log(store.decisions(), PUBLIC)
    assert info.value.reason == "changed"
    assert "says 1" in info.value.message


def test_a_head_whose_entry_vanished_stops_appends(store: PostgresStore, dsn: str) -> None:
    store.append_decision(decision(0), KEY.sign)
    _as_owner(dsn, ("DELETE FROM embassy_broker.decisions WHERE seq = 1", ()))
    with pytest.raises(StorageError, match="seq 1 is missing"):
        store.append_decision(decision(1), KEY.sign)


def test_the_test_server_is_unprivileged_and_has_no_tcp(postgres_server: PostgresServer) -> None:
    with psycopg.connect(postgres_server.dsn(), autocommit=True) as db:
        row = db.execute(b"SHOW listen_addresses").fetchone()
    assert row == ("",)
    status = Path(f"/proc/{postgres_server.proc.pid}/status").read_text()
    uid = next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))
    assert int(uid) != 0


def test_a_lost_connection_fails_one_call_and_the_next_reconnects(
    store: PostgresStore, dsn: str
) -> None:
    store.append_decision(decision(0), KEY.sign)
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(
            b"SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            b"WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    with pytest.raises(StorageError, match="PostgreSQL"):
        store.append_decision(decision(1), KEY.sign)
    logged = store.append_decision(decision(1), KEY.sign)
    assert logged.seq == 2
    verify_decision_log(store.decisions(), PUBLIC)
