"""The example job: one request in a container made for it alone, then gone.

Runs in a job container the embassy created (docs/adr/0014-jobs.md): no network, a
read-only root, its spool at ``$EMBASSY_JOB_DIR`` (``/job``) and the embassy's socket at
``$EMBASSY_SOCKET``. It waits for a job (``POST /v1/jobs/self/key`` long-polls), gets the
input key and the result key once, decrypts the user's input from ``/job/input``, computes,
encrypts the result with the result key into ``/job/output``, commits its SHA-256 and
exits. The embassy then destroys the container.

The input is JSON. ``{"text": "..."}`` (the demo) answers a summary of the text: its
length, words, lines and SHA-256. The other operations exist so that tests can probe the
container from inside:

- ``{"op": "probe"}``: the network interfaces it sees, its user, what else is in ``/job``;
- ``{"op": "marker", "marker": "..."}``: writes the marker to /tmp and /job, and reports
  whether a marker from an earlier job is anywhere it can look;
- ``{"op": "peek", "paths": [...]}``: which of those paths it can list or read;
- ``{"op": "sleep", "seconds": n}``, ``{"op": "crash"}``, ``{"op": "big", "bytes": n}``,
  ``{"op": "bad-commit"}``: a job that is late, crashes, writes too much, lies.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import time
from base64 import b64decode
from typing import Any

from workload_sdk.results import encrypt_result
from workload_sdk.stream import decrypt_stream
from workload_sdk.transport import UnixHTTPConnection

SOCKET = os.environ.get("EMBASSY_SOCKET", "/run/embassy/embassy.sock")
JOB_DIR = os.environ.get("EMBASSY_JOB_DIR", "/job")
MARKER_PLACES = ("/tmp", JOB_DIR)  # noqa: S108 (the container's own tmpfs)


def post(path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    conn = UnixHTTPConnection(SOCKET, timeout=60)
    try:
        conn.request(
            "POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"}
        )
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


def wait_for_job() -> dict[str, Any]:
    while True:
        try:
            status, body = post("/v1/jobs/self/key", {})
        except OSError:
            status, body = 0, {}
        if status == 200 and body.get("assigned"):
            return body
        if status != 200:  # not known to the embassy yet (just created), or it restarts
            time.sleep(0.05)


def _markers_seen() -> list[str]:
    seen = []
    for place in MARKER_PLACES:
        try:
            names = os.listdir(place)
        except OSError:
            continue
        seen += [f"{place}/{n}" for n in names if n.startswith("marker-")]
    return seen


def compute(request: dict[str, Any]) -> bytes:  # noqa: PLR0911 (one branch per op)
    op = request.get("op", "summary")
    if op == "summary":
        text = str(request.get("text", ""))
        return json.dumps(
            {
                "chars": len(text),
                "words": len(text.split()),
                "lines": text.count("\n") + (1 if text else 0),
                "sha256": hashlib.sha256(text.encode()).hexdigest(),
            }
        ).encode()
    if op == "probe":
        with open("/proc/net/dev") as f:
            dev = [line.split(":")[0].strip() for line in f.read().splitlines()[2:]]
        return json.dumps(
            {
                "sys_class_net": sorted(os.listdir("/sys/class/net")),
                "proc_net_dev": sorted(dev),
                "uid": os.getuid(),
                "job_dir": sorted(os.listdir(JOB_DIR)),
            }
        ).encode()
    if op == "marker":
        before = _markers_seen()
        marker = str(request["marker"])
        for place in MARKER_PLACES:
            try:
                with open(f"{place}/marker-{marker[:32]}", "w") as f:
                    f.write(marker)
            except OSError:
                pass
        return json.dumps({"seen_before": before}).encode()
    if op == "peek":
        found = {}
        for path in request.get("paths", []):
            try:
                found[path] = sorted(os.listdir(path)) if os.path.isdir(path) else "readable"
                if found[path] == "readable":
                    with open(path, "rb") as f:
                        f.read(1)
            except OSError as exc:
                found[path] = f"refused: {exc.strerror}"
        return json.dumps(found).encode()
    if op == "sleep":
        time.sleep(float(request.get("seconds", 0)))
        return b"{}"
    if op == "crash":
        os._exit(3)
    if op == "big":
        return b"z" * int(request["bytes"])
    return json.dumps({"error": f"unknown op {op!r}"[:100]}).encode()


def main() -> int:
    job = wait_for_job()
    input_key = b64decode(job["input_key"])
    result_key = b64decode(job["result_key"])
    with open(f"{JOB_DIR}/input", "rb") as src:
        data = b"".join(
            bytes(c)
            for c in decrypt_stream(
                input_key, src, expected_payload_id=bytes.fromhex(job["payload_id"])
            )
        )
    request = json.loads(data)
    output = compute(request)
    with open(f"{JOB_DIR}/output", "wb") as dst:
        written = encrypt_result(result_key, io.BytesIO(output), dst)
    digest = written.sha256
    if request.get("op") == "bad-commit":
        digest = hashlib.sha256(b"not what I wrote").hexdigest()
    status, body = post("/v1/jobs/self/commit", {"output_sha256": digest})
    if status != 200:
        print(f"commit refused: {body.get('error', {}).get('code')}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
