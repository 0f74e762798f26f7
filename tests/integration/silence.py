"""Helpers for the attacker's-side seal tests: the real daemon, its workload, a canary, sniffers.

Network rule: every probe targets only what a test made: the canary container on the
embassy's own network, listeners the test process binds on that network's gateway, or the
workload itself. Every loop is bounded.

Ground truth is the **host end** of the workload's link: a frame that enters or leaves the
workload's namespace crosses it (the namespace has no other link; a test checks that). The
:class:`LinkSniffer` counts every frame seen on it, in both directions, from an AF_PACKET
socket in the host namespace bound to no interface (a restarted workload gets a new link
with the same name and a new index, and the count goes on).
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embassy.client import ApiError, call

_INSIDE = Path(__file__).parent / "inside"


def _script(name: str) -> str:
    """A script run inside a container (``python3 -c``); kept as a file so it is linted."""
    return (_INSIDE / f"{name}.py").read_text()


WORKLOAD_BASE = "embassy/workload-base:bookworm-v3"
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
ECHO_PORT, UDP_PORT, BCAST_PORT, HTTP_PORT = 7007, 9999, 9998, 80
MCAST_V4, MCAST_V6 = "239.7.7.7", "ff12::7:7"

# The canary's servers (python3 in the canary container): a TCP "canary-ok" responder, a
# logging TCP echo, a UDP echo, a broadcast/multicast UDP echo that answers unicast.
CANARY = _script("canary")

# Probes run inside the workload (argv[1]: JSON parameters); prints a JSON object name -> "ok"
# or "fail: <why>". Bounded by the timeout per probe; all run concurrently.
PROBES = _script("probes")

# A TCP connection the running side keeps open and pushes one byte on every 50 ms; every
# echo received is logged. Bounded by max_seconds. Used both ways (workload <-> canary).
PUSHER = _script("pusher")

# A logging TCP echo + UDP echo inside the workload (for flows opened TO it).
WORKLOAD_ECHO = _script("workload_echo")

# A tight, bounded loop of connection attempts (from the canary to the workload); prints
# how many connected, and when.
HAMMER = _script("hammer")

# An AF_PACKET relay (a container joined to the workload's namespace with NET_RAW): raw
# frames with a marker out of eth0, bounded.
RELAY = _script("relay")
CLIENT = _script("client")


class LinkSniffer:
    """Counts frames on interfaces named ``name`` in the host namespace, both directions."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self._sock.settimeout(0.1)
        self._lock = threading.Lock()
        self.to_workload = 0
        self.from_workload = 0
        self.payloads: list[bytes] = []
        self.times: list[float] = []  # when each frame in ``payloads`` was seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                frame, address = self._sock.recvfrom(65536)
            except (TimeoutError, OSError):
                continue
            if address[0] != self.name:
                continue
            with self._lock:
                if address[2] == PACKET_OUTGOING:
                    self.to_workload += 1
                else:
                    self.from_workload += 1
                if len(self.payloads) < 64:
                    self.payloads.append(frame[:128])
                    self.times.append(time.time())

    def reset(self) -> None:
        with self._lock:
            self.to_workload = self.from_workload = 0
            self.payloads.clear()
            self.times.clear()

    def seen_before(self, moment: float) -> list[bytes]:
        """The frames (of the first 64) seen before ``moment`` (time.time())."""
        with self._lock:
            return [p for p, t in zip(self.payloads, self.times, strict=True) if t < moment]

    @property
    def total(self) -> int:
        with self._lock:
            return self.to_workload + self.from_workload

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


class GatewayListener:
    """TCP listeners in the test process on the embassy network's gateway addresses."""

    def __init__(self, addresses: list[str]) -> None:
        self.sockets: list[socket.socket] = []
        self.port = 0
        for address in addresses:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            deadline = time.monotonic() + 10
            while True:
                try:
                    sock.bind((address, self.port))
                    break
                except OSError:  # an IPv6 address may still be tentative (DAD)
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            sock.listen(64)
            sock.settimeout(0.2)
            self.port = sock.getsockname()[1]
            self.sockets.append(sock)
        self.accepted = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._serve, args=(s,)) for s in self.sockets]
        for thread in self._threads:
            thread.start()

    def _serve(self, sock: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = sock.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                self.accepted += 1
                with contextlib.suppress(OSError):
                    conn.sendall(b"gw-ok")

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)
        for sock in self.sockets:
            sock.close()


