"""The daemon's metering on a FakeTpm: instructions, activation files, meters, readings.

Real registry (SQLite), real log, real activation files written by the SDK's writer; only
the TPM is fake and the intake's watcher is bypassed (``handle`` is called directly).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from embassy.daemon import metering_group
from embassy.daemon.activation_reader import ReaderPool
from embassy.daemon.runtime import Embassy
from embassy.errors import (
    BadPayloadError,
    InstructionReplayedError,
    InstructionSignatureError,
    NotOwnerError,
)
from embassy.metering.actions import seal_actions
from embassy.metering.activation import parse_activation
from embassy.metering.formula_v2 import FORMULA_V2, pool_windows, score_v2
from embassy.metering.instruction import Op, Polarity, make_instruction
from embassy.metering.reading import open_reading, reply_public_bytes
from embassy.wire.codec import b64encode
from embassy.wire.dsse import keyid, parse_envelope
from embassy.wire.statement import parse_statement
from tests.fakes import FakeTpm
from workload_sdk.activations import ActivationWriter, encode_activation, file_name

AISI = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
RIGHTS = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
DIM = 8


def _raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


AUTHORITIES = {
    "authorities": [
        {"name": "aisi", "ed25519": b64encode(_raw(AISI)), "capabilities": ["bio", "cyber"]},
        {"name": "rights", "ed25519": b64encode(_raw(RIGHTS)), "capabilities": ["lyrics"]},
    ]
}


@pytest.fixture
def metered(make_embassy: Any, tpm: FakeTpm) -> Embassy:
    embassy: Embassy = make_embassy(tpm, extra=AUTHORITIES)
    return embassy


def _basis(i: int, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    v = np.zeros(DIM, dtype=np.float32)
    v[i] = 1.0
    if noise:
        v += np.random.default_rng(seed).normal(0, noise, DIM).astype(np.float32)
    # Three "tokens" whose mean is v: pooling is part of what is tested.
    return np.stack([v * 0.5, v * 1.5, v])


class Authority:
    def __init__(self, embassy: Embassy, key: Ed25519PrivateKey, name: str) -> None:
        self.embassy, self.key, self.name = embassy, key, name

    def instruction(self, op: Op, caps: list[str], polarity: Polarity | None = None) -> bytes:
        return make_instruction(
            self.key,
            op=op,
            authority=self.name,
            capabilities=caps,
            embassy_keyid=keyid(self.embassy.keys.signing.public_key()),
            expires_unix=2**40,
            polarity=polarity,
            reply_key=reply_public_bytes(self.key) if op is Op.READ else None,
        )


def begin(
    embassy: Embassy, instructions: list[bytes], *, unmetered_ok: bool = False
) -> tuple[bytes, list[bytes]]:
    session, action_key, payload_id = os.urandom(16), os.urandom(32), os.urandom(16)
    actions = seal_actions(action_key, payload_id, instructions, unmetered_ok=unmetered_ok)
    readings = embassy.metering.begin(
        session, payload_id=payload_id, action_key=action_key, actions=actions
    )
    return session, readings


def feed(embassy: Embassy, directory: Path, session: bytes, arrays: list[np.ndarray]) -> None:
    writer = ActivationWriter(directory, session)
    for array in arrays:
        embassy.metering.handle(writer.write("layer.6", array))


def statements(embassy: Embassy, predicate: str) -> list[dict[str, Any]]:
    out = []
    for entry in embassy.log.entries:
        if entry.type.value != "statement":
            continue
        st = parse_statement(parse_envelope(entry.data).payload)
        if st.predicate_type.rsplit(":", 1)[0].endswith(":" + predicate):
            out.append(dict(st.body))
    return out


def batch_items(embassy: Embassy, kind: str) -> list[dict[str, Any]]:
    """Every ``signature_writes`` or ``meter_updates`` item of the meter-batch statements."""
    return [
        item
        for st in statements(embassy, "meter-batch")
        for part in st["sessions"]
        for item in part[kind]
    ]


def teach(embassy: Embassy, tmp_path: Path) -> Authority:
    """cyber: positives near e0, negatives near e2; bio: positives near e1."""
    aisi = Authority(embassy, AISI, "aisi")
    for cap, pol, axis in (
        ("cyber", Polarity.POSITIVE, 0),
        ("cyber", Polarity.NEGATIVE, 2),
        ("bio", Polarity.POSITIVE, 1),
    ):
        session, _ = begin(embassy, [aisi.instruction(Op.WRITE, [cap], pol)])
        feed(embassy, tmp_path, session, [_basis(axis, 0.1, s) for s in range(3)])
        summary = embassy.metering.finish(session, lambda: 0)
        assert summary is not None
        assert summary["signatures_written"] == 3
    return aisi


def test_write_update_read(metered: Embassy, tmp_path: Path) -> None:
    aisi = teach(metered, tmp_path)
    assert len(batch_items(metered, "signature_writes")) == 9
    session, _ = begin(metered, [aisi.instruction(Op.UPDATE, ["bio", "cyber"])])
    feed(metered, tmp_path, session, [_basis(0, 0.05, 9)])
    summary = metered.metering.finish(session, lambda: 0)
    assert summary is not None
    assert (summary["files"], summary["meter_updates"], summary["rejected"]) == (1, 1, 0)
    meters = metered.metering.meters("aisi")
    assert meters["cyber"] > 500_000 > meters["bio"]
    [update] = batch_items(metered, "meter_updates")
    assert update["capabilities"] == ["bio", "cyber"]
    assert update["formula"] == FORMULA_V2
    model = metered.registry.centroid_model("aisi", "layer.6", DIM)
    assert model is not None
    assert update["model_sha256"] == model.digest.hex()
    assert "value" not in json.dumps(statements(metered, "meter-batch"))  # never in the log

    _, [reading] = begin(metered, [aisi.instruction(Op.READ, [])])
    opened = open_reading(
        reading,
        embassy_key=metered.keys.signing.public_key(),
        embassy_keyid=keyid(metered.keys.signing.public_key()),
        signing_key=AISI,
        authority="aisi",
    )
    by_cap = {m.capability: m for m in opened.meters}
    assert by_cap["cyber"].value == meters["cyber"]
    assert by_cap["cyber"].count == 1
    assert opened.header is not None
    assert opened.as_of_seq < opened.header.seq


def test_each_refused_instruction_is_audited_and_aborts(metered: Embassy) -> None:
    aisi, rights = Authority(metered, AISI, "aisi"), Authority(metered, RIGHTS, "rights")
    not_owned = rights.instruction(Op.UPDATE, ["lyrics"])
    forged = json.loads(not_owned)
    forged["signatures"][0]["sig"] = base64.b64encode(bytes(64)).decode()
    cases: list[tuple[bytes, type[Exception]]] = [
        (make_instruction(
            RIGHTS, op=Op.WRITE, authority="rights", capabilities=["cyber"],
            embassy_keyid=keyid(metered.keys.signing.public_key()), expires_unix=2**40,
            polarity=Polarity.POSITIVE,
        ), NotOwnerError),
        (json.dumps(forged).encode(), InstructionSignatureError),
        (aisi.instruction(Op.READ, ["lyrics"]), NotOwnerError),
    ]  # fmt: skip
    for raw, error in cases:
        with pytest.raises(error):
            begin(metered, [raw])
    refused = statements(metered, "instruction-refused")
    assert [[r["code"] for r in st["refused"]] for st in refused] == [
        ["not-capability-owner"],
        ["instruction-bad-signature"],
        ["not-capability-owner"],
    ]
    assert not any(r["session_continues_unmetered"] for r in refused)
    # Codes and digests only: a refusal's message may quote the instruction.
    assert all(set(st) == {"session", "refused", "session_continues_unmetered"} for st in refused)


def test_replayed_instruction_refused(metered: Embassy) -> None:
    instruction = Authority(metered, AISI, "aisi").instruction(Op.UPDATE, ["cyber"])
    begin(metered, [instruction])
    with pytest.raises(InstructionReplayedError):
        begin(metered, [instruction])


def test_unmetered_ok_runs_the_session_without_the_refused_instruction(
    metered: Embassy, tmp_path: Path
) -> None:
    bad = Authority(metered, RIGHTS, "aisi").instruction(Op.UPDATE, ["cyber"])
    session, _ = begin(metered, [bad], unmetered_ok=True)
    feed(metered, tmp_path, session, [_basis(0)])
    summary = metered.metering.finish(session, lambda: 0)
    assert summary is not None
    assert (summary["instructions"], summary["instructions_refused"], summary["files"]) == (
        [],
        1,
        1,
    )
    assert statements(metered, "instruction-refused")[0]["session_continues_unmetered"]


def test_actions_must_travel_with_the_action_key(metered: Embassy) -> None:
    with pytest.raises(BadPayloadError, match="dropped"):
        metered.metering.begin(os.urandom(16), payload_id=os.urandom(16), action_key=bytes(32))
    with pytest.raises(BadPayloadError, match="no action key"):
        metered.metering.begin(os.urandom(16), payload_id=os.urandom(16), actions=b"x" * 64)


def _file(directory: Path, name: str, data: bytes) -> Path:
    path = directory / name
    path.write_bytes(data)
    return path


def test_bad_files_are_counted_in_one_summary_and_removed(metered: Embassy, tmp_path: Path) -> None:
    session, _ = begin(metered, [])
    good = encode_activation(session, 0, "layer.6", _basis(0))
    corrupt = bytearray(good)
    corrupt[-1] ^= 0x40
    stranger = os.urandom(16)
    # (file name, bytes, the code it is counted under, the session it is charged to)
    cases = [
        (file_name(session, 0), bytes(corrupt), "activation-corrupt", session),
        (file_name(session, 0), good[:-4], "activation-truncated", session),
        (file_name(session, 0), good + b"x", "activation-corrupt", session),
        # Out of sequence by its name alone: refused unread (its header says seq 0).
        (file_name(session, 1), good, "activation-out-of-sequence", session),
        (
            file_name(session, 5),
            encode_activation(session, 5, "layer.6", _basis(0)),
            "activation-out-of-sequence",
            session,
        ),
        (
            file_name(session, 0),
            bytes(metered.config.metering.max_activation_bytes + 1),
            "activation-oversized",
            session,
        ),
        # Not an open session's name, or not the SDK's name at all: refused unread.
        (
            file_name(stranger, 0),
            encode_activation(stranger, 0, "layer.6", _basis(0)),
            "activation-foreign",
            None,
        ),
        ("corrupt.act", bytes(corrupt), "activation-foreign", None),
        (file_name(session, 0).upper(), good, "activation-foreign", None),
    ]
    for name, data, _, _ in cases:
        metered.metering.handle(_file(tmp_path, name, data))
        assert not (tmp_path / name).exists()
    link = tmp_path / file_name(session, 0)
    os.symlink("/etc/passwd", link)
    metered.metering.handle(link)
    assert Path("/etc/passwd").exists()
    assert not link.is_symlink()
    assert statements(metered, "activation-rejected") == []  # counted, not yet stated
    metered.metering.flush()
    by_session = {r["session"]: r for r in statements(metered, "activation-rejected")}
    assert set(by_session) == {session.hex(), None}
    mine, nobody = by_session[session.hex()], by_session[None]
    assert mine["counts"] == {
        "activation-corrupt": 2,
        "activation-foreign": 1,  # the symlink
        "activation-oversized": 1,
        "activation-out-of-sequence": 2,
        "activation-truncated": 1,
    }
    assert (mine["files"], mine["summary"], mine["final"]) == (7, 1, False)
    assert nobody["counts"] == {"activation-foreign": 3}
    # The intake goes on: the expected file is still accepted after all that.
    metered.metering.handle(_file(tmp_path, file_name(session, 0), good))
    summary = metered.metering.finish(session, lambda: 0)
    assert summary is not None
    assert (summary["files"], summary["rejected"], summary["unattributed"]) == (1, 7, 3)
    assert summary["rejected_by_code"] == mine["counts"]
    charged = sum(len(data) for _, data, _, owner in cases if owner is not None)
    assert summary["rejected_bytes"] == charged + len("/etc/passwd")  # lstat of the link
    assert summary["files_left"] == 0


def test_files_of_an_aborted_session_are_foreign(metered: Embassy, tmp_path: Path) -> None:
    session, _ = begin(metered, [])
    metered.metering.forget(session)
    feed(metered, tmp_path, session, [_basis(0)])
    metered.metering.flush()
    [rejected] = statements(metered, "activation-rejected")
    assert rejected["counts"] == {"activation-foreign": 1}
    assert rejected["session"] is None  # only an open session's id is ever stated


def test_pending_batches_follow_the_log_after_a_crash(
    make_embassy: Any, tpm: FakeTpm, tmp_path: Path
) -> None:
    embassy: Embassy = make_embassy(tpm, extra=AUTHORITIES)
    teach(embassy, tmp_path)
    registry = embassy.registry
    # A crash after the statement was appended but before the registry committed:
    logged = registry.stage_update("aa" * 16, "bb" * 32, {"cyber": 7})
    embassy.log.append_statement(
        "urn:embassy:predicate:meter-update:v2", [], {"batch": logged, "session": "aa" * 16}
    )
    # ... and one before the statement was appended at all:
    registry.stage_update("aa" * 16, "cc" * 32, {"cyber": 1000})
    before = embassy.metering.meters("aisi").get("cyber", 0)
    make_embassy.crash(embassy)
    restarted: Embassy = make_embassy(tpm, extra=AUTHORITIES)
    assert restarted.metering.meters("aisi")["cyber"] == before + 7
    assert restarted.registry.pending_batches() == []


def _written(directory: Path, session: bytes, arrays: list[np.ndarray]) -> list[Path]:
    writer = ActivationWriter(directory, session)
    return [writer.write("layer.6", array) for array in arrays]


def _counting(monkeypatch: pytest.MonkeyPatch, obj: object, name: str) -> list[int]:
    """Count the calls of ``obj.name`` (the real one still runs)."""
    calls: list[int] = []
    real = getattr(obj, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(obj, name, counted)
    return calls


def test_a_group_is_one_transaction_and_one_statement_in_sequence_order(
    metered: Embassy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    aisi = teach(metered, tmp_path)
    session, _ = begin(metered, [aisi.instruction(Op.UPDATE, ["bio", "cyber"])])
    arrays = [_basis(i % 3, 0.2, 100 + i) for i in range(12)]
    paths = _written(tmp_path, session, arrays)
    before = len(metered.log.entries)
    staged = _counting(monkeypatch, metered.registry, "stage_group")
    committed = _counting(monkeypatch, metered.registry, "commit_group")
    metered.metering.handle_many(list(reversed(paths)))  # any order: seq order decides
    assert not any(p.exists() for p in paths)
    assert (len(staged), len(committed)) == (1, 1)
    new = [e for e in metered.log.entries[before:] if e.type.value == "statement"]
    assert len(new) == 1
    [batch] = [
        st
        for st in statements(metered, "meter-batch")
        if st["sessions"][0]["session"] == session.hex()
    ]
    [part] = batch["sessions"]
    assert (part["seq"], part["files"]) == ([0, 11], 12)
    assert [u["seq"] for u in part["meter_updates"]] == list(range(12))
    # The meters are exactly formula v2 of each file against the authority's model.
    model = metered.registry.centroid_model("aisi", "layer.6", DIM)
    assert model is not None
    expected: dict[str, int] = {}
    for array in arrays:
        for cap, delta in score_v2(model, pool_windows(array)).items():
            expected[cap] = expected.get(cap, 0) + delta
    assert dict(metered.metering.meters("aisi")) == expected
    summary = metered.metering.finish(session, lambda: 0)
    assert summary is not None
    assert (summary["files"], summary["meter_updates"], summary["formula"]) == (
        12,
        12,
        FORMULA_V2,
    )


def test_names_and_sequence_are_checked_before_a_byte_is_read(
    metered: Embassy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    session, _ = begin(metered, [])
    read: list[str] = []
    real = ReaderPool.read

    def recorded(pool: ReaderPool, jobs: Sequence[metering_group.Job]) -> Any:
        read.extend(Path(job.path).name for job in jobs)  # what the reader processes get
        return real(pool, jobs)

    monkeypatch.setattr(ReaderPool, "read", recorded)
    stranger = os.urandom(16)
    good = _written(tmp_path, session, [_basis(0), _basis(1)])
    far = _file(tmp_path, file_name(session, 7), encode_activation(session, 7, "t", _basis(0)))
    foreign = _file(
        tmp_path, file_name(stranger, 0), encode_activation(stranger, 0, "t", _basis(0))
    )
    # A FIFO with an out-of-sequence name: opening it would block; it is never opened.
    fifo = tmp_path / file_name(session, 9)
    os.mkfifo(fifo)
    metered.metering.handle_many([fifo, far, foreign, *good])
    assert read == [p.name for p in good]
    assert not any(p.exists() for p in (fifo, far, foreign, *good))
    metered.metering.flush()
    by_session = {r["session"]: r["counts"] for r in statements(metered, "activation-rejected")}
    assert by_session == {
        session.hex(): {"activation-out-of-sequence": 2},
        None: {"activation-foreign": 1},
    }
    # A file refused once read (corrupt) makes the rest of its group out of sequence.
    bad = bytearray(encode_activation(session, 2, "t", _basis(0)))
    bad[-1] ^= 1
    files = [_file(tmp_path, file_name(session, 2), bytes(bad))]
    files.append(
        _file(tmp_path, file_name(session, 3), encode_activation(session, 3, "t", _basis(0)))
    )
    metered.metering.handle_many(files)
    summary = metered.metering.finish(session, lambda: 0)
    assert summary is not None
    assert (summary["files"], summary["rejected_by_code"]) == (
        2,
        {"activation-corrupt": 1, "activation-out-of-sequence": 3},
    )


def test_a_session_open_across_a_restart_is_still_metered(
    make_embassy: Any, tpm: FakeTpm, tmp_path: Path
) -> None:
    embassy: Embassy = make_embassy(tpm, extra=AUTHORITIES)
    aisi = teach(embassy, tmp_path)
    session, _ = begin(embassy, [aisi.instruction(Op.UPDATE, ["cyber"])])
    writer = ActivationWriter(tmp_path, session)
    arrays = [_basis(0, 0.1, 50 + i) for i in range(3)]
    embassy.metering.handle_many([writer.write("layer.6", a) for a in arrays[:2]])
    after_two = embassy.metering.meters("aisi")["cyber"]
    make_embassy.crash(embassy)
    restarted: Embassy = make_embassy(tpm, extra=AUTHORITIES)
    assert restarted.metering.meters("aisi")["cyber"] == after_two
    restarted.metering.handle(writer.write("layer.6", arrays[2]))  # seq 2: the next one
    assert restarted.metering.meters("aisi")["cyber"] > after_two
    summary = restarted.metering.finish(session, lambda: 0)
    assert summary is not None
    assert (summary["files"], summary["meter_updates"], summary["rejected"]) == (3, 3, 0)
    checksums = [e.sha256 for e in _activations(tmp_path, session, arrays)]
    assert summary["activations_sha256"] == hashlib.sha256(b"".join(checksums)).hexdigest()
    assert summary["instructions"][0]["op"] == "update"
    # Ended: a later restart does not bring it back.
    make_embassy.crash(restarted)
    again: Embassy = make_embassy(tpm, extra=AUTHORITIES)
    assert again.registry.open_sessions() == []


def _activations(directory: Path, session: bytes, arrays: list[np.ndarray]) -> list[Any]:
    return [
        parse_activation(encode_activation(session, i, "layer.6", a), max_bytes=1 << 20)
        for i, a in enumerate(arrays)
    ]


def test_a_grouped_commit_follows_the_log_after_a_crash_both_ways(
    make_embassy: Any, tpm: FakeTpm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    embassy: Embassy = make_embassy(tpm, extra=AUTHORITIES)
    aisi = teach(embassy, tmp_path)
    session, _ = begin(embassy, [aisi.instruction(Op.UPDATE, ["cyber"])])
    writer = ActivationWriter(tmp_path, session)
    before = embassy.metering.meters("aisi").get("cyber", 0)

    class Crash(BaseException):
        pass

    def crash(*_: object, **__: object) -> None:
        raise Crash

    # 1. The statement appended, the registry not committed: committed at recovery.
    monkeypatch.setattr(embassy.registry, "commit_group", crash)
    logged = [writer.write("layer.6", _basis(0, 0.1, i)) for i in range(3)]
    with pytest.raises(Crash):
        embassy.metering.handle_many(logged)
    st = statements(embassy, "meter-batch")[-1]
    assert embassy.metering.meters("aisi").get("cyber", 0) == before
    make_embassy.crash(embassy)
    embassy = make_embassy(tpm, extra=AUTHORITIES)
    assert embassy.registry.pending_batches() == []
    model = embassy.registry.centroid_model("aisi", "layer.6", DIM)
    assert model is not None
    gained = sum(score_v2(model, pool_windows(_basis(0, 0.1, i)))["cyber"] for i in range(3))
    assert embassy.metering.meters("aisi")["cyber"] == before + gained
    assert len(st["sessions"][0]["meter_updates"]) == 3

    # 2. Staged, the statement never appended: dropped, and so is the files' progress.
    monkeypatch.setattr(embassy.log, "append_statement", crash)
    lost = [writer.write("layer.6", _basis(0, 0.1, i)) for i in range(3, 5)]
    with pytest.raises(Crash):
        embassy.metering.handle_many(lost)
    make_embassy.crash(embassy)
    embassy = make_embassy(tpm, extra=AUTHORITIES)
    assert embassy.registry.pending_batches() == []
    assert embassy.metering.meters("aisi")["cyber"] == before + gained
    # Seq 3 is expected again (its file was never acknowledged and is still there).
    assert [p.exists() for p in lost] == [True, True]
    embassy.metering.handle_many(lost)
    summary = embassy.metering.finish(session, lambda: 0)
    assert summary is not None
    assert (summary["files"], summary["meter_updates"]) == (5, 5)
