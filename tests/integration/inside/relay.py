"""Run inside a container by tests/integration/test_silence.py (python3 -c)."""

import socket
import sys
import time

s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
frame = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x88\xb5" + b"EMBASSY-RELAY-MARKER" * 10
end = time.time() + float(sys.argv[1])
sent = 0
while time.time() < end:
    try:
        s.send(frame)
        sent += 1
    except OSError:
        pass
    time.sleep(0.001)
print(sent)