@dataclass
class Scene:
    """A running daemon with the example workload, a canary beside it, a sniffer on the link."""

    daemon: Any
    client: Any
    eid: str
    workload: Any
    canary: Any
    link: str
    workload_v4: str
    workload_v6: str
    canary_v4: str
    canary_v6: str
    canary_ll: str
    gateway_v4: str
    gateway_v6: str
    subnet_broadcast: str
    sniffer: LinkSniffer
    gateway: GatewayListener
    extra: dict[str, Any] = field(default_factory=dict)

    # -- the daemon ------------------------------------------------------------------------

    def seal_status(self) -> dict[str, Any]:
        status: dict[str, Any] = call(self.daemon.socket, "GET", "/v1/seal")
        return status

    def from_workload(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        """One request to the embassy from inside the workload (session routes answer only
        the workload's own processes); raises ApiError for an error answer."""
        argv = ["python3", "-c", CLIENT, method, path]
        if body is not None:
            argv.append(json.dumps(body))
        self.refresh_workload()
        code, out = self.workload.exec_run(argv)
        assert code == 0, out.decode()
        reply = json.loads(out.decode().strip().splitlines()[-1])
        if reply["status"] >= 400:
            error = reply["body"]["error"]
            raise ApiError(reply["status"], error["code"], error["message"])
        answer: dict[str, Any] = reply["body"]
        return answer

    def open(self, deadline: int = 120) -> dict[str, Any]:
        return self.from_workload("POST", "/v1/sessions", {"deadline_seconds": deadline})

    def close(self, opened: dict[str, Any]) -> dict[str, Any]:
        body = {"session": opened["session"], "token": opened["token"], "output_sha256": None}
        return self.from_workload("POST", "/v1/sessions/close", body)

    # -- running things ---------------------------------------------------------------

    def py(self, container: Any, script: str, params: Any, *, detach: bool = False) -> str:
        argv = ["python3", "-c", script, params if isinstance(params, str) else json.dumps(params)]
        result = container.exec_run(argv, detach=detach)
        if detach:
            return ""
        return str(result.output.decode(errors="replace").strip())

    def lines(self, container: Any, path: str) -> list[dict[str, Any]]:
        result = container.exec_run(["cat", path])
        if result.exit_code != 0:
            return []
        return [json.loads(line) for line in result.output.decode().splitlines() if line.strip()]

    def probes(self, timeout: float = 1.5) -> dict[str, str]:
        params = {
            "timeout": timeout,
            "canary_v4": self.canary_v4,
            "canary_v6": self.canary_v6,
            "canary_ll": self.canary_ll,
            "gateway_v4": self.gateway_v4,
            "gateway_v6": self.gateway_v6,
            "gateway_port": self.gateway.port,
            "subnet_broadcast": self.subnet_broadcast,
            "http": HTTP_PORT,
            "udp": UDP_PORT,
            "bcast": BCAST_PORT,
            "mcast4": MCAST_V4,
            "mcast6": MCAST_V6,
        }
        out = self.py(self.workload, PROBES, params)
        try:
            result: dict[str, str] = json.loads(out.splitlines()[-1])
        except (ValueError, IndexError) as exc:
            raise AssertionError(f"probe output: {out!r}") from exc
        return result

    def inbound(self, host: str, port: int, timeout: float = 1.0) -> str:
        """One connection attempt from the canary to ``host:port``."""
        script = (
            "import socket,sys\n"
            "try:\n"
            f" socket.create_connection(({host!r},{port}),timeout={timeout}).close();print('ok')\n"
            "except Exception as e:\n print('fail: '+type(e).__name__)\n"
        )
        return self.py(self.canary, script, "{}")

    def refresh_workload(self) -> None:
        self.workload.reload()

    def workload_links(self) -> list[str]:
        pid = self.workload.attrs["State"]["Pid"]
        out = subprocess.run(
            ["nsenter", f"--net=/proc/{pid}/ns/net", "ip", "-o", "link"],
            check=True,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        return sorted(line.split(":")[1].strip().split("@")[0] for line in out.splitlines())


def wait_until(predicate: Any, seconds: float = 10.0, every: float = 0.05) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return bool(predicate())


def canary_addresses(container: Any, network: str) -> tuple[str, str, str]:
    """The canary's IPv4, global IPv6 and link-local IPv6 (scoped to the workload's eth0)."""
    container.reload()
    net = container.attrs["NetworkSettings"]["Networks"][network]
    ll = ""
    deadline = time.monotonic() + 10
    while not ll and time.monotonic() < deadline:
        out = container.exec_run(["cat", "/proc/net/if_inet6"]).output.decode()
        for line in out.splitlines():  # address, index, prefix length, scope, flags, name
            fields = line.split()
            if fields[-1] == "eth0" and fields[3] == "20" and not int(fields[4], 16) & 0x40:
                hexa = fields[0]
                ll = ":".join(hexa[i : i + 4] for i in range(0, 32, 4)) + "%eth0"
        if not ll:
            time.sleep(0.2)  # still tentative (duplicate address detection)
    return net["IPAddress"], net.get("GlobalIPv6Address") or "", ll


@contextlib.contextmanager
def background(thread: threading.Thread) -> Iterator[threading.Thread]:
    thread.start()
    try:
        yield thread
    finally:
        thread.join(30)


def broadcast_of(ipv4_interface: str) -> str:
    import ipaddress

    return str(ipaddress.IPv4Interface(ipv4_interface).network.broadcast_address)


def mac_of(frame: bytes) -> str:
    return ":".join(f"{b:02x}" for b in struct.unpack("6B", frame[6:12]))
