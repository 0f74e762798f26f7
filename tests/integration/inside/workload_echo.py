"""Run inside a container by tests/integration/test_silence.py (python3 -c)."""

import json
import socket
import sys
import threading
import time

p = json.loads(sys.argv[1])
log = open(p["log"], "a", buffering=1)  # noqa: SIM115 - lives as long as the script


def conn(c, peer):
    with c:
        while True:
            d = c.recv(65536)
            if not d:
                return
            log.write(json.dumps({"t": time.time(), "k": "tcp", "n": len(d)}) + "\n")
            c.sendall(d)


def tcp():
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", p["port"]))
    s.listen(16)
    while True:
        c, peer = s.accept()
        threading.Thread(target=conn, args=(c, peer), daemon=True).start()


def udp():
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", p["port"]))
    while True:
        d, peer = s.recvfrom(65536)
        log.write(json.dumps({"t": time.time(), "k": "udp", "n": len(d)}) + "\n")
        try:
            s.sendto(d, peer)
        except OSError:
            # A datagram that came in just before the seal: its echo goes out after, and the
            # seal's OUTPUT drop refuses it (EPERM). Lost, as any datagram may be.
            continue


threading.Thread(target=udp, daemon=True).start()
tcp()
