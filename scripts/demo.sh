#!/usr/bin/env bash
# README's main command: set up, start the embassy with its own software TPM, and walk the
# chain of trust a user and an auditor rely on, printing what each step proved.
# (The sealed-inference steps join this script as the protocol issues land.)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
bash scripts/setup.sh >/dev/null
export TSS2_LOG=all+none
bin=.venv/bin
demo=$here/.demo
rm -rf "$demo"; mkdir -p "$demo"
cat > "$demo/config.yaml" <<YAML
socket: $demo/embassy.sock
data_dir: $demo/data
log_level: info
YAML

step() { printf '\n== %s\n' "$*"; }
step "start the embassy (embedded default: it starts its own swtpm)"
"$bin/embassy" serve --config "$demo/config.yaml" 2> "$demo/daemon.log" &
daemon=$!
cleanup() { kill -TERM "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null || true; }
trap cleanup EXIT
for _ in $(seq 1 300); do
  curl -sf --unix-socket "$demo/embassy.sock" http://embassy/v1/health >/dev/null 2>&1 && break
  sleep 0.1
done
curl -s --unix-socket "$demo/embassy.sock" http://embassy/v1/health; echo

step "user: fetch the identity document, with a live credential-activation challenge"
"$bin/embassy" identity --socket "$demo/embassy.sock" --out "$demo/identity.json"

step "auditor: rebuild the measurement from the same code and config"
measurement=$("$bin/embassy" measure --config "$demo/config.yaml")
echo "expected measurement: $measurement"
cat "$demo/data/swtpm-ca/swtpm-localca-rootca-cert.pem" "$demo/data/swtpm-ca/issuercert.pem" \
  > "$demo/ek-ca.pem"
policy=(--ek-ca "$demo/ek-ca.pem" --expect-measurement "$measurement" --allow-software-tpm)

step "verify the identity document offline (keys bound by a TPM quote to the measured embassy)"
"$bin/embassy" verify identity "$demo/identity.json" "${policy[@]}"

step "relying party: fresh evidence over its own nonce"
nonce=$("$bin/python" -c 'import secrets; print(secrets.token_hex(32))')
curl -s --unix-socket "$demo/embassy.sock" "http://embassy/v1/evidence?nonce=$nonce" \
  > "$demo/evidence.json"
"$bin/embassy" verify evidence "$demo/evidence.json" --nonce "$nonce" \
  --identity "$demo/identity.json" "${policy[@]}"

step "auditor: the statement log replays to the TPM's PCRs"
curl -s --unix-socket "$demo/embassy.sock" "http://embassy/v1/log?from=0" > "$demo/log.json"
"$bin/embassy" verify log "$demo/log.json" --identity "$demo/identity.json" "${policy[@]}"

step "a forged log is caught"
"$bin/python" - "$demo/log.json" "$demo/forged.json" <<'PY'
import json, sys
doc = json.load(open(sys.argv[1]))
doc["segment"]["entries"].reverse()
json.dump(doc, open(sys.argv[2], "w"))
PY
if "$bin/embassy" verify log "$demo/forged.json" --identity "$demo/identity.json" \
     "${policy[@]}" 2>&1; then
  echo "FORGED LOG ACCEPTED"; exit 1
fi

step "proved"
cat <<TXT
- the embassy's signing and HPKE keys are bound, by a TPM quote over SHA-256 of the identity
  statement, to PCR values that replay from its own log;
- that log's start event carries measurement $measurement, the one rebuilt above;
- the AK that signed the quotes lives in the TPM whose EK certificate chains to the given CA
  (credential activation);
- fresh evidence was made after nonce $nonce;
- a reordered log does not verify.
This run used a SOFTWARE TPM (swtpm): it proves the protocol, not this machine.
TXT
