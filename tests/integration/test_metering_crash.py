"""A grouped metering commit killed (-9) between stage and commit, both ways, on a real swtpm.

A child process runs the embassy (``Embassy.open``: its own swtpm, the real statement log
and SQLite registry, no workload) and meters a group of activation files; a monkeypatch
inside the child (never a code path of the daemon's) sends it SIGKILL:

- ``stated``: after the group's ``meter-batch`` statement is in the log, before the
  registry commits it. A restart commits it from the log.
- ``staged``: after the group is staged in the registry, before its statement is appended.
  A restart drops it, and the files (never acknowledged, still in place) are metered anew.

Another child then restarts the embassy on the same data dir (the swtpm outlives the kill,
as a machine's TPM does, so it is the same TPM boot) and reports: the log replays to the
PCR, no batch is pending, and each meter equals what the log says, recomputed from the
activations its statements name and formula v2 of the model digest they name.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.integration.conftest import require

ROOT = Path(__file__).resolve().parents[2]
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(7, 39)))
TENSOR = "encoder.layer.5"
DIM = 16
FILES = 4


def _arrays() -> list[np.ndarray]:
    rng = np.random.default_rng(15)
    base = np.zeros(DIM, dtype=np.float32)
    base[0] = 1.0
    return [(base + rng.normal(0, 0.2, (24, DIM))).astype(np.float32) for _ in range(FILES)]


# -- the child ------------------------------------------------------------------------------


def _embassy(root: Path) -> Any:
    from embassy.config import parse_config
    from embassy.daemon.runtime import Embassy
    from embassy.wire.codec import b64encode

    config = parse_config(
        {
            "data_dir": str(root / "data"),
            "socket": str(root / "embassy.sock"),
            "authorities": [
                {
                    "name": "aisi",
                    "ed25519": b64encode(KEY.public_key().public_bytes_raw()),
                    "capabilities": ["bio", "cyber"],
                }
            ],
        }
    )
    return Embassy.open(config)


def _begin(embassy: Any, op: Any, caps: list[str], polarity: Any = None) -> bytes:
    from embassy.metering.actions import seal_actions
    from embassy.metering.instruction import make_instruction
    from embassy.wire.dsse import keyid

    instruction = make_instruction(
        KEY,
        op=op,
        authority="aisi",
        capabilities=caps,
        embassy_keyid=keyid(embassy.keys.signing.public_key()),
        expires_unix=2**40,
        polarity=polarity,
    )
    session, action_key, payload_id = os.urandom(16), os.urandom(32), os.urandom(16)
    embassy.metering.begin(
        session,
        payload_id=payload_id,
        action_key=action_key,
        actions=seal_actions(action_key, payload_id, [instruction], unmetered_ok=False),
    )
    return session


def child_crash(root: Path, way: str) -> None:
    """Teach, open an update session, and meter one group of files: killed mid-group."""
    from embassy.metering.instruction import Op, Polarity
    from embassy.wire.statement import METER_BATCH_V1
    from workload_sdk.activations import ActivationWriter

    embassy = _embassy(root)
    rng = np.random.default_rng(1)
    files = root / "files"
    files.mkdir(exist_ok=True)
    for cap, polarity, axis in (
        ("cyber", Polarity.POSITIVE, 0),
        ("bio", Polarity.POSITIVE, 1),
        ("cyber", Polarity.NEGATIVE, 2),
    ):
        session = _begin(embassy, Op.WRITE, [cap], polarity)
        writer = ActivationWriter(files, session)
        paths = []
        for _ in range(3):
            array = rng.normal(0, 0.2, (24, DIM)).astype(np.float32)
            array[:, axis] += 1.0
            paths.append(writer.write(TENSOR, array))
        embassy.metering.handle_many(paths)
        assert embassy.metering.finish(session, lambda: 0)["signatures_written"] == 3
    session = _begin(embassy, Op.UPDATE, ["bio", "cyber"])
    writer = ActivationWriter(files, session)
    paths = [writer.write(TENSOR, array) for array in _arrays()]
    (root / "state.json").write_text(
        json.dumps({"session": session.hex(), "paths": [str(p) for p in paths]})
    )

    def die(*_: object, **__: object) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    if way == "stated":
        embassy.registry.commit_group = die
    else:
        append = embassy.log.append_statement

        def append_or_die(predicate: str, *args: Any, **kwargs: Any) -> Any:
            if predicate == METER_BATCH_V1:
                die()
            return append(predicate, *args, **kwargs)

        embassy.log.append_statement = append_or_die
    embassy.metering.handle_many(paths)
    raise AssertionError("not killed")


def child_check(root: Path) -> None:
    """Restart on the same data dir and report what the log and the registry say."""
    from embassy.log.segment import replay
    from embassy.metering.activation import read_activation_file
    from embassy.metering.formula_v2 import FORMULA_V2, pool_windows, score_v2
    from embassy.wire.dsse import parse_envelope
    from embassy.wire.statement import METER_BATCH_V1, parse_statement

    embassy = _embassy(root)
    state = json.loads((root / "state.json").read_text())
    reset = embassy.tpm.clock().reset_count
    boot = [e for e in embassy.log.entries if e.reset_count == reset]
    pcrs = sorted({e.pcr for e in boot})
    replayed = replay(boot, {}, pcrs) == embassy.tpm.read_pcrs(pcrs)
    pending = embassy.registry.pending_batches()
    records = [r for r in embassy.registry.open_sessions() if r.session == state["session"]]
    # What the log says: each meter-batch statement's meter updates for the session, with
    # the activation its subject names and the model it names.
    arrays = {}
    left = [p for p in state["paths"] if Path(p).exists()]
    for path in left:
        activation = read_activation_file(Path(path), max_bytes=1 << 20)
        arrays[activation.sha256.hex()] = np.array(activation.data)
    model = embassy.registry.centroid_model("aisi", TENSOR, DIM)
    stated: dict[str, int] = {}
    stated_files = 0
    for entry in embassy.log.entries:
        if entry.type.value != "statement":
            continue
        st = parse_statement(parse_envelope(entry.data).payload)
        if st.predicate_type != METER_BATCH_V1:
            continue
        digests = {s.name: s.sha256.hex() for s in st.subjects}
        for part in st.body["sessions"]:
            if part["session"] != state["session"]:
                continue
            for update in part["meter_updates"]:
                assert update["formula"] == FORMULA_V2
                assert update["model_sha256"] == model.digest.hex()
                sha = digests[f"activation:{part['session']}:{update['seq']}"]
                scores = score_v2(model, pool_windows(arrays[sha]))
                for cap in update["capabilities"]:
                    stated[cap] = stated.get(cap, 0) + scores[cap]
                stated_files += 1
    report = {
        "replayed": replayed,
        "pending": pending,
        "session_files": None if not records else len(records[0].files),
        "files_left": len(left),
        "meters": dict(embassy.metering.meters("aisi")),
        "stated": stated,
        "stated_files": stated_files,
    }
    # The files never acknowledged are metered now, and the session ends.
    if left and report["session_files"] == 0:
        embassy.metering.handle_many([Path(p) for p in left])
        report["after"] = dict(embassy.metering.meters("aisi"))
        summary = embassy.metering.finish(bytes.fromhex(state["session"]), lambda: 0)
        report["summary_files"] = summary["files"]
    embassy.close()
    (root / "report.json").write_text(json.dumps(report))


# -- the test -------------------------------------------------------------------------------


def _child(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "tests.integration.test_metering_crash", *args],
        cwd=ROOT,
        capture_output=True,
        timeout=180,
        env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},
        check=False,
    )


@pytest.mark.parametrize("way", ["stated", "staged"])
def test_a_grouped_commit_killed_between_stage_and_commit(tmp_path: Path, way: str) -> None:
    require("swtpm", "swtpm_setup")
    from embassy.tpm.swtpm import Swtpm

    try:
        crashed = _child("crash", str(tmp_path), way)
        assert crashed.returncode == -signal.SIGKILL, crashed.stderr.decode()[-3000:]
        checked = _child("check", str(tmp_path))
        assert checked.returncode == 0, checked.stderr.decode()[-3000:]
    finally:
        Swtpm(tmp_path / "data" / "swtpm").stop()
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["replayed"] is True
    assert report["pending"] == []
    assert report["meters"] == report["stated"]  # the meters are what the log says
    if way == "stated":
        # Acknowledged by its statement: committed at the restart, the files on record.
        assert report["stated_files"] == FILES
        assert report["session_files"] == FILES
        assert report["meters"]["cyber"] > 0
    else:
        # Never stated: dropped, nothing moved; the files are still there, metered now.
        assert report["stated_files"] == 0
        assert report["session_files"] == 0
        assert report["meters"] == {}
        assert report["files_left"] == FILES
        assert report["after"]["cyber"] > 0
        assert report["summary_files"] == FILES


if __name__ == "__main__":
    if sys.argv[1] == "crash":
        child_crash(Path(sys.argv[2]), sys.argv[3])
    else:
        child_check(Path(sys.argv[2]))
