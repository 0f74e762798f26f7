"""The workload's link and its gate on the real kernel: a bridge, a namespace, one veth pair.

No Docker here: the test builds what the embassy's network gives a workload (a Linux bridge
holding the gateway addresses) and a "workload" in a network namespace of its own
(``unshare --net sleep``), then drives the real LinkMaker, Gate, SealKeeper and
PortPublisher through ONE NetnsWorker and ONE Rtnl, and checks the kernel with iproute2,
iptables-legacy-save run inside the namespace, and traffic.

Network rule: traffic only between namespaces this test made: listeners bound on the
bridge's addresses (host side) or inside the workload's namespace, raw frames on the
bridge, and 127.0.0.1 for a published port (DNAT'ed into the workload's namespace). Every
name is unique per run and removed in teardown (finally), whatever happens.

Waits have deadlines (a TCP retransmit after the gate opens can take seconds); nothing here
asserts how long anything took: speed belongs to benchmarks/.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import os
import queue
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from embassy.errors import SealError
from embassy.net.identity import NetnsId
from embassy.net.link import LinkMaker, WorkloadLink
from embassy.net.plan import (
    PEER_NAME,
    LinkPlan,
    bridge_name,
    host_link_name,
    ula_subnet,
    workload_address4,
    workload_address6,
    workload_mac,
)
from embassy.net.ports import PortPublisher, choose_ports
from embassy.net.rtnl import Rtnl
from embassy.seal import open_rules, parse_saved, seal_rules
from embassy.seal.gate import Gate
from embassy.seal.iptables import IptablesL3
from embassy.seal.keeper import SealKeeper
from embassy.seal.netns import NetnsWorker
from embassy.seal.rules import SEAL_CHAINS, L3State, state_of
from embassy.workload.spec import PortMapping
from tests.integration.conftest import IN_CI, require

pytestmark = pytest.mark.integration

MTU = 1450
SERVICE_PORT = 8080  # the workload's own listener (inside its namespace)
PROBE_TIMEOUT = 1.5  # seconds a probe waits before it calls the path closed
RESUME_DEADLINE = 60.0  # TCP backs off while the gate is closed: resuming may take seconds
ETH_P_TEST = 0x88B5  # IEEE 802 local experimental ethertype


# -- the kernel, through its own tools ----------------------------------------------------------


def _run(*argv: str, check: bool = True, timeout: float = 30) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr}")
    return result.stdout


def _ns(pid: int) -> str:
    return f"--net=/proc/{pid}/ns/net"


def _inside(pid: int, *argv: str, check: bool = True) -> str:
    return _run("nsenter", _ns(pid), *argv, check=check)


def _ip_json(pid: int | None, *argv: str) -> Any:
    prefix = ("nsenter", _ns(pid)) if pid is not None else ()
    return json.loads(_run(*prefix, "ip", "-j", *argv) or "[]")


def _host_link(name: str) -> dict[str, Any] | None:
    links = [link for link in _ip_json(None, "link", "show") if link["ifname"] == name]
    assert len(links) <= 1
    return links[0] if links else None


def _sysctl(pid: int, name: str) -> str:
    return _inside(pid, "cat", f"/proc/sys/net/{name}").strip()


def _saved_rules(pid: int) -> Any:
    return parse_saved(
        _inside(pid, "iptables-legacy-save", "-t", "filter")
        + _inside(pid, "ip6tables-legacy-save", "-t", "filter")
    )


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 of 198.18.0.0/15 (benchmarking, RFC 2544) that nothing on this host uses."""
    used = [
        ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}").network
        for link in _ip_json(None, "addr", "show")
        for a in link.get("addr_info", [])
        if a.get("family") == "inet"
    ]
    used += [
        ipaddress.ip_network(r["dst"])
        for r in _ip_json(None, "route", "show", "table", "all")
        if r.get("dst", "default") != "default" and "/" in r["dst"] and ":" not in r["dst"]
    ]
    for _ in range(200):
        n = secrets.randbelow(512)
        candidate = ipaddress.IPv4Network(f"198.{18 + n // 256}.{n % 256}.0/24")
        if not any(candidate.overlaps(u) for u in used):
            return candidate
    raise AssertionError("no free /24 in 198.18.0.0/15")


def _require_real() -> None:
    require(
        "ip", "nsenter", "unshare", "iptables-legacy", "iptables-legacy-save",
        "ip6tables-legacy", "ip6tables-legacy-save",
    )  # fmt: skip
    problem = None
    if os.geteuid() != 0:
        problem = "not root"
    elif not Path("/proc/sys/net/ipv6").is_dir():
        problem = "no IPv6 in this kernel"
    if problem is not None:
        msg = f"the link tests need the real kernel: {problem}"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)


# -- traffic --------------------------------------------------------------------------------------

CONNECT = r"""
import socket, sys
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
try:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect((host, port))
        s.sendall(b"ping")
        got = s.recv(4)
    print("ok" if got == b"pong" else "bad " + repr(got))
except OSError as exc:
    print("fail " + type(exc).__name__ + " " + str(exc))
"""

