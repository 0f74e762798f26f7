"""Run inside a container by tests/integration/test_silence.py (python3 -c)."""

import json
import socket
import sys
import time

p = json.loads(sys.argv[1])
log = open(p["log"], "a", buffering=1)  # noqa: SIM115 - lives as long as the script
fam = socket.AF_INET6 if ":" in p["host"] else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
s.settimeout(3)
s.connect((p["host"], p["port"]))
s.settimeout(0.05)
log.write(json.dumps({"t": time.time(), "event": "connected"}) + "\n")
end = time.time() + p["max_seconds"]
while time.time() < end:
    time.sleep(0.05)  # one byte every 50 ms: a steady flow, a small log
    try:
        s.send(b"k")
    except OSError:
        log.write(json.dumps({"t": time.time(), "event": "send-error"}) + "\n")
        break
    try:
        d = s.recv(4096)
        if not d:
            log.write(json.dumps({"t": time.time(), "event": "closed"}) + "\n")
            break
        log.write(json.dumps({"t": time.time(), "n": len(d)}) + "\n")
    except TimeoutError:
        pass
    except OSError as e:  # anything else ends the flow: say so
        log.write(json.dumps({"t": time.time(), "event": "error " + type(e).__name__}) + "\n")
        break
