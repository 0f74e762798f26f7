"""No workload-chosen bytes leave through the embassy (DESIGN.md, "What must hold").

A workload-side writer drops hostile entries into the spool (names and contents of its
choosing: 200 bytes of 'Z', a newline, JSON junk, a session id that spells a message, a
tensor name of its choosing on a valid file) and relays an instruction whose fields it
chose; the real intake and metering handle them all. Afterwards no log record (caplog, at
DEBUG) and no byte of the statement log (entries, envelopes, decoded payloads) nor the
session's summary contains any of those strings: only codes, lengths and digests.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embassy.daemon.intake import ActivationIntake
from embassy.daemon.runtime import Embassy
from embassy.metering.instruction import Op, Polarity, make_instruction
from embassy.wire.dsse import keyid
from tests.fakes import FakeTpm
from tests.unit.conftest import EmbassyFactory
from tests.unit.daemon.test_metering import AISI, AUTHORITIES, Authority, begin
from workload_sdk.activations import ActivationWriter, encode_activation, file_name

Z_NAME = "Z" * 200
NEWLINE_NAME = "evil\nINJECTED log line.act"
JUNK = b'{"exfil": "SECRETSECRETSECRET", "nested": [1, 2, {"x": "SECRETSECRETSECRET"}]}'
SPELLED = b"EXFILTRATE-ME!!!"  # a 16-byte "session" that spells a message
TENSOR = "T" * 100  # a valid tensor name, the workload's choice
AUTHORITY = "QUOTEME" * 6  # an authority name in an instruction the workload made up

MARKERS = [
    "ZZZZZZZZZZZZZZZZ",
    "INJECTED",
    "SECRETSECRET",
    SPELLED.hex(),
    SPELLED.decode(),
    "TTTTTTTTTTTTTTTT",
    "QUOTEMEQUOTEME",
]


def _decoded_log(data_dir: Path) -> str:
    """Every byte of the statement log and its checkpoints, raw and decoded."""
    parts = []
    for name in ("log.jsonl", "checkpoints.jsonl"):
        raw = (data_dir / name).read_bytes()
        parts.append(raw.decode("utf-8", "replace"))
        if name != "log.jsonl":
            continue
        for line in raw.splitlines():
            entry = json.loads(line)
            envelope = base64.b64decode(entry["data"])
            parts.append(envelope.decode("utf-8", "replace"))
            payload = base64.b64decode(json.loads(envelope)["payload"])
            parts.append(payload.decode("utf-8", "replace"))
    return "\n".join(parts)


def _drop_hostile_entries(spool: Path, session: bytes) -> None:
    """What a hostile workload writes, the way it would (temp name, then rename)."""

    def put(name: str, data: bytes) -> None:
        tmp = spool / f".{session.hex()}-{len(name)}.tmp"  # a temporary name as the SDK's
        tmp.write_bytes(data)
        os.rename(tmp, spool / name)

    put(Z_NAME, JUNK)
    put(NEWLINE_NAME, JUNK)
    put(Z_NAME[:100] + ".act", JUNK)
    put(file_name(session, 1), JUNK)  # an open session's name, JSON inside
    put(file_name(SPELLED, 0), encode_activation(SPELLED, 0, "layer.6", np.ones((2, 8))))
    (spool / ("Z" * 150)).mkdir()
    (spool / ("Z" * 150) / NEWLINE_NAME).write_bytes(JUNK)
    os.symlink("/etc/hostname", spool / (Z_NAME[:50] + "\n.act"))


def test_no_log_record_and_no_statement_carries_workload_bytes(
    make_embassy: EmbassyFactory, tpm: FakeTpm, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    embassy: Embassy = make_embassy(tpm, extra=AUTHORITIES)
    spool = tmp_path / "spool"
    spool.mkdir()
    intake = ActivationIntake.for_metering(spool, embassy.metering, drain_timeout=10)
    intake.start()
    try:
        aisi = Authority(embassy, AISI, "aisi")
        made_up = make_instruction(
            AISI,
            op=Op.UPDATE,
            authority=AUTHORITY,
            capabilities=["cyber"],
            embassy_keyid=keyid(embassy.keys.signing.public_key()),
            expires_unix=2**40,
        )
        write = aisi.instruction(Op.WRITE, ["cyber"], Polarity.POSITIVE)
        session, _ = begin(embassy, [made_up, write], unmetered_ok=True)
        _drop_hostile_entries(spool, session)
        ActivationWriter(spool, session).write(TENSOR, np.eye(3, 8, dtype=np.float32))
        summary = embassy.metering.finish(session, intake.drain)
    finally:
        intake.stop()
    assert summary is not None
    assert (summary["files"], summary["signatures_written"]) == (1, 1)
    # Seq 1 before seq 0 is refused by its name, unread; after it, read and found corrupt.
    assert summary["rejected_by_code"] in (
        {"activation-corrupt": 1},
        {"activation-out-of-sequence": 1},
    )
    assert summary["unattributed"] >= 6
    assert summary["instructions_refused"] == 1
    assert not list(spool.iterdir())

    logged = _decoded_log(embassy.config.data_dir)
    records = "\n".join(f"{r.getMessage()} {r.exc_text or ''} {r.args!r}" for r in caplog.records)
    for marker in MARKERS:
        assert marker not in logged, marker
        assert marker not in records, marker
        assert marker not in json.dumps(summary), marker
    # What they carry instead: codes, counts, lengths and digests.
    assert "activation-rejected:v2" in logged
    assert "instruction-bad-signature" in logged
    assert "tensor_sha256" in logged
    assert "rejected (activation-foreign" in records  # per-file debug lines, by digest


def test_statements_name_a_tensor_by_its_digest(
    make_embassy: EmbassyFactory, tpm: FakeTpm, tmp_path: Path
) -> None:
    import hashlib

    from tests.unit.daemon.test_metering import batch_items, statements

    embassy: Embassy = make_embassy(tpm, extra=AUTHORITIES)
    aisi = Authority(embassy, AISI, "aisi")
    session, _ = begin(embassy, [aisi.instruction(Op.WRITE, ["cyber"], Polarity.POSITIVE)])
    writer = ActivationWriter(tmp_path, session)
    embassy.metering.handle(writer.write(TENSOR, np.eye(3, 8, dtype=np.float32)))
    [written] = batch_items(embassy, "signature_writes")
    assert written["tensor_sha256"] == hashlib.sha256(TENSOR.encode()).hexdigest()
    assert "tensor" not in written
    body: list[dict[str, Any]] = statements(embassy, "meter-batch")
    assert TENSOR not in json.dumps(body)