SERVE = r"""
import socket, sys, threading
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", int(sys.argv[1])))
s.listen(16)
print("ready", flush=True)
def serve(c):
    with c:
        c.settimeout(10)
        try:
            if c.recv(4) == b"ping":
                c.sendall(b"pong")
        except OSError:
            pass
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

CHAT = r"""
import socket, sys, threading
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.settimeout(None)
print("connected", flush=True)
def pump():
    buf = b""
    while True:
        data = s.recv(4096)
        if not data:
            print("eof", flush=True)
            return
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            print("got " + line.decode(), flush=True)
threading.Thread(target=pump, daemon=True).start()
for line in sys.stdin:
    s.sendall(line.encode())
"""

RAW = r"""
import socket, sys, time
marker = sys.argv[1].encode()
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
mac = s.getsockname()[4]
frame = b"\xff" * 6 + mac + (0x88B5).to_bytes(2, "big") + marker + bytes(32)
for _ in range(int(sys.argv[2])):
    try:
        s.send(frame)
    except OSError as exc:
        print("send " + type(exc).__name__, flush=True)
    time.sleep(0.02)
print("done", flush=True)
"""


THREAD_JOINS = r"""
import ctypes, os, sys, threading, time
libc = ctypes.CDLL(None, use_errno=True)
def enter():
    fd = os.open(sys.argv[1], os.O_RDONLY)
    if libc.setns(fd, 0x40000000) != 0:
        print("setns failed", flush=True)
        return
    print("in", flush=True)
    time.sleep(600)
threading.Thread(target=enter, daemon=True).start()
time.sleep(600)
"""


def _python(pid: int, script: str, *args: str, timeout: float = 30) -> str:
    return _run("nsenter", _ns(pid), sys.executable, "-I", "-c", script, *args, timeout=timeout)


def _connect_from_inside(pid: int, host: object, port: int) -> str:
    return _python(pid, CONNECT, str(host), str(port), str(PROBE_TIMEOUT)).strip()


def _connect_from_host(host: object, port: int) -> str:
    family = socket.AF_INET6 if ":" in str(host) else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(PROBE_TIMEOUT)
            s.connect((str(host), port))
            s.sendall(b"ping")
            got = s.recv(4)
    except OSError as exc:
        return f"fail {type(exc).__name__} {exc}"
    return "ok" if got == b"pong" else f"bad {got!r}"


class Lines:
    """A child process's stdout, line by line, with deadlines. The reading thread owns the
    pipe: it closes it at the child's end, so :meth:`join` after the child is gone."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self._queue: queue.Queue[str] = queue.Queue()
        assert proc.stdout is not None
        stdout = proc.stdout

        def pump() -> None:
            with stdout:
                for line in stdout:
                    self._queue.put(line.rstrip("\n"))

        self._thread = threading.Thread(target=pump, daemon=True)
        self._thread.start()

    def join(self) -> None:
        self._thread.join(timeout=10)

    def next(self, timeout: float) -> str | None:
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None


