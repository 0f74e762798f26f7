#!/usr/bin/env bash
# Build the local images the embassy's tests and demo use (no registry is reachable here).
#
#   embassy/workload-base:bookworm-v3  debootstrap'd Debian minbase + python3 + python3-numpy
#                                      + python3-cryptography (the workload SDK's AEAD)
#                                      + OpenBLAS (Debian's default reference BLAS makes
#                                        the example model's forward pass several times slower)
#                                      Debian packages only: the example model's tokenizers and
#                                      safetensors wheels go into embassy/sealed-service
#                                      (examples/sealed_service/build.sh, ADR 0017)
#   embassy/canary:latest           busybox-static only: a tiny server for escape probes
#
# Idempotent: an image that exists under its tag is kept (FORCE=1 rebuilds). Needs root,
# debootstrap, a Debian mirror (the one apt uses) and a running dockerd.
set -euo pipefail
base_tag=${EMBASSY_BASE_IMAGE:-embassy/workload-base:bookworm-v3}
canary_tag=${EMBASSY_CANARY_IMAGE:-embassy/canary:latest}
mirror=${DEBIAN_MIRROR:-$(sed -n 's/^URIs: *\(http[^ ]*debian\)$/\1/p' \
  /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)}
mirror=${mirror:-http://deb.debian.org/debian}

have() { [ "${FORCE:-0}" != 1 ] && docker image inspect "$1" >/dev/null 2>&1; }
# The base image says what an operator may override (the embassy refuses anything else).
if have "$base_tag" && [ -z "$(docker image inspect -f \
    '{{index .Config.Labels "org.embassy.allow-override"}}' "$base_tag" 2>/dev/null)" ]; then
  cid=$(docker create "$base_tag")
  docker commit --change 'LABEL org.embassy.allow-override=command,env' "$cid" "$base_tag" \
    >/dev/null
  docker rm "$cid" >/dev/null
fi
work=$(mktemp -d /var/tmp/embassy-images.XXXXXX)
trap 'rm -rf "$work"' EXIT

if have "$base_tag"; then
  echo "images: $base_tag present"
else
  echo "images: building $base_tag (debootstrap, about a minute)"
  # python3-cffi-backend by name: cryptography depends on it through a virtual package,
  # which debootstrap does not resolve.
  debootstrap --variant=minbase \
    --include=python3,python3-numpy,libopenblas0-pthread,python3-cryptography,python3-cffi-backend bookworm \
    "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
  # Nothing of the build host's apt caches or logs goes into the image.
  rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/lib/apt/lists/"*
  tar --numeric-owner -C "$work/rootfs" -c . | docker import \
    --change 'CMD ["/usr/bin/python3"]' \
    --change 'LABEL org.embassy.role=workload-base' \
    --change 'LABEL org.embassy.allow-override=command,env' \
    - "$base_tag" >/dev/null
  echo "images: built $base_tag"
fi

if have "$canary_tag"; then
  echo "images: $canary_tag present"
else
  mkdir -p "$work/canary/bin"
  cp /bin/busybox "$work/canary/bin/busybox"
  for tool in sh nc httpd ping ping6 sleep cat echo ip ifconfig wget; do
    ln -s busybox "$work/canary/bin/$tool"
  done
  tar --numeric-owner -C "$work/canary" -c . | docker import \
    --change 'CMD ["/bin/sh"]' --change 'LABEL org.embassy.role=canary' \
    - "$canary_tag" >/dev/null
  echo "images: built $canary_tag"
fi
