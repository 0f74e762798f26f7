"""The registry on a real SQLite file: the stage/commit protocol, recovery, reads, nonces."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from embassy.errors import InstructionReplayedError, NotOwnerError, StorageError
from embassy.metering.registry import Meter, Registry, SignatureRow
from embassy.metering.score import Polarity, score

POS = Polarity.POSITIVE
NEG = Polarity.NEGATIVE
SESSION = "ab" * 16
ACT = "cd" * 32
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def reg(tmp_path: Path) -> Iterator[Registry]:
    with Registry.open(tmp_path / "registry.sqlite") as registry:
        yield registry


def sig(
    capability: str = "bio",
    authority: str = "aisi",
    polarity: Polarity = POS,
    vector: tuple[float, ...] = (1.0, 0.0),
    tensor: str = "layer.12",
) -> SignatureRow:
    return SignatureRow(capability, authority, polarity, tensor, np.array(vector))


def committed_signatures(reg: Registry, *rows: SignatureRow, seq: int = 1) -> str:
    batch = reg.stage_signatures(list(rows), session=SESSION)
    reg.commit(batch, seq)
    return batch


def test_staged_signatures_are_invisible_until_committed(reg: Registry) -> None:
    batch = reg.stage_signatures([sig(), sig(polarity=NEG, vector=(0.0, 1.0))], session=SESSION)
    assert len(batch) == 32
    assert reg.pending_batches() == [batch]
    assert reg.signature_set("layer.12", 2) is None
    assert reg.signature_counts("bio") == {POS: 0, NEG: 0}
    reg.commit(batch, 7)
    assert reg.pending_batches() == []
    sigs = reg.signature_set("layer.12", 2)
    assert sigs is not None
    assert sigs.size == 2
    assert score(sigs, np.array([1.0, 0.0])) == {"bio": 1_000_000}
    assert reg.signature_counts("bio") == {POS: 1, NEG: 1}
    assert reg.signature_set("layer.12", 3) is None
    assert reg.signature_set("layer.7", 2) is None


def test_an_update_moves_meters_only_at_commit(reg: Registry) -> None:
    committed_signatures(reg, sig(), sig("cyber", vector=(0.0, 1.0)))
    batch = reg.stage_update(SESSION, ACT, {"bio": 400_000, "cyber": 0})
    assert reg.meters("aisi") == []
    assert reg.history("bio") == []
    reg.commit(batch, 9)
    assert reg.meters("aisi") == [
        Meter("bio", "aisi", 400_000, 1, 9),
        Meter("cyber", "aisi", 0, 1, 9),
    ]
    (update,) = reg.history("bio")
    assert (update.batch, update.delta, update.session, update.activation_sha256) == (
        batch,
        400_000,
        SESSION,
        ACT,
    )
    assert update.statement_seq == 9
    assert update.authority == "aisi"


def test_meters_accumulate_across_batches_and_history_is_in_log_order(reg: Registry) -> None:
    committed_signatures(reg, sig())
    for seq, delta in [(10, 5), (11, 7), (14, 100)]:
        reg.commit(reg.stage_update(SESSION, ACT, {"bio": delta}), seq)
    assert reg.meters("aisi") == [Meter("bio", "aisi", 112, 3, 14)]
    assert [(u.delta, u.statement_seq) for u in reg.history("bio")] == [
        (5, 10),
        (7, 11),
        (100, 14),
    ]
    assert reg.meters("someone-else") == []


def test_commit_is_idempotent_and_refuses_unknown_or_contradicting(reg: Registry) -> None:
    committed_signatures(reg, sig())
    batch = reg.stage_update(SESSION, ACT, {"bio": 3})
    reg.commit(batch, 5)
    reg.commit(batch, 5)  # a retry: no-op
    assert reg.meters("aisi") == [Meter("bio", "aisi", 3, 1, 5)]
    with pytest.raises(StorageError, match="committed at seq 5, not 6"):
        reg.commit(batch, 6)
    with pytest.raises(StorageError, match="no batch"):
        reg.commit("00" * 16, 5)
    with pytest.raises(StorageError, match="cannot be discarded"):
        reg.discard(batch)


def test_discard_drops_a_pending_batch(reg: Registry) -> None:
    committed_signatures(reg, sig())
    batch = reg.stage_update(SESSION, ACT, {"bio": 3})
    reg.discard(batch)
    reg.discard(batch)  # unknown now: nothing to do
    assert reg.pending_batches() == []
    with pytest.raises(StorageError, match="no batch"):
        reg.commit(batch, 4)
    assert reg.meters("aisi") == []


def test_recover_commits_found_batches_and_discards_the_others(reg: Registry) -> None:
    committed_signatures(reg, sig())
    found_sig = reg.stage_signatures([sig("cyber", vector=(0.0, 1.0))], session=SESSION)
    lost_sig = reg.stage_signatures([sig("chem", vector=(1.0, 1.0))])
    later = reg.stage_update(SESSION, ACT, {"bio": 20})
    earlier = reg.stage_update(SESSION, ACT, {"bio": 10})
    lost = reg.stage_update(SESSION, ACT, {"bio": 1000})
    assert sorted(reg.pending_batches()) == sorted([found_sig, lost_sig, later, earlier, lost])
    result = reg.recover({found_sig: 3, later: 8, earlier: 6, "ff" * 16: 2})
    assert result.committed == (found_sig, earlier, later)  # in log order
    assert sorted(result.discarded) == sorted([lost_sig, lost])
    assert reg.pending_batches() == []
    assert reg.meters("aisi") == [Meter("bio", "aisi", 30, 2, 8)]
    assert reg.signature_counts("cyber") == {POS: 1, NEG: 0}
    assert reg.signature_counts("chem") == {POS: 0, NEG: 0}
    assert reg.recover({}).committed == ()


def test_a_newly_committed_signature_invalidates_the_cached_set(reg: Registry) -> None:
    committed_signatures(reg, sig())
    first = reg.signature_set("layer.12", 2)
    assert first is not None
    assert reg.signature_set("layer.12", 2) is first  # cached: SQLite is not read again
    other = reg.signature_set("layer.3", 2)
    pending = reg.stage_signatures([sig(polarity=NEG, vector=(1.0, 0.1))])
    assert reg.signature_set("layer.12", 2) is first  # pending rows change nothing
    reg.commit(pending, 2)
    second = reg.signature_set("layer.12", 2)
    assert second is not None
    assert second is not first
    assert second.size == 2
    assert score(second, np.array([1.0, 0.0]))["bio"] < 10_000
    assert reg.signature_set("layer.3", 2) is other  # another tensor's entry survives


def test_reopen_after_close_keeps_everything(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite"
    with Registry.open(path) as reg:
        committed_signatures(reg, sig(), sig(polarity=NEG, vector=(0.0, 1.0)))
        reg.commit(reg.stage_update(SESSION, ACT, {"bio": 42}), 3)
        pending = reg.stage_update(SESSION, ACT, {"bio": 1})
        reg.claim_nonce(b"\x01" * 16, "aisi", 2000, 1000)
    with Registry.open(path) as reg:
        assert reg.meters("aisi") == [Meter("bio", "aisi", 42, 1, 3)]
        assert reg.pending_batches() == [pending]
        assert reg.signature_counts("bio") == {POS: 1, NEG: 1}
        sigs = reg.signature_set("layer.12", 2)
        assert sigs is not None
        assert sigs.size == 2
        with pytest.raises(InstructionReplayedError):
            reg.claim_nonce(b"\x01" * 16, "aisi", 2000, 1001)
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_a_closed_registry_refuses_work(tmp_path: Path) -> None:
    reg = Registry.open(tmp_path / "r.sqlite")
    reg.close()
    reg.close()
    with pytest.raises(StorageError, match="closed"):
        reg.meters("aisi")
    with pytest.raises(StorageError, match="closed"):
        reg.stage_signatures([sig()])


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import numpy as np
    from embassy.metering.registry import Registry, SignatureRow
    from embassy.metering.score import Polarity

    reg = Registry.open(Path(sys.argv[1]))
    batch = reg.stage_signatures(
        [SignatureRow("bio", "aisi", Polarity.POSITIVE, "layer.12", np.array([1.0, 0.0]))]
    )
    reg.commit(batch, 1)
    acked = reg.stage_update("ab" * 16, "cd" * 32, {"bio": 123456})
    reg.commit(acked, 2)
    unacked = reg.stage_update("ab" * 16, "cd" * 32, {"bio": 999})
    print(acked, unacked, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_an_acknowledged_update_survives_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite"
    child = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    acked, unacked = child.stdout.split()
    assert (tmp_path / "registry.sqlite-wal").exists()  # killed before any clean checkpoint
    with Registry.open(path) as reg:
        assert reg.meters("aisi") == [Meter("bio", "aisi", 123456, 1, 2)]
        assert reg.pending_batches() == [unacked]
        assert reg.recover({}).discarded == (unacked,)
        assert reg.meters("aisi") == [Meter("bio", "aisi", 123456, 1, 2)]
        assert [u.batch for u in reg.history("bio")] == [acked]


def test_an_instruction_nonce_is_claimed_once_and_expired_ones_are_pruned(
    reg: Registry, tmp_path: Path
) -> None:
    reg.claim_nonce(b"\x01" * 16, "aisi", expires_unix=1100, now=1000)
    with pytest.raises(InstructionReplayedError, match="01" * 16) as info:
        reg.claim_nonce(b"\x01" * 16, "aisi", expires_unix=1100, now=1050)
    assert info.value.code == "instruction-replayed"
    # At its expiry it is still kept (an instruction is refused only once past it) ...
    reg.claim_nonce(b"\x02" * 16, "aisi", expires_unix=5000, now=1100)
    with pytest.raises(InstructionReplayedError):
        reg.claim_nonce(b"\x01" * 16, "aisi", expires_unix=1100, now=1100)
    # ... and pruned once past it.
    reg.claim_nonce(b"\x03" * 16, "aisi", expires_unix=5000, now=1101)
    with sqlite3.connect(tmp_path / "registry.sqlite") as raw:
        nonces = {r[0] for r in raw.execute("SELECT nonce FROM instruction_nonces")}
    raw.close()
    assert nonces == {"02" * 16, "03" * 16}


def test_a_capability_belongs_to_one_authority(reg: Registry) -> None:
    committed_signatures(reg, sig())
    with pytest.raises(NotOwnerError, match="belongs to 'aisi', not 'mallory'") as info:
        reg.stage_signatures([sig(authority="mallory")])
    assert info.value.code == "not-capability-owner"
    with pytest.raises(NotOwnerError, match="two authorities"):
        reg.stage_signatures([sig("new"), sig("new", authority="mallory")])
    # A pending claim on a name counts too: two authorities must not race for it.
    reg.stage_signatures([sig("fresh")])
    with pytest.raises(NotOwnerError):
        reg.stage_signatures([sig("fresh", authority="mallory")])
    assert len(reg.pending_batches()) == 1
    with pytest.raises(StorageError, match="no signatures"):
        reg.stage_update(SESSION, ACT, {"fresh": 1})  # pending signatures do not count


def test_bad_input_is_refused_before_any_write(reg: Registry) -> None:
    with pytest.raises(ValueError, match="not all zero"):
        reg.stage_signatures([sig(vector=(0.0, 0.0))])
    with pytest.raises(ValueError, match="finite"):
        reg.stage_signatures([sig(vector=(float("nan"), 1.0))])
    with pytest.raises(ValueError, match="session"):
        reg.stage_signatures([sig()], session="XYZ")
    committed_signatures(reg, sig())
    with pytest.raises(ValueError, match="activation_sha256"):
        reg.stage_update(SESSION, "ab", {"bio": 1})
    with pytest.raises(ValueError, match="int >= 0"):
        reg.stage_update(SESSION, ACT, {"bio": -1})
    assert reg.pending_batches() == []


def test_an_unknown_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite"
    Registry.open(path).close()
    with sqlite3.connect(path) as raw:
        raw.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    raw.close()
    with pytest.raises(StorageError, match="schema version '99'") as info:
        Registry.open(path)
    assert str(path) in info.value.message


def test_a_corrupt_or_foreign_file_is_a_storage_error(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StorageError, match=r"garbage\.sqlite"):
        Registry.open(garbage)
    foreign = tmp_path / "foreign.sqlite"
    with sqlite3.connect(foreign) as raw:
        raw.execute("CREATE TABLE t (x)")
    raw.close()
    with pytest.raises(StorageError, match="not an embassy registry"):
        Registry.open(foreign)
    with pytest.raises(StorageError, match=r"cannot open|unreadable"):
        Registry.open(tmp_path / "no-such-dir" / "r.sqlite")


def test_threads_share_one_registry(reg: Registry) -> None:
    committed_signatures(reg, sig())
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for j in range(20):
                reg.commit(reg.stage_update(SESSION, ACT, {"bio": 1}), 100 + i * 100 + j)
                assert reg.signature_set("layer.12", 2) is not None
        except BaseException as exc:  # surfaced below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    (meter,) = reg.meters("aisi")
    assert (meter.value, meter.count, meter.last_seq) == (80, 80, 419)


def test_a_vector_altered_on_disk_is_a_storage_error(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite"
    with Registry.open(path) as reg:
        committed_signatures(reg, sig())
    with sqlite3.connect(path) as raw:
        nan = np.array([np.nan, 1.0], dtype="<f4").tobytes()
        raw.execute("UPDATE signatures SET vector = ?", (nan,))
    raw.close()
    with Registry.open(path) as reg, pytest.raises(StorageError, match="non-finite"):
        reg.signature_set("layer.12", 2)
