#!/usr/bin/env bash
# Start dockerd if it is not answering (Debian's docker.io on a machine with no init system
# running it), and wait until it does. Idempotent.
set -euo pipefail

# gVisor (Debian's runsc) as a Docker runtime for sealed workloads: with --network=host its
# sentry uses the kernel's network stack in the container's namespace, the one the embassy
# wires and gates (docs/adr/0009-link-gate.md); --host-uds=open lets the sandbox connect to
# the embassy's socket mounted into it. Merged into daemon.json, never overwriting.
# Jobs (docs/adr/0014-jobs.md) need no network at all: runsc-nonet runs gVisor with
# --network=none (with its own netstack on, runsc refuses to start on this machine).
changed=""
if command -v runsc >/dev/null 2>&1; then
  changed=$(python3 - "$(command -v runsc)" <<'PY'
import json, os, sys
path = sys.argv[1]
conf = "/etc/docker/daemon.json"
data = json.load(open(conf)) if os.path.exists(conf) and os.path.getsize(conf) else {}
wanted = {
    "runsc-hostinet": {"path": path, "runtimeArgs": ["--network=host", "--host-uds=open"]},
    "runsc-nonet": {"path": path, "runtimeArgs": ["--network=none", "--host-uds=open"]},
}
if any(data.get("runtimes", {}).get(name) != want for name, want in wanted.items()):
    data.setdefault("runtimes", {}).update(wanted)
    os.makedirs("/etc/docker", exist_ok=True)
    tmp = conf + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, conf)
    print("changed")
PY
)
fi

if docker info >/dev/null 2>&1; then
  if [ -n "$changed" ]; then
    # A running dockerd reads its runtimes again on SIGHUP.
    kill -HUP "$(pidof dockerd)"
    for _ in $(seq 1 40); do
      docker info --format '{{json .Runtimes}}' | grep -q -- "--network=none" && break
      sleep 0.25
    done
  fi
  exit 0
fi
log=${DOCKERD_LOG:-/var/log/embassy-dockerd.log}
echo "dockerd: starting (log: $log)"
nohup dockerd >"$log" 2>&1 &
for _ in $(seq 1 120); do
  docker info >/dev/null 2>&1 && { echo "dockerd: up"; exit 0; }
  sleep 0.5
done
echo "dockerd: did not come up; last lines of $log:" >&2
tail -20 "$log" >&2
exit 1
