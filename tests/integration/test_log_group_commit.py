"""Group commit of the statement log under kill -9, on a real swtpm (ADR 0016).

A child process opens the statement log on the swtpm (``StatementLog`` directly: the
log is what is under test), recovers it, reports what it found, and has 16 threads append
statements as fast as they can; each thread writes a statement's seq and entry digest to a
side file, fsync'd, only after ``append_statement`` returned (acknowledged). The test sends
the child SIGKILL at a random moment, several times; the swtpm outlives each kill, as a
machine's TPM outlives the daemon, so every restart is the same TPM boot. After every kill
the next child's recovery must leave the log replaying to the PCRs (finishing a batch's
extend, or cutting a batch whose write the kill interrupted), and the segment must verify;
at the end every acknowledged statement must be in the log, byte for byte.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import require

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MASTER = bytes(range(40, 72))
WRITERS = 16
KILLS = 10


# -- the child ------------------------------------------------------------------------------


def _child(root: Path, run: int, write: bool) -> None:
    import logging

    from embassy.attest.marshal import parse_public
    from embassy.attest.types import TpmMode
    from embassy.config import parse_config
    from embassy.daemon.keys import derive_keys
    from embassy.daemon.statement_log import StatementLog
    from embassy.log.segment import replay
    from embassy.tpm.device import TpmDevice
    from embassy.tpm.swtpm import Swtpm
    from embassy.verify.segment import SegmentKeys, verify_segment
    from embassy.wire.statement import LIFECYCLE_V1

    repairs: list[str] = []

    class Seen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            repairs.append(record.getMessage())

    logging.getLogger("embassy.daemon.statement_log").addHandler(Seen(logging.WARNING))
    data = root / "data"
    config = parse_config({"data_dir": str(data), "socket": str(root / "s.sock")})
    keys = derive_keys(MASTER)
    device = TpmDevice.open(*Swtpm(root / "swtpm").ensure_running(), TpmMode.SOFTWARE)
    log = StatementLog(data_dir=data, tpm=device, keys=keys, pcrs=config.pcrs, checkpoint_every=200)
    log.recover()
    reset_count = device.clock().reset_count
    boot = [e for e in log.entries if e.reset_count == reset_count]
    status: dict[str, Any] = {
        "entries": len(log.entries),
        "replays": device.read_pcrs([13, 14]) == replay(boot, {}, [13, 14]),
        "repairs": repairs,
        "batches": sum(1 for e in log.entries if e.batch and e.seq == e.batch[0]),
    }
    if log.entries:
        segment = log.log_segment(0)
        seg_keys = SegmentKeys(keys.signing.public_key(), parse_public(device.ak_public()), 13, 14)
        status["verified"] = len(
            verify_segment(segment, seg_keys, allow_software_tpm=True).statements
        )
    (root / f"status-{run}.json").write_text(json.dumps(status))
    if not write:
        log.close()
        device.close()
        return
    acks = os.open(root / "acks", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    ack_lock = threading.Lock()

    def writer(w: int) -> None:
        for i in range(10**9):
            got = log.append_statement(
                LIFECYCLE_V1, [], {"event": "gc", "run": run, "w": w, "i": i}
            )
            line = f"{got.entry.seq} {got.entry.digest.hex()}\n".encode()
            with ack_lock:
                os.write(acks, line)
                os.fsync(acks)

    threads = [threading.Thread(target=writer, args=(w,), daemon=True) for w in range(WRITERS)]
    for t in threads:
        t.start()
    (root / f"writing-{run}").touch()
    for t in threads:
        t.join()


# -- the test -------------------------------------------------------------------------------


def _run_child(root: Path, run: int, write: bool) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.integration.test_log_group_commit", str(root), str(run),
         "write" if write else "check"],
        cwd=ROOT,
        stderr=subprocess.PIPE,
    )  # fmt: skip


def _status(root: Path, run: int, child: subprocess.Popen[bytes]) -> dict[str, Any]:
    path = root / f"status-{run}.json"
    deadline = time.monotonic() + 120
    while not path.exists():
        if child.poll() is not None:
            err = child.stderr.read().decode() if child.stderr else ""
            pytest.fail(f"child {run} exited {child.returncode} before reporting: {err[-2000:]}")
        assert time.monotonic() < deadline, f"child {run} did not report"
        time.sleep(0.02)
    status: dict[str, Any] = json.loads(path.read_text())
    return status


def test_no_acknowledged_statement_is_lost_and_the_log_replays_after_every_kill(
    tmp_path: Path,
) -> None:
    require("swtpm", "swtpm_setup")
    from embassy.log.entry import parse_entry
    from embassy.tpm.swtpm import Swtpm

    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    swtpm = Swtpm(tmp_path / "swtpm")
    swtpm.ensure_running()
    (tmp_path / "data").mkdir()
    statuses: list[dict[str, Any]] = []
    try:
        for run in range(KILLS):
            child = _run_child(tmp_path, run, write=True)
            try:
                statuses.append(_status(tmp_path, run, child))
                while not (tmp_path / f"writing-{run}").exists():
                    assert child.poll() is None, f"child {run} died (seed {seed})"
                    time.sleep(0.01)
                time.sleep(rng.uniform(0.05, 0.8))
                assert child.poll() is None, f"child {run} stopped writing (seed {seed})"
            finally:
                child.send_signal(signal.SIGKILL)
                child.wait(30)
                if child.stderr:
                    child.stderr.close()
        final = _run_child(tmp_path, KILLS, write=False)
        statuses.append(_status(tmp_path, KILLS, final))
        assert final.wait(120) == 0
        if final.stderr:
            final.stderr.close()
    finally:
        swtpm.stop()

    for run, status in enumerate(statuses):
        assert status["replays"], f"after kill {run}: the log does not replay (seed {seed})"
        if run > 0:
            assert status["verified"] == status["entries"], f"run {run} (seed {seed})"
    assert statuses[-1]["batches"] > 0, "16 writers on a real TPM were committed in batches"
    entries = {
        e.seq: e.digest.hex()
        for e in map(parse_entry, (tmp_path / "data" / "log.jsonl").read_bytes().splitlines())
    }
    # a line the kill cut short was never fsync'd: its statement's ack was not complete
    acked = [
        parts
        for parts in (line.split() for line in (tmp_path / "acks").read_text().splitlines())
        if len(parts) == 2 and len(parts[1]) == 64
    ]
    assert len(acked) > WRITERS * KILLS, f"too few statements acknowledged: {len(acked)}"
    lost = [(seq, digest) for seq, digest in acked if entries.get(int(seq)) != digest]
    assert not lost, f"acknowledged but not in the log (seed {seed}): {lost[:5]}"
    print(
        f"seed {seed}: {len(acked)} acknowledged, {len(entries)} in the log, repairs: "
        + "; ".join(r for s in statuses for r in s["repairs"])
    )


if __name__ == "__main__":
    _child(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "write")
