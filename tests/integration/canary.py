"""Helpers for the seal's integration tests: the canary topology and probes.

Network rule: every probe here targets only a container or listener the test created (the
canary, the holder's netns, the gateway listener the test process binds); every loop is
bounded. The only name ever resolved through Docker's DNS is the canary's own container
name, which the embedded resolver answers itself (it never forwards a known name).

Topology (all names unique per run, all removed at the end)::

    network   user-defined bridge, IPv4 subnet from dockerd, IPv6 fd42:e1ba:<rand>::/64
    canary    embassy/canary:latest (busybox): httpd on :80 (TCP, v4+v6); its kernel answers
              ICMP/ICMPv6 echo
    canary-py embassy/workload-base in the CANARY's netns (busybox nc has no UDP): UDP echo
              on :9999, a timestamped TCP echo on :7007, and the client of the inbound case
    holder    embassy/canary:latest `sleep 2147483647`: owns the workload's netns
    workload  embassy/workload-base, cap_drop ALL, network_mode container:<holder>
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

IN_CI = os.environ.get("CI") == "true"
CANARY_IMAGE = "embassy/canary:latest"
WORKLOAD_IMAGE = "embassy/workload-base:bookworm-v3"
HTTP_PORT = 80
UDP_PORT = 9999
ECHO_PORT = 7007
SERVICE_PORT = 8080
PROBE_TIMEOUT = 1.5

# ---------------------------------------------------------------------------------------
# Scripts run by python3 inside the containers (argv[1] is a JSON object of parameters).

PROBES = r"""
import json, socket, struct, sys, threading
p = json.loads(sys.argv[1]); T = p["timeout"]; out = {}

def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b)); s = (s >> 16) + (s & 0xFFFF); s += s >> 16
    return ~s & 0xFFFF

def tcp(host, port, send, want):
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.settimeout(T); s.connect((host, port)); s.sendall(send); data = b""
        while want not in data:
            chunk = s.recv(4096)
            if not chunk: break
            data += chunk
    return want in data

def udp(host, port):
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        s.settimeout(T); s.sendto(b"udp-probe", (host, port)); data, _ = s.recvfrom(512)
    return data == b"udp-probe"

def icmp(host):
    v6 = ":" in host
    fam, proto, req, rep = ((socket.AF_INET6, socket.IPPROTO_ICMPV6, 128, 129) if v6
                            else (socket.AF_INET, socket.IPPROTO_ICMP, 8, 0))
    with socket.socket(fam, socket.SOCK_DGRAM, proto) as s:
        s.settimeout(T); body = b"embassy-ping"
        hdr = struct.pack("!BBHHH", req, 0, 0, 0, 1)
        s.sendto(struct.pack("!BBHHH", req, 0, csum(hdr + body), 0, 1) + body, (host, 0))
        data, _ = s.recvfrom(512)
    return data[0] == rep and data.endswith(body)

def dns(server, name, want_ip):
    q = struct.pack("!HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(x)]) + x.encode() for x in name.split(".")) + b"\0"
    q += struct.pack("!HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(T); s.sendto(q, (server, 53)); data, _ = s.recvfrom(2048)
    return data[:2] == b"\x42\x42" and socket.inet_aton(want_ip) in data[12:]

def run(name, fn, *args):
    try:
        out[name] = "ok" if fn(*args) else "fail: wrong answer"
    except Exception as e:
        out[name] = "fail: %s" % (type(e).__name__,)

http = (b"GET / HTTP/1.0\r\n\r\n", b"canary-ok")
jobs = [("tcp_v4", tcp, p["canary_v4"], p["http_port"]) + http,
        ("udp_v4", udp, p["canary_v4"], p["udp_port"]),
        ("icmp_v4", icmp, p["canary_v4"]),
        ("tcp_gateway_v4", tcp, p["gateway_v4"], p["gateway_port"], b"", b"gw-ok"),
        ("dns_127.0.0.11", dns, "127.0.0.11", p["canary_name"], p["canary_v4"])]
if p.get("canary_v6"):
    jobs += [("tcp_v6", tcp, p["canary_v6"], p["http_port"]) + http,
             ("udp_v6", udp, p["canary_v6"], p["udp_port"]),
             ("icmp_v6", icmp, p["canary_v6"])]
if p.get("gateway_v6"):
    jobs.append(("tcp_gateway_v6", tcp, p["gateway_v6"], p["gateway_port"], b"", b"gw-ok"))
threads = [threading.Thread(target=run, args=j) for j in jobs]
for t in threads: t.start()
for t in threads: t.join(T + 5)
print(json.dumps(out))
"""

# Canary side (in the canary's netns): UDP echo (v4+v6) and a TCP echo that logs, with the
# time, every chunk it receives (to show that a flow the workload opened carries nothing).
CANARY_SERVERS = r"""
import json, socket, sys, threading, time
p = json.loads(sys.argv[1]); log = open(p["log"], "a", buffering=1)

def udp_echo():
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0); s.bind(("::", p["udp_port"]))
    while True:
        data, peer = s.recvfrom(2048); s.sendto(data, peer)

def echo_conn(c):
    with c:
        while True:
            data = c.recv(4096)
            if not data: return
            log.write(json.dumps({"t": time.time(), "n": len(data)}) + "\n"); c.sendall(data)

threading.Thread(target=udp_echo, daemon=True).start()
srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("::", p["echo_port"])); srv.listen(16)
while True:
    c, _ = srv.accept(); threading.Thread(target=echo_conn, args=(c,), daemon=True).start()
