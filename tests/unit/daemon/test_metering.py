"""The daemon's metering on a FakeTpm: instructions, activation files, meters, readings.

Real registry (SQLite), real log, real activation files written by the SDK's writer; only
the TPM is fake and the intake's watcher is bypassed (``handle`` is called directly).
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from embassy.daemon.runtime import Embassy
from embassy.errors import (
    BadPayloadError,
    InstructionReplayedError,
    InstructionSignatureError,
    NotOwnerError,
)
from embassy.metering.actions import seal_actions
from embassy.metering.formula_v2 import FORMULA_V2
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
