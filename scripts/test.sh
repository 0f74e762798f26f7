#!/usr/bin/env bash
# The project's test command (README, .ci/run): set up a fresh machine, then lint, type-check,
# check that generated files are current, and run every test against the real components.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
bash scripts/setup.sh
py=.venv/bin/python

echo "== ruff";    .venv/bin/ruff check embassy workload_sdk examples tests scripts benchmarks
echo "== format";  .venv/bin/ruff format --check embassy workload_sdk examples tests scripts benchmarks
echo "== mypy";    .venv/bin/mypy
echo "== generated files are current"
$py scripts/gen_config_docs.py --check
$py scripts/gen_vectors.py --check
$py scripts/gen_nix_options.py --check
echo "== real components: dockerd and the locally built images"
bash scripts/ensure_dockerd.sh
bash scripts/build_images.sh
bash examples/sealed_service/build.sh
echo "== pytest"
# TSS2_LOG silences tpm2-tss's own stderr chatter on expected TPM errors.
TSS2_LOG=all+none $py -m pytest -p no:cacheprovider "$@"