"""

# Workload side: a TCP connection the workload opens itself and keeps open; one byte every
# 100 ms; every echo received is logged with the time. Bounded: max_seconds.
KEEPALIVE = r"""
import json, socket, sys, time
p = json.loads(sys.argv[1]); log = open(p["log"], "a", buffering=1)
s = socket.create_connection((p["host"], p["port"]), timeout=3); s.settimeout(0.1)
log.write(json.dumps({"t": time.time(), "event": "connected"}) + "\n")
end = time.time() + p["max_seconds"]
while time.time() < end:
    try:
        s.send(b"k")
    except OSError as e:
        log.write(json.dumps({"t": time.time(), "event": "send-error " + str(e)}) + "\n"); break
    try:
        data = s.recv(4096)
        if not data: break
        log.write(json.dumps({"t": time.time(), "n": len(data)}) + "\n")
    except socket.timeout:
        pass
"""

# Workload side: the service a user's request reaches. Reads a request up to b"END\n", then
# answers with `size` bytes.
SERVICE = r"""
import json, socket, sys, threading, time
p = json.loads(sys.argv[1]); log = open(p["log"], "a", buffering=1)
def serve(c, peer):
    with c:
        c.settimeout(120); data = b""
        while not data.endswith(b"END\n"):
            chunk = c.recv(4096)
            if not chunk: return
            data += chunk
            log.write(json.dumps({"t": time.time(), "peer": peer[0], "got": len(data)}) + "\n")
        c.sendall(bytes(i % 251 for i in range(p["size"])))
srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("::", p["port"])); srv.listen(16)
while True:
    c, peer = srv.accept(); threading.Thread(target=serve, args=(c, peer), daemon=True).start()
"""

# Canary side: a user's request to the workload. Part 1 now, part 2 when `go` exists, then
# read the whole answer. Bounded waits throughout.
CLIENT = r"""
import hashlib, json, os, socket, sys, time
p = json.loads(sys.argv[1]); res = {"connected": False}
try:
    fam = socket.AF_INET6 if ":" in p["host"] else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM); s.settimeout(p["timeout"])
    s.connect((p["host"], p["port"])); res["connected"] = True
    s.sendall(b"PART1 "); open(p["started"], "w").close()
    end = time.time() + 120
    while not os.path.exists(p["go"]) and time.time() < end:
        time.sleep(0.05)
    s.sendall(b"PART2 END\n"); data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk: break
        data += chunk
    s.close(); res.update(received=len(data), sha256=hashlib.sha256(data).hexdigest())
except Exception as e:
    res["error"] = type(e).__name__
with open(p["result"] + ".tmp", "w") as f:
    json.dump(res, f)
os.rename(p["result"] + ".tmp", p["result"])
"""

CONNECT = r"""
import json, socket, sys
p = json.loads(sys.argv[1])
fam = socket.AF_INET6 if ":" in p["host"] else socket.AF_INET
try:
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.settimeout(p["timeout"]); s.connect((p["host"], p["port"])); print("ok")
except Exception as e:
    print("fail: " + type(e).__name__)
