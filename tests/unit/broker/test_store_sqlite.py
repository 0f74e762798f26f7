"""SqliteStore: the broker's default store. Nonces open once; the decision log is a chain
that threads and processes extend without forking, and that outlives the process."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from embassy.broker.decision_log import parse_entry, verify_decision_log
from embassy.broker.store import SWEEP_AFTER_S, NonceState, SqliteStore
from embassy.errors import DecisionLogError, StorageError, WireFormatError

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
PUBLIC = KEY.public_key()
ROOT = Path(__file__).resolve().parents[3]
T0 = 1_780_000_000


def decision(i: int, who: str = "t") -> dict[str, Any]:
    return {
        "decision_id": f"{who}-{i}",
        "time_unix": T0 + i,
        "decision": "deny",
        "reason": "unknown-model",
        "model_id": "minilm",
        "key_id": "k1",
        "tenant": "acme",
        "operation": "decrypt-for-load",
        "request_sha256": hashlib.sha256(f"{who}{i}".encode()).hexdigest(),
        "embassy_keyid": None,
        "policy_sha256": None,
        "input_sha256": None,
    }


def nonce(i: int) -> bytes:
    return hashlib.sha256(b"nonce%d" % i).digest()


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = SqliteStore(tmp_path / "broker.db")
    yield s
    s.close()


# -- nonces -------------------------------------------------------------------------------------


def test_a_nonce_is_taken_once(store: SqliteStore) -> None:
    store.issue_nonce(nonce(1), T0 + 60)
    assert store.take_nonce(nonce(1), T0) is NonceState.OK
    assert store.take_nonce(nonce(1), T0) is NonceState.USED
    assert store.take_nonce(nonce(1), T0 + 1) is NonceState.USED


def test_an_unknown_nonce_is_unknown(store: SqliteStore) -> None:
    assert store.take_nonce(nonce(2), T0) is NonceState.UNKNOWN
    assert store.take_nonce(b"", T0) is NonceState.UNKNOWN
    assert store.take_nonce(b"x" * 1000, T0) is NonceState.UNKNOWN


def test_an_expired_nonce_is_refused_and_stays_refused(store: SqliteStore) -> None:
    store.issue_nonce(nonce(1), T0 + 60)
    assert store.take_nonce(nonce(1), T0 + 61) is NonceState.EXPIRED
    # Still not takeable by someone whose clock is behind the first caller's.
    assert store.take_nonce(nonce(1), T0 + 61) is NonceState.EXPIRED
    store.issue_nonce(nonce(2), T0 + 60)
    assert store.take_nonce(nonce(2), T0 + 60) is NonceState.OK  # the last second counts


def test_expired_nonces_are_swept_after_a_while(store: SqliteStore) -> None:
    store.issue_nonce(nonce(1), T0)
    store.issue_nonce(nonce(2), T0 + 10 * SWEEP_AFTER_S)
    assert store.take_nonce(nonce(1), T0 + SWEEP_AFTER_S) is NonceState.EXPIRED
    assert store.take_nonce(nonce(3), T0 + SWEEP_AFTER_S + 1) is NonceState.UNKNOWN
    assert store.take_nonce(nonce(1), T0 + SWEEP_AFTER_S + 1) is NonceState.UNKNOWN  # gone
    assert store.take_nonce(nonce(2), T0 + SWEEP_AFTER_S + 1) is NonceState.OK  # kept
    store.issue_nonce(nonce(4), T0)
    assert store.sweep_nonces(T0 + SWEEP_AFTER_S + 1) == 1


def test_a_nonce_is_issued_once_and_must_look_like_one(store: SqliteStore) -> None:
    store.issue_nonce(nonce(1), T0)
    with pytest.raises(StorageError, match="already issued"):
        store.issue_nonce(nonce(1), T0 + 5)
    with pytest.raises(WireFormatError, match="nonce"):
        store.issue_nonce(b"short", T0)
    with pytest.raises(WireFormatError, match="expires_unix"):
        store.issue_nonce(nonce(2), -1)


def test_racing_threads_take_a_nonce_once(tmp_path: Path) -> None:
    path = tmp_path / "broker.db"
    stores = [SqliteStore(path) for _ in range(4)]
    for i in range(50):
        stores[0].issue_nonce(nonce(i), T0 + 60)
    results: list[tuple[int, NonceState]] = []
    lock = threading.Lock()
    start = threading.Barrier(len(stores))

    def take(s: SqliteStore) -> None:
        start.wait()
        for i in range(50):
            state = s.take_nonce(nonce(i), T0)
            with lock:
                results.append((i, state))

    threads = [threading.Thread(target=take, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in stores:
        s.close()
    ok = sorted(i for i, state in results if state is NonceState.OK)
    assert ok == list(range(50))
    assert {state for _, state in results} == {NonceState.OK, NonceState.USED}


# -- the decision log ---------------------------------------------------------------------------


def test_appends_chain_and_verify(store: SqliteStore) -> None:
    logged = [store.append_decision(decision(i), KEY.sign) for i in range(5)]
    assert [e.seq for e in logged] == [1, 2, 3, 4, 5]
    assert store.decisions() == logged
    assert store.decisions(from_seq=3) == logged[2:]
    assert store.decisions(from_seq=2, limit=2) == logged[1:3]
    assert store.head() == logged[-1]
    verify_decision_log(store.decisions(), PUBLIC)
    verify_decision_log(store.decisions(4), PUBLIC, after=logged[2])
    assert parse_entry(logged[3].entry).decision == decision(3)


def test_an_empty_log(store: SqliteStore) -> None:
    assert store.decisions() == []
    assert store.head() is None


def test_the_log_outlives_the_store(tmp_path: Path) -> None:
    path = tmp_path / "broker.db"
    with SqliteStore(path) as first:
        before = [first.append_decision(decision(i), KEY.sign) for i in range(3)]
    with SqliteStore(path) as again:
        assert again.decisions() == before
        after = again.append_decision(decision(3), KEY.sign)
        assert after.seq == 4
        verify_decision_log(again.decisions(), PUBLIC)


def test_an_append_is_durable_when_it_returns(tmp_path: Path) -> None:
    """A process killed the instant append_decision returns has its entry on disk."""
    path = tmp_path / "broker.db"
    code = (
        "import os, signal, sys\n"
        "from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey\n"
        "from embassy.broker.store import SqliteStore\n"
        "from test_store_sqlite import decision\n"
        "s = SqliteStore(sys.argv[1])\n"
        "k = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))\n"
        "e = s.append_decision(decision(7), k.sign)\n"
        "print(e.seq, e.digest.hex(), flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": f"{Path(__file__).parent}:{ROOT}"},
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    seq, digest = proc.stdout.split()
    with SqliteStore(path) as store:
        (entry,) = store.decisions()
        assert (entry.seq, entry.digest.hex()) == (int(seq), digest)
        assert store._conn().execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_a_failed_signature_or_decision_stores_nothing(store: SqliteStore) -> None:
    def broken(_data: bytes) -> bytes:
        raise RuntimeError("signer down")

    with pytest.raises(RuntimeError, match="signer down"):
        store.append_decision(decision(0), broken)
    with pytest.raises(WireFormatError, match="reason"):
        store.append_decision(decision(0) | {"reason": None}, KEY.sign)
    assert store.decisions() == []
    assert store.append_decision(decision(0), KEY.sign).seq == 1


def test_threads_sharing_a_store_or_not_never_fork_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "broker.db"
    shared = SqliteStore(path)
    own = [SqliteStore(path) for _ in range(3)]
    users = [shared, shared, shared, *own]
    start = threading.Barrier(len(users))
    errors: list[BaseException] = []

    def append(s: SqliteStore, who: int) -> None:
        start.wait()
        try:
            for i in range(20):
                s.append_decision(decision(i, f"w{who}"), KEY.sign)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=append, args=(s, n)) for n, s in enumerate(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    log = shared.decisions()
    assert [e.seq for e in log] == list(range(1, 6 * 20 + 1))
    verify_decision_log(log, PUBLIC)
    ids = {parse_entry(e.entry).decision["decision_id"] for e in log}
    assert len(ids) == 6 * 20
    for s in (shared, *own):
        s.close()


WORKER = """
import sys, time, pathlib, json
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from embassy.broker.store import SqliteStore, NonceState
from test_store_sqlite import decision, nonce, T0
path, who, n, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), pathlib.Path(sys.argv[4])
key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
store = SqliteStore(path)
(go.parent / f"ready-{who}").touch()
while not go.exists():
    time.sleep(0.002)
