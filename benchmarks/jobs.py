"""Job mode: a job's latency from the warm pool against ``docker run --rm`` of the same
image doing the same work, jobs per second at 1, 2 and 8 at once, where the time goes,
under runc and gVisor (runsc-nonet).

Run from the repository root (root, dockerd up, the images built)::

    .venv/bin/python -m benchmarks.jobs [--jobs 20] [--runtimes runc,runsc-nonet] [--json OUT]

Both sides do the same work on the same bytes: decrypt the user's input stream, compute
the example's summary, encrypt the result with a result key. The job side goes through the
daemon (payload unwrapped, input into the spool, job-started statement, keys over the
socket, commit, destroy and check gone, job-destroyed statement); the baseline is one
``docker run --rm --network none --read-only`` of the job image, timed from the command to
its exit (container create, start, work, removal). Each job's ``timings_us`` (from the
daemon) say where its time went: waiting for the warm container to take its keys, the job's
own work and commit, destruction and the statement.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.stats import percentile

JOB_IMAGE = "embassy/job-service:latest"
REQUEST = {"text": "the quick brown fox jumps over the lazy dog\n" * 64}
BASELINE = r"""
import hashlib, io, json, os
from workload_sdk.stream import decrypt_stream
from workload_sdk.results import encrypt_result
key = bytes.fromhex(os.environ["KEY"]); pid = bytes.fromhex(os.environ["PID"])
with open("/job/input", "rb") as f:
    data = b"".join(bytes(c) for c in decrypt_stream(key, f, expected_payload_id=pid))
text = json.loads(data)["text"]
out = json.dumps({"chars": len(text), "words": len(text.split()),
                  "sha256": hashlib.sha256(text.encode()).hexdigest()}).encode()
with open("/tmp/output", "wb") as f:
    encrypt_result(os.urandom(32), io.BytesIO(out), f)
"""


def _summary(samples: list[float]) -> dict[str, float]:
    return {
        "n": len(samples),
        "p50_ms": round(percentile(samples, 50) * 1000, 1),
        "p99_ms": round(percentile(samples, 99) * 1000, 1),
    }


def _baseline(runtime: str | None, n: int, workdir: Path) -> list[float]:
    from workload_sdk.stream import encrypt_stream

    key, pid = os.urandom(32), os.urandom(16)
    spool = workdir / "baseline"
    spool.mkdir(exist_ok=True)
    with (spool / "input").open("wb") as dst:
        encrypt_stream(key, pid, io.BytesIO(json.dumps(REQUEST).encode()), dst)
    os.chmod(spool / "input", 0o444)
    argv = [
        "docker", "run", "--rm", "--network", "none", "--read-only",
        "--tmpfs", "/tmp:size=64m", "--cap-drop", "ALL",
        "--security-opt", "no-new-privileges:true", "--user", "10001:10001",
        "-v", f"{spool}:/job:ro", "-e", f"KEY={key.hex()}", "-e", f"PID={pid.hex()}",
        *(["--runtime", runtime] if runtime else []),
        JOB_IMAGE, "python3", "-c", BASELINE,
    ]  # fmt: skip
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, timeout=120)
        samples.append(time.perf_counter() - t0)
    return samples


def _daemon(runtime: str | None, root: Path, pool: int) -> Any:
    from tests.integration.conftest import Daemon

    lines = [f"  image: {JOB_IMAGE}", '  user: "10001:10001"', f"  pool_size: {pool}"]
    lines += ["  max_concurrent: 8", "  deadline_seconds: 60"]
    if runtime:
        lines.append(f"  runtime: {runtime}")
    root.mkdir(parents=True, exist_ok=True)
    daemon = Daemon(root, 'socket_group: "10001"\njobs:\n' + "\n".join(lines) + "\n")
    daemon.start()
    return daemon


def _jobs(runtime: str | None, n: int, root: Path) -> dict[str, Any]:
    from embassy.client import call
    from tests.integration.test_jobs import User

    out: dict[str, Any] = {}
    daemon = _daemon(runtime, root / "seq", pool=2)
    try:
        user = User(daemon)
        time.sleep(2)  # the pool warms
        latencies, steps = [], {}
        for _ in range(n):
            t0 = time.perf_counter()
            status = user.wait(user.submit(REQUEST))
            latencies.append(time.perf_counter() - t0)
            assert status["state"] == "done", status
            for k, v in status["timings_us"].items():
                steps.setdefault(k, []).append(v / 1_000_000)
            time.sleep(0.5)  # the pool refills between sequential jobs
        out["latency"] = _summary(latencies)
        out["where_the_time_goes"] = {k: _summary(v) for k, v in steps.items()}
        out["health"] = call(daemon.socket, "GET", "/v1/health")["status"]
    finally:
        daemon.stop()
        daemon.cleanup()
    daemon = _daemon(runtime, root / "conc", pool=8)
    try:
        user = User(daemon)
        time.sleep(4)
        rates = {}
        for concurrency in (1, 2, 8):
            total = max(8, 2 * concurrency)
            done: list[float] = []
            lock = threading.Lock()

            def worker(
                count: int, user: Any = user, done: list[float] = done, lock: Any = lock
            ) -> None:
                for _ in range(count):
                    status = user.wait(user.submit(REQUEST))
                    assert status["state"] == "done", status
                    with lock:
                        done.append(time.perf_counter())

            t0 = time.perf_counter()
            threads = [
                threading.Thread(target=worker, args=(total // concurrency,))
                for _ in range(concurrency)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            rates[str(concurrency)] = round(len(done) / (time.perf_counter() - t0), 2)
            time.sleep(3)  # the pool refills
        out["jobs_per_second"] = rates
    finally:
        daemon.stop()
        daemon.cleanup()
    return out


def run(n: int, runtimes: list[str | None]) -> dict[str, Any]:
    results: dict[str, Any] = {"cpus": os.cpu_count(), "jobs": n}
    with tempfile.TemporaryDirectory(prefix="jobs-bench-", dir="/tmp") as tmp:
        for runtime in runtimes:
            name = runtime or "runc"
            root = Path(tmp) / name
            root.mkdir()
            figures = _jobs(runtime, n, root)
            base = _baseline(runtime, n, root)
            figures["docker_run_rm"] = _summary(base)
            figures["ratio_p50"] = round(
                figures["latency"]["p50_ms"] / figures["docker_run_rm"]["p50_ms"], 3
            )
            figures["ratio_p99"] = round(
                figures["latency"]["p99_ms"] / figures["docker_run_rm"]["p99_ms"], 3
            )
            results[name] = figures
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=20, help="sequential jobs per runtime")
    parser.add_argument("--runtimes", default="runc,runsc-nonet")
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()
    runtimes = [None if r == "runc" else r for r in args.runtimes.split(",") if r]
    results = run(args.jobs, runtimes)
    text = json.dumps(results, indent=2, sort_keys=True)
    sys.stdout.write(text + "\n")
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
