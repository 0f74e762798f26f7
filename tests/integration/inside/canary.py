"""Run inside a container by tests/integration/test_silence.py (python3 -c)."""

import json
import socket
import struct
import sys
import threading
import time

p = json.loads(sys.argv[1])
log = open("/tmp/canary.log", "a", buffering=1)  # noqa: SIM115 - lives as long as the script


def dual(s):
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)


def note(kind, n, peer):
    log.write(json.dumps({"t": time.time(), "k": kind, "n": n, "peer": str(peer[0])}) + "\n")


def tcp(port, handler):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    dual(s)
    s.bind(("::", port))
    s.listen(64)
    while True:
        c, peer = s.accept()
        threading.Thread(target=handler, args=(c, peer), daemon=True).start()


def ok(c, peer):
    with c:
        note("http", 0, peer)
        c.sendall(b"canary-ok")


def echo(c, peer):
    with c:
        while True:
            d = c.recv(65536)
            if not d:
                return
            note("echo", len(d), peer)
            c.sendall(d)


def udp(port, group4=None, group6=None):
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    dual(s)
    s.bind(("::", port))
    if group6:
        group = socket.inet_pton(socket.AF_INET6, group6)
        s.setsockopt(
            socket.IPPROTO_IPV6,
            socket.IPV6_JOIN_GROUP,
            group + struct.pack("@I", socket.if_nametoindex("eth0")),
        )
    if group4:
        s4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s4.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s4.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        s4.bind(("", port + 1000))
        s4.setsockopt(
            socket.IPPROTO_IP,
            socket.IP_ADD_MEMBERSHIP,
            socket.inet_aton(group4) + socket.inet_aton("0.0.0.0"),
        )
        threading.Thread(target=loop, args=(s4, "bcast4"), daemon=True).start()
    loop(s, "udp")


def loop(s, kind):
    while True:
        d, peer = s.recvfrom(65536)
        note(kind, len(d), peer)
        s.sendto(d, peer)


for target, args in (
    (tcp, (p["http"], ok)),
    (tcp, (p["echo"], echo)),
    (udp, (p["udp"],)),
    (udp, (p["bcast"], p["mcast4"], p["mcast6"])),
):
    threading.Thread(target=target, args=args, daemon=True).start()
open("/tmp/canary.ready", "w").close()
while True:
    time.sleep(3600)
