"""What the sealed-request protocol adds to one request of the example workload.

Run as root from the repository root (dockerd running, images built)::

    .venv/bin/python -m benchmarks.protocol [--quick] [--json OUT]

It starts a real daemon the way the integration tests do (``embassy serve`` with its own
swtpm, data dir and socket, via ``tests/integration/conftest.py``'s ``Daemon``), running
``embassy/sealed-service:latest`` with its port published on loopback. For each input size
it times, on a fresh connection per request and alternating the two:

- (a) ``POST /baseline``: the same computation over the PLAINTEXT body, no embassy at all;
- (b) ``POST /infer``: the sealed request (raw stream body, envelope in the
  ``X-Embassy-Envelope`` header): open a session (seal, unwrap), decrypt, compute, close
  (unseal, certify), fetch the log segment. Each request has a fresh payload; sealing the
  input on the user's side is timed separately and is NOT part of the request time.

Then it times the daemon's share on its own, from inside the workload (session routes
answer only the workload's own processes): ``POST /v1/sessions`` (seal the workload,
unwrap the payload) and ``POST /v1/sessions/close`` (+ the log segment fetch, as
``Session.finish`` does), with the SDK over the mounted socket, no HTTP hop and no data.

The daemon is stopped and its containers and network are removed at the end, whatever
happens. No test asserts on these timings.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import gc
import hashlib
import http.client
import io
import json
import logging
import os
import platform
import shutil
import signal
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docker

from embassy.attest.ek import load_pem_bundle
from embassy.cli import main as embassy_main
from embassy.client import call
from embassy.payload.envelope import seal_input
from embassy.verify.identity import verify_identity_document
from embassy.verify.policy import TrustPolicy
from tests.integration.conftest import (
    SEALED_SERVICE_ACCESS,
    SEALED_SERVICE_IMAGE,
    Daemon,
    embassy_id,
    ensure_sealed_service_image,
    published_port,
    remove_embassy_containers,
    wait_for_http,
)

IMAGE = SEALED_SERVICE_IMAGE
WORKLOAD = f"""
workload:
  image: {IMAGE}
  ports: ["127.0.0.1:0:8080/tcp"]
{SEALED_SERVICE_ACCESS}"""
SIZES = (1024, 1024 * 1024)
WARMUP = 3
TEXT = b"the quick brown fox jumps over the lazy dog\n"


@dataclass(frozen=True)
class Stats:
    n: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(samples)
    rank = max(1, min(len(ordered), -(-len(ordered) * q // 100)))
    return ordered[int(rank) - 1]


def stats(samples_s: list[float]) -> Stats:
    ms = [s * 1e3 for s in samples_s]
    return Stats(
        len(ms),
        percentile(ms, 50),
        percentile(ms, 99),
        statistics.fmean(ms),
        min(ms),
        max(ms),
    )


def human_size(n: int) -> str:
    return f"{n // (1024 * 1024)} MiB" if n >= 1024 * 1024 else f"{n // 1024} KiB"


# ---------------------------------------------------------------------------------------
# The world: a daemon, its workload, a user who verified its identity


@dataclass
class World:
    daemon: Daemon
    port: int
    keys: dict[str, Any]
    # What a payload is bound to: the embassy's measurement and its workload's launch digest.
    binding: dict[str, bytes]


def _verified_keys(daemon: Daemon, tmp: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    doc = tmp / "identity.json"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        if embassy_main(["identity", "--socket", str(daemon.socket), "--out", str(doc)]) != 0:
            raise RuntimeError("embassy identity failed")
    identity = verify_identity_document(
        doc.read_bytes(),
        TrustPolicy(
            ek_cas=tuple(load_pem_bundle(daemon.ca_pem().read_bytes())),
            allow_software_tpm=True,
            insecure_any_measurement=True,
        ),
    )
    assert identity.workload is not None
    binding = {
        "measurement": identity.measurement.digest,
        "launch_digest": identity.workload.launch_digest,
    }
    return dict(identity.keys), binding


@contextlib.contextmanager
def running_world(base_dir: str | None) -> Iterator[World]:
    """Start the daemon and its workload; always stop and remove everything afterwards."""
    client = docker.from_env()
    # AF_UNIX paths are limited to 108 bytes: keep the root short.
    root = Path(tempfile.mkdtemp(prefix="emb-proto-", dir=base_dir))
    daemon = Daemon(root, WORKLOAD)
    try:
        ensure_sealed_service_image(client)
        daemon.start()
        port = published_port(client, embassy_id(daemon))
        wait_for_http(port)
        yield World(daemon, port, *_verified_keys(daemon, root))
    finally:
        try:
            if daemon.proc is not None and daemon.proc.poll() is None:
                with contextlib.suppress(Exception):
                    daemon.stop(signal.SIGTERM)
            if (daemon.data_dir / "embassy-id").exists():
                remove_embassy_containers(client, embassy_id(daemon))
        finally:
            daemon.cleanup()
            client.close()
            shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# Requests


def post(port: int, path: str, body: bytes, headers: dict[str, str]) -> dict[str, Any]:
    """One POST on a fresh connection; the JSON reply, or raise on an error status."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(
            "POST",
            path,
            body=body,
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Length": str(len(body)),
                **headers,
            },
        )
        response = conn.getresponse()
        raw = response.read()
    finally:
        conn.close()
    if response.status != 200:
        raise RuntimeError(f"POST {path} -> {response.status}: {raw[:500]!r}")
    reply: dict[str, Any] = json.loads(raw)
    return reply


