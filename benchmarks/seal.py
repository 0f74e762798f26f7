"""What sealing one workload costs, and whether it depends on the number of other workloads.

Run as root from the repository root::

    .venv/bin/python -m benchmarks.seal [--quick]

Each "workload" is a network namespace made with ``ip netns add`` (the setns path is the
one the daemon uses for a holder's netns; no Docker needed). Seal and unseal latency of one
target netns is measured with 1, 100 and 1,000 OTHER sealed netns present, and with 1,000
extra chains in the host's legacy filter table. The baseline, measured in the same run, is
one bare python-iptables commit of a single rule insert+delete in the host netns. Everything
made here is removed at the end, whatever happens (and leftovers of a killed run are
removed at the start).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import iptc

from embassy.seal.iptables import IptablesFirewall
from embassy.seal.netns import close_default_worker, default_worker

PREFIX = "embassy-bench-"
HOST_CHAIN = "EMBASSY-BENCH-"
HOME = Path("/proc/self/ns/net")


def _ns(name: str) -> Path:
    return Path("/run/netns") / name


def _ip_netns(*argv: str) -> None:
    subprocess.run(["ip", "netns", *argv], check=True, capture_output=True)


def _existing() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, text=True)
    return [ln.split()[0] for ln in out.stdout.splitlines() if ln.startswith(PREFIX)]


def _percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return statistics.median(ordered), p99


def _timed(fn: Callable[[], object], n: int) -> list[float]:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def _host_chains(count: int, add: bool) -> None:
    """Add (or remove) ``count`` chains, each with one rule, in the host's legacy filter."""

    def change() -> None:
        table = iptc.Table(iptc.Table.FILTER)
        table.autocommit = False
        table.refresh()
        try:
            names = [str(c.name) for c in table.chains if str(c.name).startswith(HOST_CHAIN)]
            for name in names:
                table.flush_entries(name)
                table.delete_chain(name)
            if add:
                for i in range(count):
                    chain = table.create_chain(f"{HOST_CHAIN}{i}")
                    rule = iptc.Rule()
                    rule.dst = f"10.{i // 250}.{i % 250}.1/32"
                    rule.target = rule.create_target("DROP")
                    chain.append_rule(rule)
            table.commit()
        finally:
            table.refresh()

    default_worker().run(HOME, change)


def _baseline(n: int) -> list[float]:
    def once() -> None:
        table = iptc.Table(iptc.Table.FILTER)
        table.autocommit = False
        table.refresh()
        rule = iptc.Rule()
        rule.dst = "192.0.2.1/32"
        rule.target = rule.create_target("DROP")
        chain = iptc.Chain(table, "OUTPUT")
        chain.insert_rule(rule)
        chain.delete_rule(rule)
        table.commit()
        table.refresh()

    return default_worker().run(HOME, lambda: _timed(once, n))


def _cleanup() -> None:
    for name in _existing():
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
    _host_chains(0, add=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations, up to 100 others")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("benchmarks.seal needs root (netns, netfilter)", file=sys.stderr)
        return 2
    iterations = 20 if args.quick else 100
    others_counts = (1, 10, 100) if args.quick else (1, 100, 1000)
    host_chain_count = 100 if args.quick else 1000
    fw = IptablesFirewall()
    rows: list[tuple[str, list[float], list[float]]] = []
    _cleanup()
    try:
        baseline = _baseline(iterations * 5)
        target_name = f"{PREFIX}target"
        _ip_netns("add", target_name)
        target = _ns(target_name)
        fw.prepare(target)
        others = 0

        def measure(label: str) -> None:
            seal_ms: list[float] = []
            unseal_ms: list[float] = []
            for _ in range(iterations):
                seal_ms += _timed(lambda: fw.seal(target), 1)
                unseal_ms += _timed(lambda: fw.unseal(target), 1)
            rows.append((label, seal_ms, unseal_ms))

        for wanted in others_counts:
            while others < wanted:
                name = f"{PREFIX}{others}"
                _ip_netns("add", name)
                fw.seal(_ns(name))
                others += 1
            measure(f"{wanted} other sealed netns")
        _host_chains(host_chain_count, add=True)
        measure(f"{others} others + {host_chain_count} host chains")
    finally:
        _cleanup()
        close_default_worker()

    b50, b99 = _percentiles(baseline)
    print(
        f"baseline: bare iptc insert+delete commit, host netns: p50 {b50:.3f} ms  p99 {b99:.3f} ms"
    )
    print(
        f"{'case':<36} {'seal p50':>9} {'p99':>8} {'unseal p50':>11} {'p99':>8} {'seal/base':>10}"
    )
    for label, seal_ms, unseal_ms in rows:
        s50, s99 = _percentiles(seal_ms)
        u50, u99 = _percentiles(unseal_ms)
        print(
            f"{label:<36} {s50:>8.2f}  {s99:>7.2f}  {u50:>10.2f}  {u99:>7.2f}  {s50 / b50:>9.0f}x"
        )
    first = _percentiles(rows[0][1])[0]
    for label, seal_ms, _ in rows[1:]:
        print(f"seal p50 with {label} / with {rows[0][0]}: {_percentiles(seal_ms)[0] / first:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
