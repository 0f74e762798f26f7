"""Group commit of the statement log (ADR 0016): throughput with concurrent writers and the
latency of one writer, on a real swtpm, against baselines measured in the same run.

Run from the repository root::

    .venv/bin/python -m benchmarks.log_group_commit [--quick] [--json OUT] [--dir DIR]

FakeTpm would be wrong here: its extend costs microseconds, a TPM's a few hundred. The
script starts its own swtpm in a temporary directory (and always stops it) and runs a
``StatementLog`` on it directly (no workload, no socket):

- baseline: bare Ed25519 signatures of 600 bytes a second, one thread;
- statements a second with 1, 4 and 16 writer threads, each appending in a loop, the
  mean batch size the log shows (entries per PCR extend), and the process's CPU per
  statement and in cores (near one core: the GIL sets the pace);
- one writer's p50 latency against its floor: the p50s of what one statement cannot do
  without (TPM clock read, Ed25519 sign of a statement's PAE, write + fsync of a log-line
  sized line in the same directory, a PCR extend), each timed alone in the same run; and
  the same four done one after the other as one call (the "sequence floor": an fsync
  after TPM I/O and a TPM command after an fsync cost more than in their own hot loops).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.run import Stats, measure
from embassy.attest.types import TpmMode
from embassy.config import parse_config
from embassy.daemon.keys import derive_keys
from embassy.daemon.statement_log import StatementLog
from embassy.tpm.device import TpmDevice
from embassy.tpm.swtpm import Swtpm
from embassy.wire.dsse import IN_TOTO_PAYLOAD_TYPE, pae, parse_envelope
from embassy.wire.statement import LIFECYCLE_V1

WRITERS = (1, 4, 16)
# An extend into a PCR the log does not use, to time the extend alone (16: the debug PCR).
SPARE_PCR = 16


def _append(log: StatementLog, i: int) -> None:
    log.append_statement(LIFECYCLE_V1, [], {"event": "bench", "i": i})


def _throughput(log: StatementLog, writers: int, per_writer: int) -> dict[str, float]:
    """``writers`` threads append ``per_writer`` statements each, released together."""
    start_seq = len(log.entries)
    go = threading.Barrier(writers + 1)

    def work(w: int) -> None:
        go.wait()
        for i in range(per_writer):
            _append(log, w * per_writer + i)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    go.wait()
    t0, cpu0 = time.perf_counter(), time.process_time()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    made = log.entries[start_seq:]
    commits = sum(1 for e in made if e.batch is None or e.seq == e.batch[1])
    return {
        "writers": writers,
        "statements": len(made),
        "wall_s": wall,
        "statements_per_s": len(made) / wall,
        "mean_batch": len(made) / commits,
        # This process's CPU (all threads, user + system) per statement and as a share of
        # one core: near 1.0 means the GIL, not the disk or the TPM, sets the pace.
        "cpu_us_per_statement": cpu / len(made) * 1e6,
        "cpu_cores": cpu / wall,
    }


def run(tmp: Path, quick: bool) -> dict[str, Any]:
    n_sign, n_prim, n_single, per_writer = (
        (3000, 200, 300, 150) if quick else (20_000, 1000, 2000, 600)
    )
    swtpm = Swtpm(tmp / "swtpm")
    try:
        device = TpmDevice.open(*swtpm.ensure_running(), TpmMode.SOFTWARE)
        try:
            data = tmp / "data"
            data.mkdir()
            config = parse_config({"data_dir": str(data), "socket": str(data / "s.sock")})
            keys = derive_keys(os.urandom(32))
            log = StatementLog(
                data_dir=data,
                tpm=device,
                keys=keys,
                pcrs=config.pcrs,
                checkpoint_every=1_000_000_000,
            )
            try:
                log.recover()
                return _bench(log, device, keys.signing, data, n_sign, n_prim, n_single, per_writer)
            finally:
                log.close()
        finally:
            device.close()
    finally:
        swtpm.stop()


def _bench(
    log: StatementLog,
    device: TpmDevice,
    signing: Any,
    data: Path,
    n_sign: int,
    n_prim: int,
    n_single: int,
    per_writer: int,
) -> dict[str, Any]:
    r: dict[str, Any] = {}
    message = os.urandom(600)
    r["baseline_sign"] = measure(lambda: signing.sign(message), n_sign // 10, n_sign)
    sample = log.append_statement(LIFECYCLE_V1, [], {"event": "bench", "i": -1})
    statement_pae = pae(IN_TOTO_PAYLOAD_TYPE, parse_envelope(sample.envelope).payload)
    line = b"x" * len(sample.entry.raw) + b"\n"
    fd = os.open(data / "fsync-probe", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:

        def write_fsync() -> None:
            os.write(fd, line)
            os.fsync(fd)

        r["floor_write_fsync"] = measure(write_fsync, n_prim // 10, n_prim)

        def sequence() -> None:
            device.clock()
            signing.sign(statement_pae)
            write_fsync()
            device.extend(SPARE_PCR, b"\x02" * 32)

        r["floor_sequence"] = measure(sequence, n_prim // 10, n_prim)
    finally:
        os.close(fd)
    r["floor_sign"] = measure(lambda: signing.sign(statement_pae), n_prim // 10, n_prim)
    r["floor_extend"] = measure(
        lambda: device.extend(SPARE_PCR, b"\x01" * 32), n_prim // 10, n_prim
    )
    r["floor_clock"] = measure(device.clock, n_prim // 10, n_prim)
    counter = iter(range(10**9))
    r["single_writer"] = measure(lambda: _append(log, next(counter)), n_single // 10, n_single)
    r["writers"] = [_throughput(log, w, per_writer) for w in WRITERS]
    log.checkpoint()  # the log as written replays to the TPM (a quote at its head)
    return r


def report(r: dict[str, Any]) -> str:
    sign: Stats = r["baseline_sign"]
    parts = {k: r[k].p50_us for k in ("floor_clock", "floor_sign", "floor_write_fsync")}
    parts["floor_extend"] = r["floor_extend"].p50_us
    floor = sum(parts.values())
    floor_no_clock = floor - parts["floor_clock"]
    single: Stats = r["single_writer"]
    out = [
        f"baseline Ed25519 sign (600 B): {sign.ops_per_s:,.0f}/s (p50 {sign.p50_us:.1f} µs)",
        "",
        f"{'writers':>8} {'statements/s':>13} {'x sign':>8} {'mean batch':>11} "
        f"{'CPU µs/stmt':>12} {'CPU cores':>10}",
    ]
    for w in r["writers"]:
        out.append(
            f"{w['writers']:>8} {w['statements_per_s']:>13,.0f} "
            f"{w['statements_per_s'] / sign.ops_per_s:>7.3f}x {w['mean_batch']:>11.1f} "
            f"{w['cpu_us_per_statement']:>12.0f} {w['cpu_cores']:>10.2f}"
        )
    out += [
        "",
        "one writer, p50 (µs): "
        + ", ".join(f"{k.removeprefix('floor_')} {v:.1f}" for k, v in parts.items()),
        f"  floor (clock + sign + write/fsync + extend) {floor:.1f} µs; without the clock "
        f"{floor_no_clock:.1f} µs",
        f"  one statement p50 {single.p50_us:.1f} µs (p99 {single.p99_us:.1f}) = "
        f"{single.p50_us / floor:.2f}x the floor, {single.p50_us / floor_no_clock:.2f}x "
        "the floor without the clock",
        f"  the four in sequence, one call: p50 {r['floor_sequence'].p50_us:.1f} µs; one "
        f"statement = {single.p50_us / r['floor_sequence'].p50_us:.2f}x that",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.log_group_commit")
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    parser.add_argument("--json", type=Path, metavar="OUT", help="write all figures here")
    parser.add_argument("--dir", type=Path, default=None, help="parent of the temp dir")
    args = parser.parse_args(argv)
    logging.getLogger("embassy").setLevel(logging.ERROR)
    load = os.getloadavg()[0]
    cpus = os.cpu_count() or 1
    if load > cpus / 2:
        print(f"warning: load average {load:.2f} on {cpus} CPUs: noisy", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="embassy-gc-bench-", dir=args.dir) as tmp:
        results = run(Path(tmp), args.quick)
    print(report(results))
    print(f"\n({'quick' if args.quick else 'full'} run, {cpus} CPUs, load {load:.2f} at start)")
    if args.json:
        jsonable = {k: (v.__dict__ if isinstance(v, Stats) else v) for k, v in results.items()}
        args.json.write_text(json.dumps(jsonable, indent=2, sort_keys=True, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