class Listener:
    """A TCP listener on the host side (a bridge address) answering b'ping' with b'pong'."""

    def __init__(self, address: object) -> None:
        family = socket.AF_INET6 if ":" in str(address) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((str(address), 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                conn.settimeout(10)
                with contextlib.suppress(OSError):
                    if conn.recv(4) == b"ping":
                        conn.sendall(b"pong")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


def _wait(what: str, ok: Callable[[], bool], deadline: float = RESUME_DEADLINE) -> None:
    end = time.monotonic() + deadline
    while not ok():
        if time.monotonic() > end:
            raise AssertionError(f"gave up waiting: {what}")
        time.sleep(0.1)


# -- the topology ----------------------------------------------------------------------------------


class Net:
    """The embassy's side: a bridge with the gateway addresses, one worker, one Rtnl."""

    def __init__(self, eid: str, plan: LinkPlan) -> None:
        self.eid = eid
        self.plan = plan
        self.worker = NetnsWorker("test-link")
        self.rtnl = Rtnl()
        self.l3 = IptablesL3(self.worker)

    @property
    def ipv4(self) -> ipaddress.IPv4Interface:
        assert self.plan.ipv4 is not None
        return self.plan.ipv4

    @property
    def ipv6(self) -> ipaddress.IPv6Interface:
        assert self.plan.ipv6 is not None
        return self.plan.ipv6

    @property
    def gateway4(self) -> ipaddress.IPv4Address:
        assert self.plan.gateway4 is not None
        return self.plan.gateway4

    @property
    def gateway6(self) -> ipaddress.IPv6Address:
        assert self.plan.gateway6 is not None
        return self.plan.gateway6

    def maker(self) -> LinkMaker:
        """A LinkMaker as a daemon (re)start makes one: same worker, same socket."""
        return LinkMaker(self.plan, rtnl=self.rtnl, worker=self.worker, l3=self.l3)


@pytest.fixture(scope="module")
def net() -> Iterator[Net]:
    _require_real()
    eid = "t" + secrets.token_hex(6)
    subnet = _free_subnet()
    ula = ula_subnet(eid)
    plan = LinkPlan(
        host_name=host_link_name(eid),
        bridge=bridge_name(eid),
        mtu=MTU,
        ipv4=workload_address4(subnet),
        gateway4=subnet.network_address + 1,
        ipv6=workload_address6(ula),
        gateway6=ula.network_address + 1,
        mac=workload_mac(eid),
    )
    made: Net | None = None
    try:
        _run("ip", "link", "add", plan.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{plan.gateway4}/{subnet.prefixlen}", "dev", plan.bridge)
        _run("ip", "-6", "addr", "add", f"{plan.gateway6}/64", "dev", plan.bridge, "nodad")
        _run("ip", "link", "set", plan.bridge, "up")
        made = Net(eid, plan)
        yield made
    finally:
        if made is not None:
            made.l3.close()
            made.rtnl.close()
            made.worker.close()
        _run("ip", "link", "del", plan.host_name, check=False)
        _run("ip", "link", "del", plan.bridge, check=False)


def _cgroup_root() -> Path | None:
    """A cgroup hierarchy this test can make a group in (v2 first, then v1's pids)."""
    for root in (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup")):
        if (root / "cgroup.controllers").exists():
            return root
    for root in (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup/systemd")):
        if (root / "cgroup.procs").exists():
            return root
    return None


class Rig:
    """One test's workloads, links, helpers and keeper; all undone in :meth:`cleanup`."""

    def __init__(self, net: Net) -> None:
        self.net = net
        self.container_id = f"embassy-linktest-{net.eid}"  # the "workload container"
        self.maker = net.maker()
        self.gate = Gate(net.rtnl, net.l3)
        self.keeper = SealKeeper(self.maker, self.gate, self.container_id)
        self._procs: list[subprocess.Popen[str]] = []
        self._lines: dict[int, Lines] = {}
        self._links: list[tuple[LinkMaker, WorkloadLink]] = []
        self._cgroup: Path | None = None

    # processes

    def spawn(self, argv: list[str], *, stdin: bool = False) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self._procs.append(proc)
        return proc

    def workload(self) -> int:
        """A new "workload": a process in a new network namespace, in the container's cgroup."""
        home = NetnsId.of_pid(os.getpid())
        proc = self.spawn(["unshare", "--net", "sleep", "600"])
        _wait("the workload's namespace", lambda: NetnsId.of_pid(proc.pid) != home, 10)
        self._contain(proc.pid)
        return proc.pid

    def _contain(self, pid: int) -> None:
        """Put ``pid`` in a cgroup whose path names the container, as Docker's would."""
        if self._cgroup is None:
            root = _cgroup_root()
            if root is None:
                msg = "no writable cgroup hierarchy to stand in for the container's"
                if IN_CI:
                    pytest.fail(msg)
                pytest.skip(msg)
            self._cgroup = root / self.container_id
            self._cgroup.mkdir()
        (self._cgroup / "cgroup.procs").write_text(str(pid))
        assert self.container_id in Path(f"/proc/{pid}/cgroup").read_text()

    def lines(self, proc: subprocess.Popen[str]) -> Lines:
        self._lines[proc.pid] = Lines(proc)
        return self._lines[proc.pid]

    def serve_inside(self, pid: int, port: int = SERVICE_PORT) -> None:
        proc = self.spawn(["nsenter", _ns(pid), sys.executable, "-I", "-c", SERVE, str(port)])
        assert self.lines(proc).next(10) == "ready"

    # links

    def attach(self, pid: int, *, sealed: bool, maker: LinkMaker | None = None) -> WorkloadLink:
        maker = maker or self.maker
        link = maker.attach(pid, sealed=sealed)
        self._links.append((maker, link))
        return link

    def cleanup(self) -> None:
        with contextlib.suppress(SealError):
            self.keeper.workload_stopped()
        for maker, link in self._links:
            with contextlib.suppress(SealError):
                maker.detach(link)
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
            lines = self._lines.get(proc.pid)
            if lines is not None:
                lines.join()
            elif proc.stdout is not None:
                proc.stdout.close()
        if self._cgroup is not None:
            for _ in range(50):
                try:
                    self._cgroup.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)
        _run("ip", "link", "del", self.net.plan.host_name, check=False)


@pytest.fixture
def rig(net: Net) -> Iterator[Rig]:
    made = Rig(net)
    try:
        yield made
    finally:
        made.cleanup()


def _host_end(net: Net) -> dict[str, Any]:
    link = _host_link(net.plan.host_name)
    assert link is not None, f"no {net.plan.host_name} on the host"
    return link


def _is_up(net: Net) -> bool:
    return "UP" in _host_end(net)["flags"]


# -- attach ----------------------------------------------------------------------------------------


def test_attach_gives_the_namespace_one_link_down(net: Net, rig: Rig) -> None:
    pid = rig.workload()
    assert [link["ifname"] for link in _ip_json(pid, "link", "show")] == ["lo"]
    link = rig.attach(pid, sealed=True)
    assert link.netns == NetnsId.of_pid(pid)

    # Inside: lo and one eth0, with the planned addresses and the default routes.
    links = {x["ifname"]: x for x in _ip_json(pid, "link", "show")}
    assert set(links) == {"lo", PEER_NAME}
    eth0 = links[PEER_NAME]
    assert "UP" in eth0["flags"]
    assert eth0["mtu"] == MTU
    assert eth0["link_index"] == link.host_index  # its peer is the host end
    assert net.plan.mac is not None
    assert eth0["address"] == net.plan.mac.hex(":")  # stable across workload restarts
    assert "UP" in links["lo"]["flags"]
    (addresses,) = [x["addr_info"] for x in _ip_json(pid, "addr", "show", "dev", PEER_NAME)]
    global_addresses = {
        (a["local"], a["prefixlen"]) for a in addresses if a.get("scope") == "global"
    }
    assert global_addresses == {
        (str(net.ipv4.ip), net.ipv4.network.prefixlen),
        (str(net.ipv6.ip), 64),
    }
    (route4,) = [r for r in _ip_json(pid, "-4", "route", "show") if r["dst"] == "default"]
    assert (route4["gateway"], route4["dev"]) == (str(net.gateway4), PEER_NAME)
    (route6,) = [r for r in _ip_json(pid, "-6", "route", "show") if r["dst"] == "default"]
    assert (route6["gateway"], route6["dev"]) == (str(net.gateway6), PEER_NAME)

    # The host end: a port of the bridge, down (the gate is closed).
    host = _host_end(net)
    assert host["ifindex"] == link.host_index
    assert host["master"] == net.plan.bridge
    assert "UP" not in host["flags"]
    assert host["mtu"] == MTU
    assert not net.rtnl.link(link.host_index).up
    assert "NO-CARRIER" in eth0["flags"]  # its peer is down: eth0 has no carrier

    # A leaf namespace: no forwarding, no routing advice taken from the bridge.
    assert _sysctl(pid, "ipv4/ip_forward") == "0"
    assert _sysctl(pid, "ipv4/conf/all/forwarding") == "0"
    assert _sysctl(pid, f"ipv4/conf/{PEER_NAME}/forwarding") == "0"
    assert _sysctl(pid, f"ipv4/conf/{PEER_NAME}/accept_redirects") == "0"
    # IPv4 accepts a redirect when all/ OR the device says so (IN_DEV_RX_REDIRECTS).
    assert _sysctl(pid, "ipv4/conf/all/accept_redirects") == "0"
    assert _sysctl(pid, f"ipv6/conf/{PEER_NAME}/accept_ra") == "0"
    assert _sysctl(pid, f"ipv6/conf/{PEER_NAME}/accept_redirects") == "0"
    assert _sysctl(pid, f"ipv6/conf/{PEER_NAME}/forwarding") == "0"
    assert _sysctl(pid, "ipv6/conf/all/forwarding") == "0"
    assert _sysctl(pid, f"ipv6/conf/{PEER_NAME}/disable_ipv6") == "0"

    # The layer-3 seal was in before the link existed, jumps in (sealed).
    assert _saved_rules(pid) == seal_rules()


def test_attach_open_installs_the_rules_without_jumps(net: Net, rig: Rig) -> None:
    pid = rig.workload()
    rig.attach(pid, sealed=False)
    assert _saved_rules(pid) == open_rules()
    assert not _is_up(net)  # the link is never this module's to open


def test_attach_refuses_a_missing_namespace(net: Net, rig: Rig) -> None:
    pid = rig.workload()
    proc = rig._procs[-1]
    proc.kill()
    proc.wait(timeout=10)
    with pytest.raises(SealError, match=f"workload pid {pid}"):
        rig.attach(pid, sealed=True)
    assert _host_link(net.plan.host_name) is None


def test_attach_adopts_its_own_link_after_a_restart(net: Net, rig: Rig) -> None:
    pid = rig.workload()
    first = rig.attach(pid, sealed=False)
    rig.gate.open(first)
    with _flow_to_host(net, rig, pid) as ((chat, lines, conn), _):
        _say(chat, "before")
        assert _read_line(conn) == "before"

        # A daemon restart: a new LinkMaker adopts the link; the flow goes on.
        second = rig.attach(pid, sealed=False, maker=net.maker())
        assert second.host_index == first.host_index
        assert second.netns == first.netns
        assert _is_up(net)
        assert [x["ifname"] for x in _ip_json(pid, "link", "show")] == ["lo", PEER_NAME]
        _say(chat, "after")
        assert _read_line(conn) == "after"
        conn.sendall(b"down\n")
        assert lines.next(RESUME_DEADLINE) == "got down"


def test_a_new_namespace_gets_a_new_link_and_the_old_one_goes(net: Net, rig: Rig) -> None:
    old_pid = rig.workload()
    old = rig.attach(old_pid, sealed=True)
    new_pid = rig.workload()  # the workload restarted: a new namespace
    new = rig.attach(new_pid, sealed=True)
    assert new.netns != old.netns
    assert new.host_index != old.host_index
    # The old namespace lost its eth0 with its host end; exactly one host end exists.
    assert [x["ifname"] for x in _ip_json(old_pid, "link", "show")] == ["lo"]
    host = _host_end(net)
    assert host["ifindex"] == new.host_index
    assert host["master"] == net.plan.bridge
    assert "UP" not in host["flags"]
    assert [x["ifname"] for x in _ip_json(new_pid, "link", "show")] == ["lo", PEER_NAME]
    with pytest.raises(OSError) as caught:
        net.rtnl.link(old.host_index)
    assert caught.value.errno == errno.ENODEV


def test_detach_removes_both_ends(net: Net, rig: Rig) -> None:
    pid = rig.workload()
    link = rig.attach(pid, sealed=True)
    rig.maker.detach(link)
    assert _host_link(net.plan.host_name) is None
    assert [x["ifname"] for x in _ip_json(pid, "link", "show")] == ["lo"]
    rig._links.clear()


# -- the gate ------------------------------------------------------------------------------------


def _both_ways(net: Net, pid: int, listeners: tuple[Listener, Listener]) -> dict[str, str]:
    v4, v6 = listeners
    return {
        "out_v4": _connect_from_inside(pid, net.gateway4, v4.port),
        "out_v6": _connect_from_inside(pid, net.gateway6, v6.port),
        "in_v4": _connect_from_host(net.ipv4.ip, SERVICE_PORT),
        "in_v6": _connect_from_host(net.ipv6.ip, SERVICE_PORT),
    }


@pytest.fixture
def listeners(net: Net) -> Iterator[tuple[Listener, Listener]]:
    made = (Listener(net.gateway4), Listener(net.gateway6))
    try:
        yield made
    finally:
        for listener in made:
            listener.close()


def test_the_gate_gates_traffic_both_ways(
    net: Net, rig: Rig, listeners: tuple[Listener, Listener]
) -> None:
    pid = rig.workload()
    link = rig.attach(pid, sealed=True)
    rig.serve_inside(pid)

    closed = _both_ways(net, pid, listeners)
    assert all(v.startswith("fail") for v in closed.values()), closed
    assert _saved_rules(pid) == seal_rules()
    assert rig.gate.l3_state(link) is L3State.SEALED

    rig.gate.open(link)
    assert _is_up(net)
    assert _saved_rules(pid) == open_rules()
    assert rig.gate.l3_state(link) is L3State.OPEN
    # Neighbour discovery and carrier take a moment after the link comes up.
    _wait("traffic after open", lambda: set(_both_ways(net, pid, listeners).values()) == {"ok"})

    rig.gate.close(link)
    assert not _is_up(net)
    assert _saved_rules(pid) == seal_rules()
    closed = _both_ways(net, pid, listeners)
    assert all(v.startswith("fail") for v in closed.values()), closed

    rig.gate.open(link)  # and again: the gate is not a one-shot
    _wait("traffic after reopen", lambda: set(_both_ways(net, pid, listeners).values()) == {"ok"})


def test_each_layer_alone_stops_traffic(
    net: Net, rig: Rig, listeners: tuple[Listener, Listener]
) -> None:
    pid = rig.workload()
    link = rig.attach(pid, sealed=False)
    rig.serve_inside(pid)
    # The link alone: layer-3 rules open, host end down.
    assert _saved_rules(pid) == open_rules()
    closed = _both_ways(net, pid, listeners)
    assert all(v.startswith("fail") for v in closed.values()), closed
    # The rules alone: host end up, jumps in.
    net.l3.flip(link.netns_path, sealed=True)
    net.rtnl.set_up(link.host_index, True)
    _wait(
        "carrier", lambda: "NO-CARRIER" not in _ip_json(pid, "link", "show", PEER_NAME)[0]["flags"]
    )
    closed = _both_ways(net, pid, listeners)
    assert all(v.startswith("fail") for v in closed.values()), closed
    net.l3.flip(link.netns_path, sealed=False)
    _wait("traffic", lambda: set(_both_ways(net, pid, listeners).values()) == {"ok"})


class Sniffer:
    """Every frame of the test's ethertype that reaches the bridge."""

    def __init__(self, bridge: str) -> None:
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_TEST))
        self.sock.bind((bridge, 0))
        self.sock.settimeout(0.2)

    def count(self, marker: bytes) -> int:
        seen = 0
        with contextlib.suppress(TimeoutError):
            while True:
                if marker in self.sock.recv(2048):
                    seen += 1
        return seen

    def close(self) -> None:
        self.sock.close()


def test_no_raw_frame_crosses_a_closed_gate(net: Net, rig: Rig) -> None:
    # Raw frames never meet the layer-3 rules: only the link stops them.
    pid = rig.workload()
    link = rig.attach(pid, sealed=True)
    sniffer = Sniffer(net.plan.bridge)
    try:
        marker = f"embassy-{secrets.token_hex(4)}"
        _python(pid, RAW, marker, "25")
        assert sniffer.count(marker.encode()) == 0
        rig.gate.open(link)
        _wait("carrier", lambda: _is_up(net))
        marker = f"embassy-{secrets.token_hex(4)}"
        _python(pid, RAW, marker, "25")
        assert sniffer.count(marker.encode()) > 0
        rig.gate.close(link)
        marker = f"embassy-{secrets.token_hex(4)}"
        _python(pid, RAW, marker, "25")
        assert sniffer.count(marker.encode()) == 0
    finally:
        sniffer.close()


def _say(chat: subprocess.Popen[str], text: str) -> None:
    assert chat.stdin is not None
    chat.stdin.write(text + "\n")
    chat.stdin.flush()


def _read_line(conn: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(4096)
        if not chunk:
            raise AssertionError(f"the connection closed after {data!r}")
        data += chunk
    return data.decode().rstrip("\n")


Chat = tuple[subprocess.Popen[str], Lines, socket.socket]


@contextlib.contextmanager
def _flow_to_host(net: Net, rig: Rig, pid: int) -> Iterator[tuple[Chat, socket.socket]]:
    """One TCP flow from inside the workload to a host listener on the bridge, connected:
    the chat process, its lines, the host's end of the flow; and the listener itself."""
    with socket.create_server((str(net.gateway4), 0)) as listener:
        port = listener.getsockname()[1]
        chat = rig.spawn(
            ["nsenter", _ns(pid), sys.executable, "-I", "-c", CHAT, str(net.gateway4), str(port)],
            stdin=True,
        )
        lines = rig.lines(chat)
        assert lines.next(30) == "connected"
        listener.settimeout(15)
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(RESUME_DEADLINE)
            yield (chat, lines, conn), listener


def test_a_flow_opened_before_the_seal_pauses_and_resumes(net: Net, rig: Rig) -> None:
    pid = rig.workload()
    rig.keeper.workload_started(pid)
    rig.keeper.open()
    with _flow_to_host(net, rig, pid) as ((chat, lines, conn), listener):
        _say(chat, "up-1")
        assert _read_line(conn) == "up-1"
        conn.sendall(b"down-1\n")
        assert lines.next(15) == "got down-1"

        rig.keeper.check(rig.keeper.close())
        # Closed: nothing either way, on the very same connection.
        _say(chat, "up-2")
        conn.settimeout(2.0)
        with pytest.raises(TimeoutError):
            conn.recv(4096)
        conn.sendall(b"down-2\n")
        assert lines.next(2.0) is None

        assert rig.keeper.open() == "unsealed"
        # Open: both resume where they stopped (TCP retransmits); no new connection.
        conn.settimeout(RESUME_DEADLINE)
        assert _read_line(conn) == "up-2"
        assert lines.next(RESUME_DEADLINE) == "got down-2"
        listener.settimeout(0)
        with pytest.raises(BlockingIOError):
            listener.accept()


# -- the keeper's monitor rounds ---------------------------------------------------------------


def test_verify_closes_a_link_set_up_behind_its_back(net: Net, rig: Rig) -> None:
    pid = rig.workload()
    rig.keeper.workload_started(pid)
    proof = rig.keeper.close()
    rig.keeper.check(proof)
    assert rig.keeper.verify().intrusions == []

    _run("ip", "link", "set", net.plan.host_name, "up")
    assert _is_up(net)
    with pytest.raises(SealError, match="is up"):
        rig.keeper.check(proof)
    findings = rig.keeper.verify()
    assert findings.intrusions == [f"the link {net.plan.host_name} was up while sealed"]
    assert not _is_up(net)
    rig.keeper.check(proof)


def test_check_refuses_a_link_deleted_behind_its_back(net: Net, rig: Rig) -> None:
    pid = rig.workload()
    rig.keeper.workload_started(pid)
    proof = rig.keeper.close()
    _run("ip", "link", "del", net.plan.host_name)
    assert [x["ifname"] for x in _ip_json(pid, "link", "show")] == ["lo"]  # silence
    with pytest.raises(SealError, match="cannot read its state"):
        rig.keeper.check(proof)


TAMPERING = {
    "our chains flushed": [("-F", chain) for chain in SEAL_CHAINS],
    "an ACCEPT first in our chains": [
        ("-I", "EMBASSY-SEAL-IN", "1", "-j", "ACCEPT"),
        ("-I", "EMBASSY-SEAL-OUT", "1", "-j", "ACCEPT"),
    ],
    "an ACCEPT ahead of the jumps": [
        ("-I", "INPUT", "1", "-j", "ACCEPT"),
        ("-I", "OUTPUT", "1", "-j", "ACCEPT"),
    ],
    "the jumps deleted": [
        ("-D", "INPUT", "-j", "EMBASSY-SEAL-IN"),
        ("-D", "OUTPUT", "-j", "EMBASSY-SEAL-OUT"),
        ("-D", "FORWARD", "-j", "EMBASSY-SEAL-FWD"),
    ],
}


@pytest.mark.parametrize("tampering", sorted(TAMPERING))
def test_deep_verify_repairs_tampered_rules_while_sealed(
    net: Net, rig: Rig, tampering: str
) -> None:
    pid = rig.workload()
    rig.keeper.workload_started(pid)
    proof = rig.keeper.close()
    for tool in ("iptables-legacy", "ip6tables-legacy"):
        for argv in TAMPERING[tampering]:
            _inside(pid, tool, *argv)
    state = state_of(_saved_rules(pid))
    assert state is not L3State.SEALED
    assert rig.keeper.verify().intrusions == []  # a shallow round does not read the rules
    findings = rig.keeper.verify(deep=True)
    assert findings.intrusions == [f"layer-3 rules were {state.value} while sealed"]
    assert _saved_rules(pid) == seal_rules()
    assert rig.keeper.verify(deep=True).intrusions == []
    assert not _is_up(net)
    rig.keeper.check(proof)


def test_deep_verify_reinstalls_deleted_chains_while_open(net: Net, rig: Rig) -> None:
    pid = rig.workload()
    rig.keeper.workload_started(pid)
    rig.keeper.open()
    for tool in ("iptables-legacy", "ip6tables-legacy"):
        for chain in SEAL_CHAINS:
            _inside(pid, tool, "-F", chain)
        for chain in SEAL_CHAINS:
            _inside(pid, tool, "-X", chain)
    assert _saved_rules(pid) is None
    findings = rig.keeper.verify(deep=True)
    assert findings.repaired == ["layer-3 rules were absent while open"]
    assert _saved_rules(pid) == open_rules()


def test_a_process_joining_the_namespace_is_quarantined(net: Net, rig: Rig) -> None:
    pid = rig.workload()
    rig.keeper.workload_started(pid)
    assert rig.keeper.open() == "unsealed"
    assert rig.keeper.verify().intrusions == []  # the workload itself is no occupant
    assert rig.keeper.verify(deep=True).intrusions == []

    joiner = rig.spawn(["nsenter", _ns(pid), "sleep", "30"])
    _wait("the joiner", lambda: NetnsId.of_pid(joiner.pid) == NetnsId.of_pid(pid), 10)
    assert rig.container_id not in Path(f"/proc/{joiner.pid}/cgroup").read_text()
    assert rig.keeper.verify().intrusions == []  # seen once: a suspect
    assert _is_up(net)
    second = rig.keeper.verify()
    assert len(second.intrusions) == 1
    assert f"pid {joiner.pid}" in second.intrusions[0]
    assert rig.keeper.closed
    assert not _is_up(net)
    assert rig.keeper.status()["quarantine"] != []
    with pytest.raises(SealError, match="quarantined"):
        rig.keeper.check(rig.keeper.close())
    assert rig.keeper.open() == "quarantined"  # the sessions ask to open: still closed
    assert rig.keeper.verify(deep=True).intrusions == []  # reported once
    assert not _is_up(net)

    joiner.kill()
    joiner.wait(timeout=10)
    rig.keeper.verify()
    assert not rig.keeper.closed
    assert _is_up(net)
    assert _saved_rules(pid) == open_rules()


def test_a_thread_joining_the_namespace_stays_quarantined(net: Net, rig: Rig) -> None:
    # Its process's main thread stays home: only a deep round (every thread) sees it.
    pid = rig.workload()
    rig.keeper.workload_started(pid)
    rig.keeper.open()
    joiner = rig.spawn([sys.executable, "-I", "-c", THREAD_JOINS, f"/proc/{pid}/ns/net"])
    assert rig.lines(joiner).next(10) == "in"
    assert NetnsId.of_pid(joiner.pid) != NetnsId.of_pid(pid)
    assert rig.keeper.verify().intrusions == []
    assert rig.keeper.verify(deep=True).intrusions == []  # seen once
    assert len(rig.keeper.verify().intrusions) == 1  # seen again
    for _ in range(12):  # more than a monitor's deep period of shallow rounds
        rig.keeper.verify()
        assert rig.keeper.closed
        assert not _is_up(net)
    joiner.kill()
    joiner.wait(timeout=10)
    rig.keeper.verify()
    assert not rig.keeper.closed
    assert _is_up(net)


def test_status_reads_the_kernel(net: Net, rig: Rig) -> None:
    pid = rig.workload()
    rig.keeper.workload_started(pid)
    status = rig.keeper.status()
    assert status["gate"] == "closed"
    assert status["link_up"] is False
    assert status["l3"] == "sealed"
    assert status["key_release"] == "ready"
    assert status["netns"] == str(NetnsId.of_pid(pid))
    rig.keeper.open()
    status = rig.keeper.status()
    assert (status["gate"], status["link_up"], status["l3"]) == ("open", True, "open")


def test_a_daemon_restart_adopts_the_link_closed_until_told_open(net: Net, rig: Rig) -> None:
    pid = rig.workload()
    rig.keeper.workload_started(pid)
    rig.keeper.open()
    restarted = SealKeeper(net.maker(), Gate(net.rtnl, net.l3), rig.container_id)
    try:
        with _flow_to_host(net, rig, pid) as ((chat, _, conn), _):
            _say(chat, "before")
            assert _read_line(conn) == "before"
            before = net.rtnl.link_by_name(net.plan.host_name)
            assert before is not None
            rig.keeper.close_all()  # the daemon stops (or dies): the link stays as it is
            assert _is_up(net)

            # The next start adopts the link; until the log says otherwise, it is sealed.
            restarted.workload_started(pid)
            after = net.rtnl.link_by_name(net.plan.host_name)
            assert after is not None
            assert after.index == before.index
            assert not _is_up(net)
            assert _saved_rules(pid) == seal_rules()
            restarted.check(restarted.close())

            assert restarted.open() == "unsealed"
            _say(chat, "after")
            assert _read_line(conn) == "after"  # the same flow
    finally:
        with contextlib.suppress(SealError):
            restarted.workload_stopped()


def test_a_restarted_workload_is_born_sealed(net: Net, rig: Rig) -> None:
    pid = rig.workload()
    rig.keeper.workload_started(pid)
    proof = rig.keeper.close()
    new_pid = rig.workload()
    rig.keeper.workload_started(new_pid)
    assert not _is_up(net)
    assert _saved_rules(new_pid) == seal_rules()
    with pytest.raises(SealError, match="not on the sealed"):
        rig.keeper.check(proof)
    rig.keeper.check(rig.keeper.close())


# -- published ports -------------------------------------------------------------------------------


def _nat_rules() -> str:
    return _run("iptables-legacy-save", "-t", "nat")


def test_published_port_reaches_the_workload_only_while_open(net: Net, rig: Rig) -> None:
    pid = rig.workload()
    rig.keeper.workload_started(pid)
    rig.serve_inside(pid)
    mapping = PortMapping(SERVICE_PORT, "tcp", "127.0.0.1", 0)
    (published,) = choose_ports((mapping,))
    assert published.host_port != 0
    publisher = PortPublisher(net.eid, net.plan.bridge, net.worker)
    try:
        publisher.publish((published,), net.ipv4.ip)
        saved = _nat_rules()
        assert f"EMBASSY-P-{net.eid}" in saved
        assert f"--to-destination {net.ipv4.ip}:{SERVICE_PORT}" in saved
        # Loopback clients: DNAT'ed packets with a 127/8 source may leave on the bridge.
        route_localnet = Path(f"/proc/sys/net/ipv4/conf/{net.plan.bridge}/route_localnet")
        assert route_localnet.read_text().strip() == "1"

        # Reserved: nobody else can take the host port meanwhile.
        for address, reuse in (("127.0.0.1", False), ("127.0.0.1", True), ("0.0.0.0", True)):
            with socket.socket() as other:
                if reuse:
                    other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                with pytest.raises(OSError) as caught:
                    other.bind((address, published.host_port))
                assert caught.value.errno == errno.EADDRINUSE

        assert _connect_from_host("127.0.0.1", published.host_port).startswith("fail")
        rig.keeper.open()
        _wait(
            "the published port",
            lambda: _connect_from_host("127.0.0.1", published.host_port) == "ok",
        )
        rig.keeper.check(rig.keeper.close())  # settled: the link is down now
        assert _connect_from_host("127.0.0.1", published.host_port).startswith("fail")
        rig.keeper.open()
        _wait(
            "the port again", lambda: _connect_from_host("127.0.0.1", published.host_port) == "ok"
        )

        publisher.unpublish()
        saved = _nat_rules()
        assert f"EMBASSY-P-{net.eid}" not in saved
        assert f"EMBASSY-S-{net.eid}" not in saved
        assert _connect_from_host("127.0.0.1", published.host_port).startswith("fail")
        with socket.socket() as other:
            other.bind(("127.0.0.1", published.host_port))  # released
    finally:
        publisher.unpublish()
    assert f"EMBASSY-P-{net.eid}" not in _nat_rules()


def test_publish_refuses_a_taken_port(net: Net, rig: Rig) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        publisher = PortPublisher(net.eid, net.plan.bridge, net.worker)
        try:
            mapping = PortMapping(SERVICE_PORT, "tcp", "127.0.0.1", port)
            with pytest.raises(SealError, match="is taken"):
                publisher.publish(choose_ports((mapping,)), net.ipv4.ip)
            assert f"EMBASSY-P-{net.eid}" not in _nat_rules()
        finally:
            publisher.unpublish()
