"""Run inside the workload by the integration tests: one request to the embassy's socket."""

import http.client
import json
import socket
import sys


class C(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect("/run/embassy/embassy.sock")


c = C("embassy", timeout=30)
c.request(sys.argv[1], sys.argv[2], body=sys.argv[3] if len(sys.argv) > 3 else None)
r = c.getresponse()
print(json.dumps({"status": r.status, "body": json.loads(r.read())}))
