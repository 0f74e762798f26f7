"""Run inside a container by tests/integration/test_silence.py (python3 -c)."""

import json
import socket
import struct
import sys
import threading

p = json.loads(sys.argv[1])
T = p["timeout"]
out = {}


def csum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def fam(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def addr(host, port):
    return socket.getaddrinfo(host, port, fam(host), 0, 0, socket.AI_NUMERICHOST)[0][4]


def tcp(host, port, want):
    with socket.socket(fam(host), socket.SOCK_STREAM) as s:
        s.settimeout(T)
        s.connect(addr(host, port))
        data = b""
        while want not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    return want in data


def udp(host, port, bcast=False, ttl=False):
    with socket.socket(fam(host), socket.SOCK_DGRAM) as s:
        s.settimeout(T)
        if bcast:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        if ttl and fam(host) == socket.AF_INET6:
            s.setsockopt(
                socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, socket.if_nametoindex("eth0")
            )
        s.sendto(b"probe", addr(host, port))
        data, _ = s.recvfrom(512)
    return data == b"probe"


def icmp(host):
    v6 = ":" in host
    family, proto, req, rep = (
        (socket.AF_INET6, socket.IPPROTO_ICMPV6, 128, 129)
        if v6
        else (socket.AF_INET, socket.IPPROTO_ICMP, 8, 0)
    )
    with socket.socket(family, socket.SOCK_DGRAM, proto) as s:
        s.settimeout(T)
        body = b"embassy-ping"
        hdr = struct.pack("!BBHHH", req, 0, 0, 0, 1)
        s.sendto(struct.pack("!BBHHH", req, 0, csum(hdr + body), 0, 1) + body, addr(host, 0))
        data, _ = s.recvfrom(512)
    return data[0] == rep and data.endswith(body)


def dns(proto):
    q = (
        struct.pack("!HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0)
        + b"\x06canary\x00"
        + struct.pack("!HH", 1, 1)
    )
    if proto == "udp":
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(T)
            s.sendto(q, ("127.0.0.11", 53))
            data, _ = s.recvfrom(2048)
    else:
        with socket.create_connection(("127.0.0.11", 53), timeout=T) as s:
            s.sendall(struct.pack("!H", len(q)) + q)
            data = s.recv(2048)[2:]
    return data[:2] == b"\x42\x42"


def run(name, fn, *args):
    try:
        out[name] = "ok" if fn(*args) else "fail: wrong answer"
    except Exception as e:
        out[name] = "fail: " + type(e).__name__


jobs = []
for v in ("v4", "v6", "ll"):
    host = p["canary_" + v]
    if not host:
        continue
    jobs += [
        ("tcp_" + v, tcp, host, p["http"], b"canary-ok"),
        ("udp_" + v, udp, host, p["udp"]),
        ("icmp_" + v, icmp, host),
    ]
for v in ("v4", "v6"):
    if p["gateway_" + v]:
        jobs.append(("tcp_gateway_" + v, tcp, p["gateway_" + v], p["gateway_port"], b"gw-ok"))
jobs += [
    ("broadcast", udp, "255.255.255.255", p["bcast"] + 1000, True),
    ("subnet_broadcast", udp, p["subnet_broadcast"], p["bcast"] + 1000, True),
    ("multicast_v4", udp, p["mcast4"], p["bcast"] + 1000),
    ("multicast_v6", udp, p["mcast6"], p["bcast"], False, True),
    ("dns_udp", dns, "udp"),
    ("dns_tcp", dns, "tcp"),
]
threads = [threading.Thread(target=run, args=j) for j in jobs]
for t in threads:
    t.start()
for t in threads:
    t.join(T + 5)
print(json.dumps(out))