taken = []
for i in range(n):
    store.append_decision(decision(i, who), key.sign)
    if store.take_nonce(nonce(i), T0) is NonceState.OK:
        taken.append(i)
    time.sleep(0.001)  # SQLite's busy wait backs off: let the other writer in
store.close()
print(json.dumps(taken))
"""


def test_two_processes_append_and_take_nonces_without_forking(tmp_path: Path) -> None:
    path = tmp_path / "broker.db"
    n = 150
    with SqliteStore(path) as store:
        for i in range(n):
            store.issue_nonce(nonce(i), T0 + 60)
    go = tmp_path / "go"
    here = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": f"{here}:{ROOT}"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(path), who, str(n), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for who in ("a", "b")
    ]
    _start_together(tmp_path, go, procs)
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    taken = [json.loads(out) for out, _ in outs]
    assert sorted(taken[0] + taken[1]) == list(range(n))  # each nonce exactly once
    with SqliteStore(path) as store:
        log = store.decisions()
    assert [e.seq for e in log] == list(range(1, 2 * n + 1))
    verify_decision_log(log, PUBLIC)
    # They did run at the same time: their entries interleave.
    owners = [parse_entry(e.entry).decision["decision_id"][0] for e in log]
    assert sum(a != b for a, b in itertools.pairwise(owners)) > 1


def _start_together(tmp_path: Path, go: Path, procs: list[subprocess.Popen[str]]) -> None:
    """Wait until every worker has opened its store, then let them all go."""
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready-{who}").exists() for who in ("a", "b")):
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(p.communicate()[1])
        assert time.monotonic() < deadline, "workers did not start"
        time.sleep(0.01)
    go.touch()


# -- the file -----------------------------------------------------------------------------------


def test_the_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "broker.db"
    path.touch(mode=0o644)
    os.chmod(path, 0o644)
    with SqliteStore(path) as store:
        store.append_decision(decision(0), KEY.sign)
        for p in tmp_path.iterdir():
            assert stat.S_IMODE(p.stat().st_mode) == 0o600, p


def test_a_symlink_or_a_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real.db").touch()
    (tmp_path / "link.db").symlink_to(tmp_path / "real.db")
    with pytest.raises(StorageError, match=r"link\.db"):
        SqliteStore(tmp_path / "link.db")
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(StorageError, match=r"dir\.db"):
        SqliteStore(tmp_path / "dir.db")


def test_another_sqlite_file_or_schema_version_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE t (x)")
    db.close()
    with pytest.raises(StorageError, match="not a broker store"):
        SqliteStore(other)
    path = tmp_path / "broker.db"
    SqliteStore(path).close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 2")
    db.close()
    with pytest.raises(StorageError, match="schema version 2"):
        SqliteStore(path)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(StorageError, match=r"junk\.db"):
        SqliteStore(junk)


def test_the_log_refuses_updates_and_deletes_through_sqlite(store: SqliteStore) -> None:
    store.append_decision(decision(0), KEY.sign)
    db = sqlite3.connect(store.path)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("UPDATE decisions SET entry = x'00'")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("DELETE FROM decisions")
    db.close()


def test_a_row_edited_in_the_file_is_caught_by_the_verifier(store: SqliteStore) -> None:
    """The attacker has the file: drops the guard, rewrites a denial as an allow-looking
    entry and fixes the stored digest. The signature and the chain give it away."""
    for i in range(3):
        store.append_decision(decision(i), KEY.sign)
    db = sqlite3.connect(store.path)
    db.execute("DROP TRIGGER decisions_append_only_update")
    (entry,) = db.execute("SELECT entry FROM decisions WHERE seq = 2").fetchone()
    forged = entry.replace(b'"tenant":"acme"', b'"tenant":"evil"')
    db.execute(
        "UPDATE decisions SET entry = ?, digest = ? WHERE seq = 2",
        (forged, hashlib.sha256(forged).digest()),
    )
    db.commit()
    db.close()
    with pytest.raises(DecisionLogError) as info:
        verify_decision_log(store.decisions(), PUBLIC)
    assert info.value.reason == "signature"
    assert "seq 2" in info.value.message


def test_a_row_deleted_in_the_file_is_a_gap(store: SqliteStore) -> None:
    for i in range(3):
        store.append_decision(decision(i), KEY.sign)
    db = sqlite3.connect(store.path)
    db.execute("DROP TRIGGER decisions_append_only_delete")
    db.execute("DELETE FROM decisions WHERE seq = 2")
    db.commit()
    db.close()
    with pytest.raises(DecisionLogError) as info:
        verify_decision_log(store.decisions(), PUBLIC)
    assert info.value.reason == "gap"


def test_a_closed_store_says_so(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path / "b.db")
    s.close()
    s.close()
    with pytest.raises(StorageError, match="closed"):
        s.append_decision(decision(0), KEY.sign)
