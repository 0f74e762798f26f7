"""What sealing costs: the gate's flip, flat in the number of other workloads; open and close
against the statements they must write.

Run as root from the repository root::

    .venv/bin/python -m benchmarks.seal [--quick]

Part 1, the gate. Each "workload" is a process in a network namespace of its own
(``unshare --net sleep``) wired by the embassy's real :class:`~embassy.net.link.LinkMaker`
to a bridge of its own (one embassy, one bridge), its gate closed by a real
:class:`~embassy.seal.keeper.SealKeeper`. The target's seal (``close``: link down, layer-3
jumps in) and unseal (``open``: jumps out, link up) are timed with 1, 100 and 1,000 other
sealed workloads present. Baselines in the same run: one bare ``RTM_NEWLINK`` flip of a veth
host end (the link's floor) and one bare python-iptables single-rule insert+delete commit in
a namespace (the floor of one commit; the layer-3 flip is one commit per family).

Part 2, sessions. An embassy on its own swtpm (real statement log: sign, write, fsync, PCR
extend) and the target's real keeper: ``SessionManager.open`` and ``close`` against the
floor, ``StatementLog.append_statement`` of a statement of the same size, interleaved in
one loop so that load hits both alike.

Everything made is removed at the end, whatever happens (and leftovers of a killed run at
the start).
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import iptc

from benchmarks.stats import percentile
from benchmarks.swtpm_embassy import swtpm_embassy
from embassy.net.link import LinkMaker
from embassy.net.plan import LinkPlan
from embassy.net.rtnl import Rtnl
from embassy.seal.gate import Gate
from embassy.seal.iptables import IptablesL3
from embassy.seal.keeper import SealKeeper
from embassy.seal.netns import NetnsWorker
from embassy.sessions.manager import SessionManager, WorkloadIdentity
from embassy.wire.statement import LIFECYCLE_V1

PREFIX = "ebz"  # bridges ebzb<i>, host ends ebzh<i>


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


def _stats(samples: list[float]) -> str:
    return f"p50 {percentile(samples, 50):7.3f} ms  p99 {percentile(samples, 99):7.3f} ms"


def _timed(fn: Callable[[], object], n: int) -> list[float]:
    samples = []
    gc.disable()
    try:
        for _ in range(n):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
    finally:
        gc.enable()
    return samples


class Workloads:
    """Namespaces wired to bridges of their own, gates closed; all removed on close."""

    def __init__(self, worker: NetnsWorker, rtnl: Rtnl, l3: IptablesL3) -> None:
        self._worker, self._rtnl, self._l3 = worker, rtnl, l3
        self.procs: list[subprocess.Popen[bytes]] = []
        self.keepers: list[SealKeeper] = []

    def add(self, *, sealed: bool = True) -> SealKeeper:
        i = len(self.procs)
        bridge = f"{PREFIX}b{i}"
        _sh("ip", "link", "add", bridge, "type", "bridge")
        _sh("ip", "link", "set", bridge, "up")
        proc = subprocess.Popen(["unshare", "--net", "sleep", "3600"])
        self.procs.append(proc)
        net = ipaddress.IPv4Network((f"10.{100 + i // 250}.{i % 250}.0", 24))
        plan = LinkPlan(
            host_name=f"{PREFIX}h{i}",
            bridge=bridge,
            mtu=None,
            ipv4=ipaddress.IPv4Interface((net.broadcast_address - 1, 24)),
            gateway4=net.network_address + 1,
        )
        maker = LinkMaker(plan, rtnl=self._rtnl, worker=self._worker, l3=self._l3)
        keeper = SealKeeper(maker, Gate(self._rtnl, self._l3), container_id="bench")
        deadline = time.monotonic() + 5
        while not os.path.exists(f"/proc/{proc.pid}/ns/net") or _same_netns(proc.pid):
            if time.monotonic() > deadline:
                raise RuntimeError("unshare did not make a namespace")
            time.sleep(0.005)
        keeper.workload_started(proc.pid)
        if not sealed:
            keeper.open()
        self.keepers.append(keeper)
        return keeper

    def close(self) -> None:
        for keeper in self.keepers:
            keeper.workload_stopped()
        for proc in self.procs:
            proc.kill()
            proc.wait(10)
        cleanup()


def _same_netns(pid: int) -> bool:
    return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat("/proc/self/ns/net").st_ino


def cleanup() -> None:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(PREFIX):
            subprocess.run(["ip", "link", "del", name], capture_output=True, check=False)


def _baseline_link(rtnl: Rtnl, n: int) -> list[float]:
    _sh("ip", "link", "add", f"{PREFIX}x0", "type", "veth", "peer", "name", f"{PREFIX}x1")
    index = rtnl.link_by_name(f"{PREFIX}x0")
    assert index is not None
    state = [False]

    def flip() -> None:
        state[0] = not state[0]
        rtnl.set_up(index.index, state[0])

    return _timed(flip, n)


def _baseline_commit(worker: NetnsWorker, netns: Path, n: int) -> list[float]:
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

    return worker.run(netns, lambda: _timed(once, n))


def part_gate(
    args: argparse.Namespace,
    workloads: Workloads,
    target: SealKeeper,
    rtnl: Rtnl,
    worker: NetnsWorker,
) -> None:
    iterations = 50 if args.quick else 300
    others_counts = (1, 10, 100) if args.quick else (1, 100, 1000)
    link_base = _baseline_link(rtnl, iterations * 2)
    commit_base = _baseline_commit(
        worker, Path(f"/proc/{workloads.procs[0].pid}/ns/net"), iterations
    )
    rows: list[tuple[str, list[float], list[float]]] = []

    def measure(label: str) -> None:
        seal: list[float] = []
        unseal: list[float] = []
        for _ in range(iterations):
            # Complete flips: the link and both families' layer-3 jumps (the daemon overlaps
            # a seal with the seal statement; part 2 measures that).
            seal += _timed(lambda: (target.close(), target.settle()), 1)
            unseal += _timed(lambda: (target.open(), target.settle()), 1)
        rows.append((label, seal, unseal))

    for wanted in others_counts:
        print(f"  wiring and sealing {wanted} other workloads ...", file=sys.stderr, flush=True)
        while len(workloads.keepers) - 1 < wanted:
            workloads.add(sealed=True)
        measure(str(wanted))
    # A link going down makes the kernel walk the host's IPv6 routes (fib6_clean_all), a
    # few per other embassy's bridge: the same others, their bridges without IPv6.
    for i in range(1, len(workloads.keepers)):
        knob = Path(f"/proc/sys/net/ipv6/conf/{PREFIX}b{i}/disable_ipv6")
        if knob.exists():
            knob.write_text("1")
    measure(f"{others_counts[-1]}, bridges w/o IPv6")
    print()
    print("Part 1: the gate (link + layer-3 rules) of one workload")
    print(f"  baseline: bare link flip (RTM_NEWLINK)         {_stats(link_base)}")
    print(f"  baseline: bare iptc insert+delete commit       {_stats(commit_base)}")
    print(f"  {'other sealed workloads':<24} {'seal':>36} {'unseal':>36}")
    base = percentile(commit_base, 50)
    for label, seal, unseal in rows:
        print(f"  {label:<24} {_stats(seal):>36} {_stats(unseal):>36}")
    for label, seal, unseal in rows:
        print(
            f"  {label:>22} others: seal/commit {percentile(seal, 50) / base:5.2f}x, "
            f"unseal/commit {percentile(unseal, 50) / base:5.2f}x, "
            f"seal p50 / with {rows[0][0]}: {percentile(seal, 50) / percentile(rows[0][1], 50):.2f}"
        )


def part_sessions(args: argparse.Namespace, target: SealKeeper, label: str) -> None:
    n = 60 if args.quick else 300
    with swtpm_embassy() as embassy:
        manager = SessionManager(
            log=embassy.log,
            seal=target,
            workload=WorkloadIdentity("sha256:" + "ab" * 32, "c0ffee" * 10, bytes(32)),
            token_key=bytes(32),
        )
        manager.reconcile()
        body = {"event": "bench", "session": "00" * 16, "pad": "x" * 300}
        floor: list[float] = []
        opens: list[float] = []
        closes: list[float] = []
        for _ in range(10):  # warm-up
            opened = manager.open(60, release=lambda s: None)
            manager.close(opened.session, opened.token, bytes(32))
            manager.settle_gate()
        gc.disable()
        try:
            for _ in range(n):
                t0 = time.perf_counter()
                embassy.log.append_statement(LIFECYCLE_V1, [], body)
                t1 = time.perf_counter()
                opened = manager.open(60, release=lambda s: None)
                t2 = time.perf_counter()
                manager.close(opened.session, opened.token, bytes(32))
                manager.settle_gate()  # as the daemon's close does before it answers
                t3 = time.perf_counter()
                floor.append((t1 - t0) * 1e3)
                opens.append((t2 - t1) * 1e3)
                closes.append((t3 - t2) * 1e3)
        finally:
            gc.enable()
    f50 = percentile(floor, 50)
    print()
    print(f"Part 2 ({label}): a session's open and close against the statement each must write")
    print(f"  floor: one statement (signed, fsync'd, PCR-extended)  {_stats(floor)}")
    print(f"  open  (seal, check, statement, check, release)        {_stats(opens)}")
    print(f"  close (token, statement, unseal)                      {_stats(closes)}")
    print(
        f"  open/floor {percentile(opens, 50) / f50:.2f}x  "
        f"close/floor {percentile(closes, 50) / f50:.2f}x (p50s)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations, up to 100 others")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("benchmarks.seal needs root (namespaces, links, netfilter)", file=sys.stderr)
        return 2
    load = os.getloadavg()[0]
    if load > (os.cpu_count() or 1) / 2:
        print(f"warning: load average {load:.2f}: figures will be noisy", file=sys.stderr)
    cleanup()
    worker = NetnsWorker()
    rtnl = Rtnl()
    l3 = IptablesL3(worker)
    workloads = Workloads(worker, rtnl, l3)
    try:
        target = workloads.add(sealed=False)
        part_sessions(args, target, "one workload")
        part_gate(args, workloads, target, rtnl, worker)
        part_sessions(args, target, f"{len(workloads.keepers) - 1} other sealed workloads")
    finally:
        workloads.close()
        l3.close()
        worker.close()
        rtnl.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
