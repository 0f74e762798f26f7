"""What the Prometheus metrics cost: a session's open and close with and without them, in one run.

Run from the repository root::

    .venv/bin/python -m benchmarks.metrics_cost [--quick]

An embassy on its own swtpm (real statement log: sign, write, fsync, PCR extend) and a
session manager on an in-memory seal (no netlink or iptables: the gate's cost is in
benchmarks/seal.py, and leaving it out makes the metrics' share look larger, not smaller).
Every metric call site of the daemon on this path runs (the session manager's and the
statement log's), switched on and off per iteration (A/B interleaved, so load hits both
alike). Then each call alone, and a scrape (``Metrics.render``) of a populated registry.
"""

from __future__ import annotations

import argparse
import gc
import logging
import time
from collections.abc import Callable

from benchmarks.stats import percentile
from benchmarks.swtpm_embassy import swtpm_embassy
from embassy.daemon.metrics import Metrics
from embassy.net.identity import NetnsId
from embassy.seal.proof import SealProof
from embassy.sessions.manager import SessionManager, WorkloadIdentity


class SwitchedMetrics(Metrics):
    """The daemon's metrics, whose event calls can be turned into no-ops between calls."""

    on = True

    def session_opened(self, seconds: float) -> None:
        if self.on:
            super().session_opened(seconds)

    def session_closed(self, seconds: float) -> None:
        if self.on:
            super().session_closed(seconds)

    def statements(self, count: int) -> None:
        if self.on:
            super().statements(count)

    def log_commit(self) -> None:
        if self.on:
            super().log_commit()

    def checkpoint(self) -> None:
        if self.on:
            super().checkpoint()


class _Seal:
    """A seal that is always in force: the session manager's ordering without a kernel."""

    quarantined = False

    def close(self) -> SealProof:
        return SealProof(NetnsId(1, 4026531840), "ewbench", "00" * 32)

    def open(self) -> str:
        return "unsealed"

    def settle(self) -> None:
        pass

    def check(self, proof: SealProof, *, settled: bool = True) -> None:
        pass

    def status(self) -> dict[str, object]:
        return {"gate": "bench"}


def _stats(ms: list[float]) -> str:
    return (
        f"p50 {percentile(ms, 50):7.3f} ms  p99 {percentile(ms, 99):7.3f} ms  "
        f"mean {sum(ms) / len(ms):7.3f} ms"
    )


def _per_call(fn: Callable[[], object], n: int) -> float:
    """Mean microseconds of ``fn`` over ``n`` calls (after a warm-up)."""
    for _ in range(1000):
        fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.metrics_cost")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    logging.getLogger("embassy").setLevel(logging.ERROR)
    n = 100 if args.quick else 400
    metrics = SwitchedMetrics()
    timings: dict[bool, tuple[list[float], list[float]]] = {True: ([], []), False: ([], [])}
    # The default checkpoint interval: what a session pays in production.
    with swtpm_embassy(checkpoint_every=64, metrics=metrics) as embassy:
        manager = SessionManager(
            log=embassy.log,
            seal=_Seal(),
            workload=WorkloadIdentity("sha256:" + "ab" * 32, "c0ffee" * 10, bytes(32)),
            token_key=bytes(32),
            metrics=metrics,
        )
        for _ in range(20):  # warm-up
            opened = manager.open(60, release=lambda s: None)
            manager.close(opened.session, opened.token, bytes(32))
        gc.disable()
        try:
            for i in range(2 * n):
                metrics.on = i % 2 == 0
                t0 = time.perf_counter()
                opened = manager.open(60, release=lambda s: None)
                t1 = time.perf_counter()
                manager.close(opened.session, opened.token, bytes(32))
                t2 = time.perf_counter()
                opens, closes = timings[metrics.on]
                opens.append((t1 - t0) * 1e3)
                closes.append((t2 - t1) * 1e3)
        finally:
            gc.enable()
            metrics.on = True
        scrape_us = _per_call(embassy.metrics.render, 2000)
        scrape_bytes = len(embassy.metrics.render())

    calls = 200_000
    m = Metrics()
    print(f"Sessions on swtpm, {n} with and {n} without metrics, interleaved:")
    for label, on in (("with   ", True), ("without", False)):
        opens, closes = timings[on]
        print(f"  open  {label}  {_stats(opens)}")
        print(f"  close {label}  {_stats(closes)}")
    for i, what in enumerate(("open", "close")):
        with_p50 = percentile(timings[True][i], 50)
        without_p50 = percentile(timings[False][i], 50)
        print(
            f"  {what}: p50 with/without {with_p50 / without_p50:.3f}x "
            f"({(with_p50 - without_p50) * 1e3:+.1f} us)"
        )
    print("Each call alone (mean):")
    singles: list[tuple[str, Callable[[], object]]] = [
        ("session_opened (counter + histogram)", lambda: m.session_opened(0.002)),
        ("statements + log_commit", lambda: (m.statements(1), m.log_commit())),
        ("rejection by code (bounded label)", lambda: m.rejection("activation-corrupt")),
    ]
    for name, fn in singles:
        print(f"  {name:38s} {_per_call(fn, calls):.2f} us")
    print(f"Scrape (render, {scrape_bytes} bytes): {scrape_us:.0f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
