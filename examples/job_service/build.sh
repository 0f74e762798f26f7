#!/usr/bin/env bash
# Build embassy/job-service:latest: the sealed-service image (the workload base with the
# SDK, numpy and cryptography) plus the example job program and the current SDK.
#
# Works offline: the base is local and nothing is installed. The job runs as the image's
# unprivileged user 10001:10001, so the embassy's config for it says:
#
#   socket_group: "10001"
#   jobs:
#     image: embassy/job-service:latest
#     user: "10001:10001"
#
#   SEALED_SERVICE_IMAGE  default embassy/sealed-service:latest (examples/sealed_service/build.sh)
#   JOB_SERVICE_IMAGE     default embassy/job-service:latest
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
base=${SEALED_SERVICE_IMAGE:-embassy/sealed-service:latest}
tag=${JOB_SERVICE_IMAGE:-embassy/job-service:latest}

docker image inspect "$base" >/dev/null 2>&1 \
  || bash "$repo/examples/sealed_service/build.sh"

ctx=$(mktemp -d /var/tmp/job-service.XXXXXX)
trap 'rm -rf "$ctx"' EXIT
mkdir "$ctx/workload_sdk"
cp "$repo"/workload_sdk/*.py "$repo/workload_sdk/py.typed" "$ctx/workload_sdk/"
cp "$here/job.py" "$ctx/job.py"
cat >"$ctx/Dockerfile" <<DOCKERFILE
FROM $base
COPY workload_sdk /app/workload_sdk
COPY job.py /app/job.py
LABEL org.embassy.role=job
USER 10001:10001
CMD ["python3", "/app/job.py"]
DOCKERFILE
out=$(docker build --pull=false -q -t "$tag" "$ctx" 2>&1) || { echo "$out" >&2; exit 1; }
echo "build: $tag from $base ($(docker image inspect -f '{{.Id}}' "$tag"))"