@dataclass
class Sealed:
    header: str
    stream: bytes
    envelope: dict[str, Any]


def seal(world: World, data: bytes) -> Sealed:
    """The user's side: a fresh payload and the encrypted stream."""
    out = io.BytesIO()
    envelope, _ = seal_input(world.keys, io.BytesIO(data), out, **world.binding)
    env = envelope.to_json()
    header = base64.b64encode(json.dumps(env).encode()).decode()
    return Sealed(header, out.getvalue(), env)


@dataclass
class SizeResult:
    size: int
    baseline: Stats
    sealed: Stats
    user_seal: Stats
    overhead_p50_ms: float
    overhead_p99_ms: float
    ratio_p50: float
    ratio_p99: float


def measure_size(world: World, size: int, n: int) -> SizeResult:
    data = (TEXT * (size // len(TEXT) + 1))[:size]
    expected = hashlib.sha256(data).hexdigest()
    base_s: list[float] = []
    sealed_s: list[float] = []
    user_s: list[float] = []
    for i in range(WARMUP + n):
        t0 = time.perf_counter()
        reply = post(world.port, "/baseline", data, {})
        t1 = time.perf_counter()
        sealed = seal(world, data)
        t2 = time.perf_counter()
        reply_sealed = post(
            world.port, "/infer", sealed.stream, {"X-Embassy-Envelope": sealed.header}
        )
        t3 = time.perf_counter()
        t_base, t_user, t_sealed = t1 - t0, t2 - t1, t3 - t2
        baseline_output = base64.b64decode(reply["output"])
        output = base64.b64decode(reply_sealed["output"])
        if output != baseline_output or json.loads(output)["sha256"] != expected:
            raise RuntimeError(f"wrong output: {output!r} (baseline: {baseline_output!r})")
        if i >= WARMUP:
            base_s.append(t_base)
            user_s.append(t_user)
            sealed_s.append(t_sealed)
    base, sealed_stats = stats(base_s), stats(sealed_s)
    return SizeResult(
        size=size,
        baseline=base,
        sealed=sealed_stats,
        user_seal=stats(user_s),
        overhead_p50_ms=sealed_stats.p50_ms - base.p50_ms,
        overhead_p99_ms=sealed_stats.p99_ms - base.p99_ms,
        ratio_p50=sealed_stats.p50_ms / base.p50_ms,
        ratio_p99=sealed_stats.p99_ms / base.p99_ms,
    )


@dataclass
class DaemonSplit:
    open_session: Stats  # POST /v1/sessions: seal the workload, unwrap the payload
    close_session: Stats  # POST /v1/sessions/close + GET /v1/log (Session.finish)


# Run inside the workload (the example image has workload_sdk in /app): open and finish a
# session for each envelope, timing each; prints the seconds as JSON.
_INSIDE = r"""
import json, sys, time
sys.path.insert(0, "/app")
from workload_sdk.client import EmbassyClient
client = EmbassyClient("/run/embassy/embassy.sock")
opens, closes = [], []
for envelope in json.load(open(sys.argv[1])):
    t0 = time.perf_counter(); session = client.open(envelope); t1 = time.perf_counter()
    session.finish(b"bench"); t2 = time.perf_counter()
    opens.append(t1 - t0); closes.append(t2 - t1)
print(json.dumps({"open": opens, "close": closes}))
"""


def measure_daemon(world: World, n: int) -> DaemonSplit:
    envelopes = [seal(world, b"x").envelope for _ in range(WARMUP + n)]
    status = call(world.daemon.socket, "GET", "/v1/seal")
    workload = docker.from_env().containers.get(status["workload"]["container_id"])
    archive = io.BytesIO()
    data = json.dumps(envelopes).encode()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        info = tarfile.TarInfo("envelopes.json")
        info.size, info.mode = len(data), 0o644
        tar.addfile(info, io.BytesIO(data))
    workload.put_archive("/tmp", archive.getvalue())
    code, out = workload.exec_run(["python3", "-c", _INSIDE, "/tmp/envelopes.json"])
    if code != 0:
        raise RuntimeError(f"the in-workload timing failed: {out[-500:]!r}")
    times = json.loads(out.decode().strip().splitlines()[-1])
    return DaemonSplit(stats(times["open"][WARMUP:]), stats(times["close"][WARMUP:]))


# ---------------------------------------------------------------------------------------
# Report


def _ms(value: float) -> str:
    return f"{value:,.2f} ms"


def print_report(results: list[SizeResult], split: DaemonSplit) -> None:
    head = f"{'input':<8} {'request':<34} {'n':>5} {'p50':>11} {'p99':>11} {'mean':>11}"
    print(head)
    print("-" * len(head))
    for r in results:
        rows = [
            ("(a) POST /baseline, plaintext", r.baseline),
            ("(b) POST /infer, sealed", r.sealed),
            ("    user-side seal (not in b)", r.user_seal),
        ]
        for label, s in rows:
            print(
                f"{human_size(r.size):<8} {label:<34} {s.n:>5} {_ms(s.p50_ms):>11} "
                f"{_ms(s.p99_ms):>11} {_ms(s.mean_ms):>11}"
            )
        print(
            f"{'':<8} {'overhead (b) - (a)':<34} {'':>5} {_ms(r.overhead_p50_ms):>11} "
            f"{_ms(r.overhead_p99_ms):>11}"
        )
        print(
            f"{'':<8} {'ratio (b) / (a)':<34} {'':>5} {r.ratio_p50:>10.1f}x {r.ratio_p99:>10.1f}x"
        )
        print()
    print("the daemon's share, from inside the workload with the SDK (no HTTP hop, no data):")
    for label, s in (
        ("open session (seal + unwrap)", split.open_session),
        ("close session (unseal, log)", split.close_session),
    ):
        print(
            f"{'':<8} {label:<34} {s.n:>5} {_ms(s.p50_ms):>11} {_ms(s.p99_ms):>11} "
            f"{_ms(s.mean_ms):>11}"
        )
    total = split.open_session.p50_ms + split.close_session.p50_ms
    print(f"{'':<8} {'= open + close (p50s)':<34} {'':>5} {_ms(total):>11}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.protocol", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="20 requests per figure, not 200")
    parser.add_argument("--json", metavar="OUT", type=Path, help="also write the figures here")
    parser.add_argument("--dir", help="where to make the temporary directory")
    parser.add_argument("--verbose", action="store_true", help="show embassy log warnings")
    args = parser.parse_args(argv)
    if not args.verbose:  # e.g. the allow_software_tpm warning of identity verification
        logging.getLogger("embassy").setLevel(logging.ERROR)
    n = 20 if args.quick else 200
    load = os.getloadavg()[0]
    cpus = os.cpu_count() or 1
    if load > cpus / 2:
        print(f"warning: load average {load:.2f} on {cpus} CPUs: figures will be noisy")
    started = time.monotonic()
    with running_world(args.dir) as world:
        gc.disable()
        try:
            results = [measure_size(world, size, n) for size in SIZES]
            split = measure_daemon(world, n)
        finally:
            gc.enable()
    elapsed = time.monotonic() - started
    print(
        f"sealed-request protocol, {n} requests per figure, fresh connection each, "
        f"alternating (a) and (b); {elapsed:.1f} s in all"
    )
    print_report(results, split)
    if args.json is not None:
        figures = {
            "meta": {
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "cpus": cpus,
                "loadavg_at_start": load,
                "n": n,
                "warmup": WARMUP,
                "platform": platform.platform(),
                "python": sys.version.split()[0],
                "image": IMAGE,
                "seconds": elapsed,
            },
            "sizes": [asdict(r) for r in results],
            "daemon": asdict(split),
        }
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
