"""The seal, from the attacker's side: a real workload container in a holder's netns.

Every probe runs inside the workload (cap_drop ALL) against targets this test created; see
tests/integration/canary.py for the topology and the probe scripts. Each test leaves the
netns unsealed (the ``firewall`` fixture unseals whatever happens).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator

import pytest

from embassy.seal import SealState, parse_saved, seal_rules
from embassy.seal.iptables import IptablesFirewall
from embassy.seal.netns import close_default_worker
from tests.integration.canary import (
    ECHO_PORT,
    KEEPALIVE,
    SERVICE,
    SERVICE_PORT,
    Topology,
    expected_response,
    require_real,
    topology,
)

pytestmark = pytest.mark.integration

RESPONSE_SIZE = 256 * 1024


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    require_real()
    with topology() as built:
        # what the launcher does when it creates the holder, before the workload runs
        IptablesFirewall().prepare(built.netns)
        # the service a user's request reaches, in the workload (port in the holder's netns)
        built.py(
            built.workload,
            SERVICE,
            {"port": SERVICE_PORT, "size": RESPONSE_SIZE, "log": "/tmp/service.log"},
            detach=True,
        )
        deadline = time.monotonic() + 20
        while built.connect_from_canary(built.workload_v4, SERVICE_PORT) != "ok":
            assert time.monotonic() < deadline, "workload service did not come up"
            time.sleep(0.2)
        yield built
    close_default_worker()


@pytest.fixture
def firewall(topo: Topology) -> Iterator[IptablesFirewall]:
    fw = IptablesFirewall()
    try:
        yield fw
    finally:
        fw.unseal(topo.netns)
    assert fw.state(topo.netns) is SealState.UNSEALED


def _normalise(save: str) -> str:
    """iptables-save output without comments and without (traffic-driven) counters."""
    lines = [line for line in save.splitlines() if not line.startswith("#")]
    return "\n".join(re.sub(r"\[\d+:\d+\]", "[_:_]", line) for line in lines)


HOST_SAVES = ("iptables-legacy-save", "ip6tables-legacy-save", "iptables-save", "ip6tables-save")


def host_rules(topo: Topology) -> dict[str, str]:
    """The host netns's rules: legacy xtables in full; of Docker's nf_tables rules, the lines
    about this test's bridge (other tests on this machine create and remove networks of
    their own concurrently, which changes the rest); and any line naming our chains."""
    bridge = f"br-{topo.network.id[:12]}"
    out = {}
    for command in HOST_SAVES:
        result = subprocess.run([command], capture_output=True, text=True, check=True)
        text = _normalise(result.stdout)
        if "legacy" not in command:
            keep = [line for line in text.splitlines() if bridge in line or "EMBASSY" in line]
            text = "\n".join(keep)
        out[command] = text
    assert "EMBASSY" not in "".join(out.values()), "our chains must never be in the host netns"
    return out


def netns_saved(topo: Topology) -> str:
    return topo.netns_save("iptables-legacy-save") + topo.netns_save("ip6tables-legacy-save")


def _log(topo: Topology, container: object, path: str) -> list[dict[str, float]]:
    return [json.loads(line) for line in topo.cat(container, path).splitlines() if line.strip()]


def _all(results: dict[str, str], expected: str) -> list[str]:
    return [name for name, value in results.items() if not value.startswith(expected)]


def test_probes_before_sealed_after(topo: Topology, firewall: IptablesFirewall) -> None:
    report: dict[str, dict[str, str]] = {}
    before_host = host_rules(topo)
    assert topo.network.id[:12] in before_host["iptables-save"], "Docker's rules for our bridge"
    assert "127.0.0.11" in topo.netns_save("iptables-save", "nat"), "Docker's DNS DNAT in the netns"

    # 1. unsealed: every probe must work, or it proves nothing when it fails later
    before = topo.probes()
    expected_probes = {"tcp_v4", "udp_v4", "icmp_v4", "tcp_gateway_v4", "dns_127.0.0.11"}
    if topo.canary_v6:
        expected_probes |= {"tcp_v6", "udp_v6", "icmp_v6"}
    assert expected_probes <= set(before)
    assert not _all(before, "ok"), before
    report["before"] = before

    # a flow the workload opens itself before the seal, kept open, one byte per 100 ms
    topo.py(
        topo.workload,
        KEEPALIVE,
        {"host": topo.canary_v4, "port": ECHO_PORT, "log": "/tmp/keep.log", "max_seconds": 120},
        detach=True,
    )
    deadline = time.monotonic() + 10
    while sum(1 for e in _log(topo, topo.workload, "/tmp/keep.log") if "n" in e) < 5:
        assert time.monotonic() < deadline, "keep-alive flow never echoed before the seal"
        time.sleep(0.1)

    # 2. sealed
    rules = firewall.seal(topo.netns)
    sealed_at = time.time()
    assert rules == seal_rules()
    assert firewall.state(topo.netns) is SealState.SEALED
    saved = parse_saved(netns_saved(topo))
    assert saved == rules
    assert saved is not None
    assert saved.digest == rules.digest
    assert firewall.seal(topo.netns) == rules  # idempotent
    assert parse_saved(netns_saved(topo)) == rules  # and no duplicate rules
    assert host_rules(topo) == before_host, "seal changed the host's own rules"

    sealed = topo.probes()
    assert not _all(sealed, "fail"), sealed
    report["sealed"] = sealed
    time.sleep(1.0)  # let the keep-alive try ~10 more bytes while sealed
    unsealed_at = time.time()

    # 3. unsealed again
    firewall.unseal(topo.netns)
    firewall.unseal(topo.netns)  # idempotent
    assert firewall.state(topo.netns) is SealState.UNSEALED
    assert parse_saved(netns_saved(topo)) is None
    assert host_rules(topo) == before_host, "unseal changed the host's own rules"
    after = topo.probes()
    assert not _all(after, "ok"), after
    report["after"] = after

    # the workload's own pre-seal flow: nothing either way while sealed, resumes after
    margin = 0.05
    deadline = time.monotonic() + 60
    while True:
        keep = _log(topo, topo.workload, "/tmp/keep.log")
        resumed = [e for e in keep if "n" in e and e["t"] > unsealed_at]
        if resumed or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    got_sealed = [e for e in keep if "n" in e and sealed_at + margin < e["t"] < unsealed_at]
    echo = _log(topo, topo.canary_py, "/tmp/echo.log")
    canary_sealed = [e for e in echo if sealed_at + margin < e["t"] < unsealed_at]
    assert not any("send-error" in str(e.get("event", "")) for e in keep), keep
    assert got_sealed == [], "the workload received echoes on its own flow while sealed"
    assert canary_sealed == [], "the canary received bytes of the workload's flow while sealed"
    assert resumed, "the workload's own flow did not resume after unseal"
    report["own_flow"] = {
        "before": "echoed",
        "sealed": f"workload got {len(got_sealed)} echoes, canary got {len(canary_sealed)} chunks",
        "after": f"resumed {resumed[0]['t'] - unsealed_at:.2f}s after unseal",
    }
    print("\nSEAL PROBES", json.dumps(report, indent=1, sort_keys=True))


def _inbound(topo: Topology, firewall: IptablesFirewall, host: str, flush_neigh: bool) -> None:
    tag = host.replace(":", "_").replace(".", "_")
    files = {k: f"/tmp/{k}-{tag}" for k in ("started", "go", "result")}
    for path in files.values():
        topo.canary_py.exec_run(["rm", "-f", path])
    topo.py(
        topo.canary_py,
        __import__("tests.integration.canary", fromlist=["CLIENT"]).CLIENT,
        {"host": host, "port": SERVICE_PORT, "timeout": 60, **files},
        detach=True,
    )
    topo.wait_for(topo.canary_py, files["started"])
    # the service has part 1 of the request before the seal
    deadline = time.monotonic() + 10
    while not any(e.get("got") == 6 for e in _log(topo, topo.workload, "/tmp/service.log")):
        assert time.monotonic() < deadline, "the service never got part 1"
        time.sleep(0.1)

    firewall.seal(topo.netns)
    assert firewall.state(topo.netns) is SealState.SEALED
    # a NEW inbound connection while sealed fails
    assert topo.connect_from_canary(host, SERVICE_PORT).startswith("fail"), (
        "new inbound while sealed"
    )
    if flush_neigh:
        # forget the neighbours on both sides: the flow now needs NDP while sealed
        topo.netns_cmd(topo.holder_pid, "ip", "-6", "neigh", "flush", "all")
        topo.netns_cmd(topo.canary_pid(), "ip", "-6", "neigh", "flush", "all")
    topo.canary_py.exec_run(["touch", files["go"]])
    topo.wait_for(topo.canary_py, files["result"], seconds=60)
    result = json.loads(topo.cat(topo.canary_py, files["result"]))
    assert firewall.state(topo.netns) is SealState.SEALED
    firewall.unseal(topo.netns)
    assert result.get("received") == RESPONSE_SIZE, result
    assert result["sha256"] == expected_response(RESPONSE_SIZE)
    assert topo.connect_from_canary(host, SERVICE_PORT) == "ok", "new inbound after unseal"


def test_pending_inbound_request_completes_while_sealed_v4(
    topo: Topology, firewall: IptablesFirewall
) -> None:
    _inbound(topo, firewall, topo.workload_v4, flush_neigh=False)


def test_pending_inbound_request_completes_while_sealed_v6_with_ndp(
    topo: Topology, firewall: IptablesFirewall
) -> None:
    if not topo.workload_v6:
        pytest.skip(f"no IPv6 on the test network: {topo.extra.get('ipv6')}")
    _inbound(topo, firewall, topo.workload_v6, flush_neigh=True)


def test_workload_restart_stays_sealed(topo: Topology, firewall: IptablesFirewall) -> None:
    firewall.seal(topo.netns)
    pid = topo.holder_pid
    topo.workload.restart(timeout=2)
    topo.workload.reload()
    assert topo.holder_pid == pid, "the holder (and its netns) must outlive the workload"
    assert firewall.state(topo.netns) is SealState.SEALED
    sealed = topo.probes()
    assert not _all(sealed, "fail"), sealed
    firewall.unseal(topo.netns)
    after = topo.probes()
    assert not _all(after, "ok"), after
    # the restart killed the service: start it again for any later test
    topo.py(
        topo.workload,
        SERVICE,
        {"port": SERVICE_PORT, "size": RESPONSE_SIZE, "log": "/tmp/service.log"},
        detach=True,
    )


def test_partial_state_is_detected_and_repaired(topo: Topology, firewall: IptablesFirewall) -> None:
    rules = firewall.seal(topo.netns)
    # tamper: remove one rule by hand in the netns
    topo.netns_cmd(
        topo.holder_pid,
        "iptables-legacy",
        "-D",
        "EMBASSY-SEAL-OUT",
        "-d",
        "127.0.0.11/32",
        "-j",
        "DROP",
    )
    assert firewall.state(topo.netns) is SealState.PARTIAL
    saved = parse_saved(netns_saved(topo))
    assert saved is not None
    assert saved != rules
    assert firewall.seal(topo.netns) == rules
    assert firewall.state(topo.netns) is SealState.SEALED
    assert parse_saved(netns_saved(topo)) == rules

    # tamper: an ACCEPT ahead of our jump (it would see packets before the seal does)
    topo.netns_cmd(topo.holder_pid, "ip6tables-legacy", "-I", "OUTPUT", "1", "-j", "ACCEPT")
    assert firewall.state(topo.netns) is SealState.PARTIAL
    assert firewall.seal(topo.netns) == rules
    assert firewall.state(topo.netns) is SealState.SEALED
    firewall.unseal(topo.netns)
    topo.netns_cmd(topo.holder_pid, "ip6tables-legacy", "-D", "OUTPUT", "-j", "ACCEPT")

    # half-unsealed: an empty chain of ours left behind is PARTIAL, and unseal cleans it
    topo.netns_cmd(topo.holder_pid, "iptables-legacy", "-N", "EMBASSY-SEAL-FWD")
    assert firewall.state(topo.netns) is SealState.PARTIAL
    firewall.unseal(topo.netns)
    assert firewall.state(topo.netns) is SealState.UNSEALED
