"""Run inside a container by tests/integration/test_silence.py (python3 -c)."""

import json
import socket
import sys
import time

p = json.loads(sys.argv[1])
ok = []
end = time.time() + p["seconds"]
while time.time() < end:
    try:
        with socket.create_connection((p["host"], p["port"]), timeout=0.05):
            ok.append(time.time())
    except OSError:
        time.sleep(0.005)
print(json.dumps({"connected": len(ok), "first": ok[0] if ok else None}))
