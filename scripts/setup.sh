#!/usr/bin/env bash
# Idempotent setup for a fresh Debian machine, as root: the Debian packages the embassy
# drives for real (Docker, netfilter, swtpm, tpm2-tools, the TSS library tpm2-pytss binds
# to) and a virtual environment with the project and its dev tools.
#
#   scripts/setup.sh            # system packages + .venv
#   EMBASSY_VENV=/path ...      # put the venv elsewhere
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
venv=${EMBASSY_VENV:-$here/.venv}

packages=(
  docker.io iptables iproute2 curl
  swtpm swtpm-tools tpm2-tools libtss2-dev
  debootstrap busybox-static nix-bin
  python3-venv python3-dev pkg-config gcc
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: need root to install: ${missing[*]}" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
stamp="$venv/.embassy-installed"
if [ ! -f "$stamp" ] || [ "$here/pyproject.toml" -nt "$stamp" ]; then
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q -e "$here[dev]"
  touch "$stamp"
fi
echo "setup: ok ($venv)"