"""


def expected_response(size: int) -> str:
    import hashlib

    return hashlib.sha256(bytes(i % 251 for i in range(size))).hexdigest()


# ---------------------------------------------------------------------------------------


def require_real() -> None:
    """Skip (locally) or fail (CI=true) unless root, dockerd, the images and tools exist."""
    problems = [
        t
        for t in ("iptables-legacy-save", "ip6tables-legacy-save", "nsenter", "ip")
        if shutil.which(t) is None
    ]
    if os.geteuid() != 0:
        problems.append("not root")
    try:
        import docker

        client = docker.from_env()
        try:
            client.ping()
            for image in (CANARY_IMAGE, WORKLOAD_IMAGE):
                client.images.get(image)
        finally:
            client.close()
    except Exception as exc:
        problems.append(f"docker: {type(exc).__name__}: {exc}")
    if problems:
        msg = "real components missing: " + "; ".join(problems)
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)


class GatewayListener:
    """A TCP listener in the test process on the network's gateway (host bridge) address."""

    def __init__(self, addresses: list[str]) -> None:
        self.sockets: list[socket.socket] = []
        self.bound: list[str] = []
        port = 0
        for address in addresses:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((address, port))
            except OSError:
                sock.close()
                continue
            sock.listen(16)
            sock.settimeout(0.2)
            port = sock.getsockname()[1]
            self.sockets.append(sock)
            self.bound.append(address)
        self.port = port
        self.accepted = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._serve, args=(s,)) for s in self.sockets]
        for thread in self._threads:
            thread.start()

    def _serve(self, sock: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
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
class Topology:
    client: Any
    tag: str
    network: Any = None
    canary: Any = None
    canary_py: Any = None
    holder: Any = None
    workload: Any = None
    gateway: GatewayListener | None = None
    canary_v4: str = ""
    canary_v6: str = ""
    gateway_v4: str = ""
    gateway_v6: str = ""
    workload_v4: str = ""
    workload_v6: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def holder_pid(self) -> int:
        self.holder.reload()
        return int(self.holder.attrs["State"]["Pid"])

    @property
    def netns(self) -> Path:
        return Path(f"/proc/{self.holder_pid}/ns/net")

    def canary_pid(self) -> int:
        self.canary.reload()
        return int(self.canary.attrs["State"]["Pid"])

    # -- running things ---------------------------------------------------------------

    def py(
        self, container: Any, script: str, params: dict[str, Any], *, detach: bool = False
    ) -> str:
        result = container.exec_run(["python3", "-c", script, json.dumps(params)], detach=detach)
        if detach:
            return ""
        output: bytes = result.output
        return output.decode(errors="replace").strip()

    def cat(self, container: Any, path: str) -> str:
        result = container.exec_run(["cat", path])
        return result.output.decode(errors="replace") if result.exit_code == 0 else ""

    def exists(self, container: Any, path: str) -> bool:
        return bool(container.exec_run(["test", "-e", path]).exit_code == 0)

    def wait_for(self, container: Any, path: str, seconds: float = 30) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.exists(container, path):
                return
            time.sleep(0.1)
        raise AssertionError(f"{path} did not appear in {container.name} within {seconds}s")

    def probes(self) -> dict[str, str]:
        params = {
            "timeout": PROBE_TIMEOUT,
            "canary_v4": self.canary_v4,
            "canary_v6": self.canary_v6,
            "canary_name": self.canary.name,
            "http_port": HTTP_PORT,
            "udp_port": UDP_PORT,
            "gateway_v4": self.gateway_v4,
            "gateway_v6": self.gateway_v6
            if self.gateway and self.gateway_v6 in self.gateway.bound
            else "",
            "gateway_port": self.gateway.port if self.gateway else 0,
        }
        out = self.py(self.workload, PROBES, params)
        try:
            result: dict[str, str] = json.loads(out.splitlines()[-1])
        except (ValueError, IndexError) as exc:
            raise AssertionError(f"probe output: {out!r}") from exc
        return result

    def connect_from_canary(self, host: str, port: int, timeout: float = 2.0) -> str:
        return self.py(self.canary_py, CONNECT, {"host": host, "port": port, "timeout": timeout})

    def netns_save(self, command: str, table: str = "filter") -> str:
        return subprocess.run(
            ["nsenter", f"--net=/proc/{self.holder_pid}/ns/net", command, "-t", table],
            check=True,
            capture_output=True,
            text=True,
        ).stdout

    def netns_cmd(self, pid: int, *argv: str) -> None:
        subprocess.run(
            ["nsenter", f"--net=/proc/{pid}/ns/net", *argv], check=True, capture_output=True
        )


def _ipv6_subnet() -> str:
    return f"fd42:e1ba:{uuid.uuid4().int & 0xFFFF:x}::/64"


@contextlib.contextmanager
def topology() -> Iterator[Topology]:
    """Build the canary topology; always remove everything it made."""
    import docker

    client = docker.from_env()
    topo = Topology(client=client, tag=uuid.uuid4().hex[:8])
    try:
        names = {
            k: f"embassy-seal-{k}-{topo.tag}"
            for k in ("net", "canary", "canarypy", "holder", "workload")
        }
        try:
            ipam = docker.types.IPAMConfig(
                pool_configs=[docker.types.IPAMPool(subnet=_ipv6_subnet())]
            )
            topo.network = client.networks.create(
                names["net"], driver="bridge", enable_ipv6=True, ipam=ipam
            )
            topo.extra["ipv6"] = "user-defined bridge with a ULA /64"
        except docker.errors.APIError as exc:  # dockerd refused IPv6: v4-only network
            topo.extra["ipv6"] = f"refused by dockerd: {exc}"
            topo.network = client.networks.create(names["net"], driver="bridge")
        topo.canary = client.containers.run(
            CANARY_IMAGE,
            [
                "sh",
                "-c",
                "mkdir -p /www && echo canary-ok > /www/index.html && "
                f"exec httpd -f -p {HTTP_PORT} -h /www",
            ],
            name=names["canary"],
            network=topo.network.name,
            detach=True,
        )
        topo.canary_py = client.containers.run(
            WORKLOAD_IMAGE,
            [
                "python3",
                "-c",
                CANARY_SERVERS,
                json.dumps({"udp_port": UDP_PORT, "echo_port": ECHO_PORT, "log": "/tmp/echo.log"}),
            ],
            name=names["canarypy"],
            network_mode=f"container:{topo.canary.id}",
            detach=True,
        )
        topo.holder = client.containers.run(
            CANARY_IMAGE,
            ["sleep", "2147483647"],
            name=names["holder"],
            network=topo.network.name,
            detach=True,
        )
        topo.workload = client.containers.run(
            WORKLOAD_IMAGE,
            ["sleep", "infinity"],
            name=names["workload"],
            network_mode=f"container:{topo.holder.id}",
            cap_drop=["ALL"],
            detach=True,
        )
        topo.network.reload()
        for container, prefix in ((topo.canary, "canary"), (topo.holder, "workload")):
            container.reload()
            net = container.attrs["NetworkSettings"]["Networks"][topo.network.name]
            setattr(topo, f"{prefix}_v4", net["IPAddress"])
            setattr(topo, f"{prefix}_v6", net.get("GlobalIPv6Address") or "")
        for pool in topo.network.attrs["IPAM"]["Config"]:
            gateway = pool.get("Gateway") or ""
            if ":" in pool.get("Subnet", "") and not gateway:
                gateway = pool["Subnet"].split("/")[0] + "1"
            if ":" in gateway:
                topo.gateway_v6 = gateway
            elif gateway:
                topo.gateway_v4 = gateway
        addresses = [a for a in (topo.gateway_v4, topo.gateway_v6) if a]
        deadline = time.monotonic() + 10
        topo.gateway = GatewayListener(addresses)
        while (
            topo.gateway_v6
            and topo.gateway_v6 not in topo.gateway.bound
            and time.monotonic() < deadline
        ):
            topo.gateway.close()  # the bridge's v6 address may still be tentative (DAD)
            time.sleep(0.5)
            topo.gateway = GatewayListener(addresses)
        yield topo
    finally:
        if topo.gateway is not None:
            topo.gateway.close()
        for container in (topo.workload, topo.canary_py, topo.holder, topo.canary):
            if container is not None:
                with contextlib.suppress(Exception):
                    container.remove(force=True)
        if topo.network is not None:
            with contextlib.suppress(Exception):
                topo.network.remove()
        client.close()
