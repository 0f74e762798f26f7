"""Run inside the workload base image (python3, numpy, python3-cryptography 38).

argv[1]: JSON {"vectors": dir or null, "model": {path, key, model_id, key_id, sha256}
or null}. Loads every pinned weights vector with workload_sdk.weights (mounted at /sdk) with
one and two threads, and the big model if given; prints one JSON object of verdicts.
"""

import hashlib
import json
import os
import resource
import sys

sys.path.insert(0, "/sdk")

import cryptography
import numpy

from workload_sdk.weights import WeightsError, load_encrypted

args = json.loads(sys.argv[1])
out = {"cryptography": cryptography.__version__, "numpy": numpy.__version__, "vectors": {}}
if args["vectors"]:
    with open(os.path.join(args["vectors"], "expected.json")) as f:
        expected = json.load(f)
    for name, case in sorted(expected.items()):
        load = case["load"]
        verdicts = []
        for threads in (1, 2):
            try:
                tensors = load_encrypted(
                    os.path.join(args["vectors"], name + ".emw"),
                    bytes.fromhex(load["key"]),
                    model_id=load["model_id"],
                    key_id=load["key_id"],
                    threads=threads,
                )
            except WeightsError as exc:
                verdicts.append({"code": exc.code, "message": exc.message})
            else:
                digests = {k: hashlib.sha256(v.tobytes()).hexdigest() for k, v in tensors.items()}
                verdicts.append({"code": "ok", "tensors": digests})
        out["vectors"][name] = verdicts
model = args["model"]
if model:
    key = bytearray(bytes.fromhex(model["key"]))
    # Warm up first (OpenSSL's bindings load on first use, the thread pool starts), so the
    # figure is what the load itself adds.
    load_encrypted(
        "/vectors/good-weights.emw",
        bytes(range(100, 132)),
        threads=2,
        model_id="vectors/tiny-model@1",
        key_id="vectors-key-1",
    )
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tensors = load_encrypted(
        model["path"], key, model_id=model["model_id"], key_id=model["key_id"], wipe_key=True
    )
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(tensors[name].reshape(-1).view(numpy.uint8))  # no copy
    out["model"] = {
        "sha256": digest.hexdigest(),
        "bytes": sum(t.nbytes for t in tensors.values()),
        "key_wiped": key == bytearray(len(key)),
        "rss_before": rss_before,
        "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
print(json.dumps(out))
