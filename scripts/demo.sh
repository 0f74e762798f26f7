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
#   5. the user verifies output + statements offline, and sees a forgery fail;
#   5b. the model ships encrypted: the owner's key broker (Rego policy) refuses another image,
#      another measurement, a tenant without the model, then releases the key to the embassy,
#      which hands it to the workload it launched; the decision log verifies;
#   6. an authority teaches the embassy two capabilities (write mode) from prompts the real
#      model (all-MiniLM-L6-v2, numpy, in the sealed container) runs; a user's prompt is
#      metered (update mode); the authority reads its meters and verifies the reading.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
step() { printf '\n== %s\n' "$*"; }

step "set up (Debian packages, venv, dockerd, local images: the first run takes a few minutes)"
bash scripts/setup.sh >/dev/null
bash scripts/ensure_dockerd.sh
bash scripts/build_images.sh
bash examples/sealed_service/build.sh
bash examples/job_service/build.sh
export TSS2_LOG=all+none
bin=$here/.venv/bin
demo=$here/.demo
rm -rf "$demo"; mkdir -p "$demo/run"

broker_port=$("$bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
step "authority: make a signing key; its public key and capabilities go into the policy"
export EMBASSY_KEY_PASSPHRASE=demo-only-passphrase
"$bin/embassy" keygen --name aisi --out "$demo/aisi.key" > "$demo/aisi.pub.json"
aisi_pub=$("$bin/python" -c 'import json,sys; print(json.load(open(sys.argv[1]))["ed25519"])' \
  "$demo/aisi.pub.json")
cat > "$demo/config.yaml" <<YAML
socket: $demo/run/embassy.sock
data_dir: $demo/data
log_level: info
socket_group: "10001"  # the example workload's group: it does not run as root
workload:
  image: embassy/sealed-service:latest
  ports: ["127.0.0.1:0:8080/tcp"]
  env:
    BROKER_URL: "http://gateway:$broker_port"  # the model owner's broker, on the embassy's bridge
jobs:  # one fresh container per job, no network from birth, destroyed after
  image: embassy/job-service:latest
  user: "10001:10001"
  pool_size: 1
metering:
  spool_gid: 10001
authorities:
  - name: aisi
    ed25519: $aisi_pub
    capabilities: [cyber, bio]
YAML

step "start the embassy: own swtpm, workload launched beside it"
"$bin/embassy" serve --config "$demo/config.yaml" 2> "$demo/daemon.log" &
daemon=$!
cleanup() {
  [ -z "${broker_pid:-}" ] || kill "$broker_pid" 2>/dev/null || true
  kill -TERM "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null || true
  if [ -f "$demo/data/embassy-id" ]; then
    id=$(cat "$demo/data/embassy-id")
    docker ps -aq --filter "label=org.embassy.id=$id" | xargs -r docker rm -f >/dev/null
    docker network rm "embassy-$id" >/dev/null 2>&1 || true
    # The host's nat rules that published the workload's ports (the daemon keeps them for
    # its next start): the jumps to its chains, then the chains.
    iptables-legacy -t nat -S 2>/dev/null | grep -E "^-A (PREROUTING|OUTPUT|POSTROUTING) .*-j EMBASSY-[PS]-$id" \
      | sed 's/^-A/-D/' | while read -r rule; do eval "iptables-legacy -t nat $rule"; done
    for chain in "EMBASSY-P-$id" "EMBASSY-S-$id"; do
      iptables-legacy -t nat -F "$chain" 2>/dev/null && iptables-legacy -t nat -X "$chain" 2>/dev/null || true
    done
    # The activation spool the daemon leaves mounted (it outlives a daemon, as the workload).
    umount -l "$demo/data/activations" 2>/dev/null || true
  fi
}
trap cleanup EXIT
for _ in $(seq 1 600); do
  curl -sf --unix-socket "$demo/run/embassy.sock" http://embassy/v1/health >/dev/null 2>&1 && break
  kill -0 "$daemon" 2>/dev/null || { cat "$demo/daemon.log"; exit 1; }
  sleep 0.1
done
curl -s --unix-socket "$demo/run/embassy.sock" http://embassy/v1/health; echo
# The embassy publishes the workload's ports itself (the workload has no Docker network).
port=$(curl -s --unix-socket "$demo/run/embassy.sock" http://embassy/v1/seal | "$bin/python" -c \
  'import json,sys; print(next(p["host_port"] for p in json.load(sys.stdin)["workload"]["ports"] if p["container_port"] == 8080))')
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.2; done
echo "workload serving on 127.0.0.1:$port"

cat "$demo/data/swtpm-ca/swtpm-localca-rootca-cert.pem" "$demo/data/swtpm-ca/issuercert.pem" \
  > "$demo/ek-ca.pem"
step "registrar: check the EK certificate, credential activation, certify the AK (offline proof)"
# A demo passphrase: a real registrar's CA key lives with the registrar, never on the host.
export EMBASSY_REGISTRAR_PASSPHRASE="demo registrar passphrase"
"$bin/embassy" registrar init --dir "$demo/registrar" --name "demo registrar CA"
"$bin/embassy" registrar enroll --dir "$demo/registrar" --socket "$demo/run/embassy.sock" \
  --swtpm-ca "$demo/ek-ca.pem" --allow-software-tpm
unset EMBASSY_REGISTRAR_PASSPHRASE

step "model owner: the image carries the model ENCRYPTED; a key broker releases its key by policy"
export EMBASSY_BROKER_PASSPHRASE="demo broker passphrase"
"$bin/embassy" broker init --dir "$demo/broker" >/dev/null
"$bin/embassy" broker add-key --dir "$demo/broker" --model-id minilm-l6 --key-id k1 \
  --key-file "$here/.model-owner/minilm.key"
echo "in the image: $(docker run --rm --entrypoint ls embassy/sealed-service:latest /app/model | tr '\n' ' ')"
curl -sf "http://127.0.0.1:$port/model"; echo "   <- the workload, before any release"
id=$(cat "$demo/data/embassy-id")
gateway=$(docker network inspect -f '{{range .IPAM.Config}}{{if .Gateway}}{{.Gateway}} {{end}}{{end}}' "embassy-$id" | tr ' ' '\n' | grep -v : | head -1)
image_id=$(docker image inspect -f '{{.Id}}' embassy/sealed-service:latest)
measurement=$("$bin/embassy" measure --config "$demo/config.yaml")
broker_data() {  # images measurements tenant-models
  cat > "$demo/broker-data.json" <<JSON
{"broker": {"require_sealed": false, "tenants": {"acme": [$3]},
            "models": {"minilm-l6": {"image_digests": ["$1"], "measurements": ["$2"]}}}}
JSON
}
cat > "$demo/broker.yaml" <<YAML
dir: $demo/broker
listen: {tcp: "$gateway:$broker_port"}
policy: $here/examples/broker/policy.rego
data: $demo/broker-data.json
trust:
  swtpm_cas: [$demo/ek-ca.pem]
  ak_cas: [$demo/registrar/registrar-ca.pem]
  allow_software_tpm: true   # the demo's TPM is swtpm
YAML
broker_pid=""
serve_broker() {
  [ -z "$broker_pid" ] || { kill "$broker_pid"; wait "$broker_pid" 2>/dev/null || true; }
  "$bin/embassy" broker serve --config "$demo/broker.yaml" > "$demo/broker.out" 2>> "$demo/broker.log" &
  broker_pid=$!
  for _ in $(seq 1 100); do grep -q ready "$demo/broker.out" 2>/dev/null && break; sleep 0.1; done
}
try_load() {  # what the workload gets when it asks the broker now
  printf '%s: ' "$1"
  curl -sf -X POST "http://127.0.0.1:$port/model/load" | "$bin/python" -c \
    'import json,sys; s=json.load(sys.stdin); print(s["state"], json.dumps(s.get("last_release")))'
}
broker_data "sha256:$(printf '0%.0s' $(seq 1 64))" "$measurement" '"minilm-l6"'; serve_broker
try_load "policy lists another image digest"
broker_data "$image_id" "$(printf '0%.0s' $(seq 1 64))" '"minilm-l6"'; serve_broker
try_load "policy lists another measurement "
broker_data "$image_id" "$measurement" ''; serve_broker
try_load "policy gives tenant acme no model "
broker_data "$image_id" "$measurement" '"minilm-l6"'; serve_broker
try_load "policy allows this image+embassy"
"$bin/embassy" broker log --dir "$demo/broker" --verify | "$bin/python" -c \
  'import json,sys; [print("  decision", d["seq"], d["decision"], d["reason"] or "") for d in map(json.loads, sys.stdin)]'
unset EMBASSY_BROKER_PASSPHRASE

step "user: fetch the identity document (live credential activation of AK and EK)"
"$bin/embassy" identity --socket "$demo/run/embassy.sock" --out "$demo/identity.json"

step "auditor: rebuild the measurement from the same code and config, verify the identity"
measurement=$("$bin/embassy" measure --config "$demo/config.yaml")
policy=(--swtpm-ca "$demo/ek-ca.pem" --ak-ca "$demo/registrar/registrar-ca.pem"
  --expect-measurement "$measurement" --allow-software-tpm)
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

# A prompt, sealed with the given instructions, through the model: POST /embed.
embed() {
  local prompt=$1 reply=$2; shift 2
  local args=()
  for instruction in "$@"; do args+=(--instruction "$instruction"); done
  printf '%s' "$prompt" > "$demo/prompt.txt"
  "$bin/embassy" payload seal --identity "$demo/identity.json" --in "$demo/prompt.txt" \
    --out "$demo/prompt.enc" --envelope "$demo/prompt.envelope.json" \
    --actions "$demo/prompt.actions" "${args[@]}" "${policy[@]}" 2>/dev/null
  "$bin/python" - "$demo" > "$demo/embed.json" <<'PY'
import base64, json, pathlib, sys
d = pathlib.Path(sys.argv[1])
print(json.dumps({
    "envelope": json.loads((d / "prompt.envelope.json").read_text()),
    "input": base64.b64encode((d / "prompt.enc").read_bytes()).decode(),
    "actions": base64.b64encode((d / "prompt.actions").read_bytes()).decode(),
}))
PY
  curl -sf -X POST "http://127.0.0.1:$port/embed" -H "Content-Type: application/json" \
    --data-binary @"$demo/embed.json" > "$reply"
}
instruct() {  # op capability [polarity] -> path of a fresh signed instruction
  local out; out=$(mktemp "$demo/instruction.XXXXXX")
  "$bin/embassy" meters instruct --key "$demo/aisi.key" --authority aisi \
    --identity "$demo/identity.json" --op "$1" ${2:+--capability "$2"} \
    ${3:+--polarity "$3"} --out "$out" "${policy[@]}" 2>/dev/null
  echo "$out"
}
read_meters() {
  embed "read my meters" "$demo/read.json" "$(instruct read)"
  "$bin/python" -c 'import json,sys,base64; open(sys.argv[2],"wb").write(base64.b64decode(json.load(open(sys.argv[1]))["readings"][0]))' \
    "$demo/read.json" "$demo/reading.dsse.json"
  "$bin/embassy" meters read --key "$demo/aisi.key" --authority aisi \
    --identity "$demo/identity.json" "$demo/reading.dsse.json" "${policy[@]}"
}

step "user: a confidential job: a container made for it alone, no network from birth, destroyed after"
"$bin/embassy" keygen --reply --out "$demo/reply.key" --public-out "$demo/reply.pub" >/dev/null
printf '{"text": "Quarterly figures the user will not show the host: revenue 1.2M, churn 3%%."}' \
  > "$demo/job-input.json"
"$bin/embassy" payload seal --job --identity "$demo/identity.json" --in "$demo/job-input.json" \
  --out "$demo/job-input.enc" --envelope "$demo/job-envelope.json" \
  --reply-key "$demo/reply.pub" "${policy[@]}" 2>/dev/null
job=$("$bin/python" - "$demo" <<'PY'
import base64, json, sys
from pathlib import Path
from embassy.client import call
demo = Path(sys.argv[1])
body = {"payload": json.loads((demo / "job-envelope.json").read_text()),
        "input": base64.b64encode((demo / "job-input.enc").read_bytes()).decode()}
print(call(demo / "run" / "embassy.sock", "POST", "/v1/jobs", body)["job"])
PY
)
echo "host: submitted job $job (it relays ciphertext only)"
curl -sf --unix-socket "$demo/run/embassy.sock" "http://embassy/v1/jobs/$job?wait=50" \
  > "$demo/job-status.json"
"$bin/python" - "$demo/job-status.json" "$demo/job-bundle.json" <<'PY'
import json, sys
status = json.load(open(sys.argv[1]))
print("job", status["job"], status["state"])
json.dump(status["result"], open(sys.argv[2], "w"))
PY
step "user: verify the job offline (sealed from birth, keys once, output committed, destroyed)"
"$bin/embassy" verify job "$demo/job-bundle.json" --identity "$demo/identity.json" \
  --reply-key "$demo/reply.key" "${policy[@]}" 2>/dev/null | grep -v "^ok    identity:"
"$bin/embassy" result open --key "$demo/reply.key" --bundle "$demo/job-bundle.json" \
  --out "$demo/job-result.json" 2>/dev/null
echo "the result, readable only with the user's reply key: $(cat "$demo/job-result.json")"
docker ps -a --filter "label=org.embassy.role=job" --format '{{.ID}} {{.Status}}' \
  | sed 's/^/still there (the warm pool, no job in it yet): /'

step "authority: teach 'cyber' and 'bio' from the labelled set's write half (write mode, real model)"
# benchmarks/data/metering_eval.json: prompts written for this project, split by sub-topic
# into a write half (teaching) and an update half (metering); generic prompts and benign
# capabilities' prompts are the authority's negatives (formula v2 uses them as one group).
eval_prompts() {  # python expression over d (the set) -> one prompt per line
  "$bin/python" -c 'import json,sys; d=json.load(open(sys.argv[1])); print("\n".join('"$1"'))' \
    "$here/benchmarks/data/metering_eval.json"
}
mapfile -t cyber < <(eval_prompts 'd["capabilities"]["cyber-offense"]["write"][:8]')
mapfile -t bio < <(eval_prompts 'd["capabilities"]["bio-lab"]["write"][:8]')
mapfile -t generic < <(eval_prompts 'd["generic"]["write"][:12]+d["capabilities"]["cooking"]["write"][:4]')
for p in "${cyber[@]}"; do embed "$p" "$demo/w.json" "$(instruct write cyber positive)"; done
for p in "${bio[@]}"; do embed "$p" "$demo/w.json" "$(instruct write bio positive)"; done
for p in "${generic[@]}"; do embed "$p" "$demo/w.json" "$(instruct write bio negative)"; done
echo "taught: $(( ${#cyber[@]} + ${#bio[@]} + ${#generic[@]} )) sealed sessions, each recorded by a meter-batch statement"

step "authority: meters before any user prompt"
read_meters

step "user: a prompt about cyber offence, sealed with an update instruction (update mode)"
embed "$(eval_prompts 'd["capabilities"]["cyber-offense"]["update"][:1]')" \
  "$demo/update.json" "$(instruct update cyber)" "$(instruct update bio)"
"$bin/python" - "$demo/update.json" <<'PY'
import base64, json, sys
reply = json.load(open(sys.argv[1]))
out = json.loads(base64.b64decode(reply["output"]))
unseal = json.loads(base64.b64decode(json.loads(base64.b64decode(reply["unseal_statement"]))["payload"]))
print("output: %d-dim embedding of %d tokens" % (out["dim"], out["tokens"]))
print("unseal statement, metering:", json.dumps(unseal["predicate"]["metering"], indent=1))
PY

step "authority: read the meters again and verify the reading (only aisi can decrypt it)"
read_meters | tee "$demo/meters.txt"
# The claim below is checked, not assumed: the cyber meter moved, and more than bio's.
"$bin/python" - "$demo/meters.txt" <<'PY'
import json, sys
reading = json.loads(next(l for l in open(sys.argv[1]) if l.startswith("{")))
value = {m["capability"]: m["value"] for m in reading["meters"]}
assert value["cyber"] > value["bio"] and value["cyber"] > 0, value
print("cyber moved by %d micro-units, bio by %d" % (value["cyber"], value["bio"]))
PY

step "proved"
cat <<TXT
- the embassy's keys are bound by a TPM quote to its log, whose start event carries the
  measurement rebuilt here ($measurement); a registrar's AK certificate proves,
  offline, that the AK lives in the TPM whose EK certificate chains to swtpm's CA;
- the workload's launch inputs were logged before it ran, and the seal statement names it;
- a job ran in a container made for it alone, with no network at any moment; its result
  was encrypted to the user's reply key, committed, and the container destroyed and checked
  gone, each step a signed statement in the same log;
- the model's weights shipped encrypted; the owner's broker released their key, by its Rego
  policy over the embassy's verified evidence, only to this image on this measured embassy,
  and logged every decision (three denials, one release) in a signed chain;
- the input key left the embassy only after the workload was sealed, for payload
  $payload_id, once;
- the output the user holds is the one the workload committed to before it was unsealed,
  and the seal and unseal statements sit, in order, in a log the TPM's PCRs replay to;
- the authority's signatures and the user's meter update were recorded from the model's
  own hidden states while it was sealed, each by a signed statement; the cyber prompt
  moved the cyber meter more than the bio one, and only the authority could read them.
This run used a SOFTWARE TPM (swtpm): it demonstrates the protocol, not this machine.
TXT
