#!/usr/bin/env bash
# README's main command: the whole sealed-request story on this machine, on embedded
# defaults (a software TPM the daemon starts itself, a locally built workload image).
#
#   1. the embassy starts with its own swtpm and launches the example workload, sealed on
#      demand, its launch inputs logged before it runs;
#   2. a user fetches and verifies the embassy's identity (live credential activation,
#      the measurement rebuilt here, the EK certificate chain);
#   3. the user seals an input to that identity and sends it to the workload;
#   4. the workload opens a session (sealed first, then the key), processes, commits to its
#      output and is unsealed;
#   5. the user verifies output + statements offline, and sees a forgery fail.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
step() { printf '\n== %s\n' "$*"; }

step "set up (Debian packages, venv, dockerd, local images: the first run takes a few minutes)"
bash scripts/setup.sh >/dev/null
bash scripts/ensure_dockerd.sh
bash scripts/build_images.sh
bash examples/sealed_service/build.sh
export TSS2_LOG=all+none
bin=$here/.venv/bin
demo=$here/.demo
rm -rf "$demo"; mkdir -p "$demo/run"
cat > "$demo/config.yaml" <<YAML
socket: $demo/run/embassy.sock
data_dir: $demo/data
log_level: info
workload:
  image: embassy/sealed-service:latest
  ports: ["127.0.0.1:0:8080/tcp"]
YAML

step "start the embassy: own swtpm, workload launched beside it"
"$bin/embassy" serve --config "$demo/config.yaml" 2> "$demo/daemon.log" &
daemon=$!
cleanup() {
  kill -TERM "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null || true
  if [ -f "$demo/data/embassy-id" ]; then
    id=$(cat "$demo/data/embassy-id")
    docker ps -aq --filter "label=org.embassy.id=$id" | xargs -r docker rm -f >/dev/null
    docker network rm "embassy-$id" >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT
for _ in $(seq 1 600); do
  curl -sf --unix-socket "$demo/run/embassy.sock" http://embassy/v1/health >/dev/null 2>&1 && break
  kill -0 "$daemon" 2>/dev/null || { cat "$demo/daemon.log"; exit 1; }
  sleep 0.1
done
curl -s --unix-socket "$demo/run/embassy.sock" http://embassy/v1/health; echo
holder=$(docker ps -q --filter "label=org.embassy.id=$(cat "$demo/data/embassy-id")" \
  --filter label=org.embassy.role=netns-holder)
port=$(docker port "$holder" 8080/tcp | head -n1 | sed 's/.*://')
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.2; done
echo "workload serving on 127.0.0.1:$port"

step "user: fetch the identity document (live credential activation of AK and EK)"
"$bin/embassy" identity --socket "$demo/run/embassy.sock" --out "$demo/identity.json"

step "auditor: rebuild the measurement from the same code and config, verify the identity"
measurement=$("$bin/embassy" measure --config "$demo/config.yaml")
cat "$demo/data/swtpm-ca/swtpm-localca-rootca-cert.pem" "$demo/data/swtpm-ca/issuercert.pem" \
  > "$demo/ek-ca.pem"
policy=(--ek-ca "$demo/ek-ca.pem" --expect-measurement "$measurement" --allow-software-tpm)
"$bin/embassy" verify identity "$demo/identity.json" "${policy[@]}"

step "user: seal an input to that embassy (HPKE ML-KEM-768+X25519, streamed AES-256-GCM)"
printf 'Summarise the treaty clauses on verification of sealed computation.\n%.0s' \
  $(seq 1 2000) > "$demo/input.txt"
"$bin/embassy" payload seal --identity "$demo/identity.json" --in "$demo/input.txt" \
  --out "$demo/input.enc" --envelope "$demo/envelope.json" "${policy[@]}"
payload_id=$("$bin/python" -c 'import json,sys; print(json.load(open(sys.argv[1]))["payload_id"])' \
  "$demo/envelope.json")

step "user -> workload: the encrypted input; the workload asks the embassy to seal and open it"
curl -sf -X POST "http://127.0.0.1:$port/infer" \
  -H "X-Embassy-Envelope: $(base64 -w0 "$demo/envelope.json")" \
  -H "Content-Type: application/octet-stream" \
  --data-binary @"$demo/input.enc" > "$demo/reply.json"
"$bin/python" - "$demo/reply.json" "$demo/result.json" <<'PY'
import base64, json, sys
reply = json.load(open(sys.argv[1]))
json.dump(reply["result"], open(sys.argv[2], "w"))
print("output:", base64.b64decode(reply["output"]).decode()[:300])
PY

step "user: verify the result offline (output digest, seal before unseal, log, TPM quote)"
"$bin/embassy" verify result "$demo/result.json" --identity "$demo/identity.json" \
  --payload-id "$payload_id" "${policy[@]}"

step "a forged output is caught"
"$bin/python" - "$demo/result.json" "$demo/forged.json" <<'PY'
import base64, json, sys
r = json.load(open(sys.argv[1]))
out = bytearray(base64.b64decode(r["output"]))
out[-2] ^= 1  # one bit of the output changed after the fact
r["output"] = base64.b64encode(bytes(out)).decode()
json.dump(r, open(sys.argv[2], "w"))
PY
if "$bin/embassy" verify result "$demo/forged.json" --identity "$demo/identity.json" \
     "${policy[@]}" 2>&1; then
  echo "FORGED RESULT ACCEPTED"; exit 1
fi

step "the same payload again is refused (a payload opens once)"
curl -s -X POST "http://127.0.0.1:$port/infer" \
  -H "X-Embassy-Envelope: $(base64 -w0 "$demo/envelope.json")" \
  --data-binary @"$demo/input.enc"; echo

step "proved"
cat <<TXT
- the embassy's keys are bound by a TPM quote to its log, whose start event carries the
  measurement rebuilt here ($measurement), and the AK lives in the TPM whose EK
  certificate chains to the given CA;
- the workload's launch inputs were logged before it ran, and the seal statement names it;
- the input key left the embassy only after the workload was sealed, for payload
  $payload_id, once;
- the output the user holds is the one the workload committed to before it was unsealed,
  and the seal and unseal statements sit, in order, in a log the TPM's PCRs replay to.
This run used a SOFTWARE TPM (swtpm): it demonstrates the protocol, not this machine.
TXT
