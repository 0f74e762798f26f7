#!/usr/bin/env bash
# Start dockerd if it is not answering (Debian's docker.io on a machine with no init system
# running it), and wait until it does. Idempotent.
set -euo pipefail
if docker info >/dev/null 2>&1; then
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
