"""The workload's loader of encrypted model files, run where it really runs: the workload
base image (Debian bookworm: python3, numpy 1.24, python3-cryptography 38), with no network.

Every pinned vector (tests/vectors/weights/) gets exactly its pinned verdict there too, with
one and two threads: the loader uses no API that cryptography 38 lacks. A 96 MiB model
loads under a 160 MiB memory limit with its hash intact, its peak RSS growing by the arrays
and a few MiB (measured: +0.6 MiB), and the key bytearray is wiped: a
loader that read the file whole (or a tensor's ciphertext whole) next to the arrays would
be OOM-killed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embassy.weights.encrypt import encrypt_file
from tests.integration.conftest import require
from tests.unit.weights.weights_vectors import safetensors_bytes

REPO = Path(__file__).resolve().parents[2]
BASE_IMAGE = "embassy/workload-base:bookworm-v3"
SCRIPT = (Path(__file__).parent / "inside" / "weights_loader.py").read_text()
MEMORY_LIMIT = 160 * 1024 * 1024


def _run(tmp_path: Path, args: dict[str, Any], mem_limit: int | None = None) -> dict[str, Any]:
    require("docker")
    import docker

    client = docker.from_env()
    try:
        try:
            client.images.get(BASE_IMAGE)
        except docker.errors.ImageNotFound:
            pytest.fail(f"image {BASE_IMAGE} missing: run scripts/build_images.sh")
        container = client.containers.run(
            BASE_IMAGE,
            ["python3", "-c", SCRIPT, json.dumps(args)],
            volumes={
                str(REPO / "workload_sdk"): {"bind": "/sdk/workload_sdk", "mode": "ro"},
                str(REPO / "tests" / "vectors" / "weights"): {"bind": "/vectors", "mode": "ro"},
                str(tmp_path): {"bind": "/model", "mode": "ro"},
            },
            network_mode="none",
            mem_limit=mem_limit or 0,
            memswap_limit=mem_limit or 0,
            detach=True,
        )
        try:
            status = container.wait(timeout=300)
            logs = container.logs(stdout=True, stderr=True).decode()
            container.reload()
            oom = container.attrs["State"]["OOMKilled"]
        finally:
            container.remove(force=True)
    finally:
        client.close()
    assert not oom, "the loader was OOM-killed"
    assert status["StatusCode"] == 0, logs
    result: dict[str, Any] = json.loads(logs.strip().splitlines()[-1])
    return result


def test_pinned_vectors_get_their_verdicts_with_cryptography_38(tmp_path: Path) -> None:
    result = _run(tmp_path, {"vectors": "/vectors", "model": None})
    assert result["cryptography"].startswith("38.")
    expected = json.loads((REPO / "tests/vectors/weights/expected.json").read_bytes())
    assert set(result["vectors"]) == set(expected)
    for name, case in expected.items():
        for verdict in result["vectors"][name]:
            assert verdict["code"] == case["expect"], (name, verdict)
            if case["expect"] == "ok":
                want = {k: v["sha256"] for k, v in case["tensors"].items()}
                assert verdict["tensors"] == want, name
            else:
                assert case["message"] in verdict["message"], (name, verdict)


def test_a_large_model_loads_in_bounded_memory(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    arrays = {f"layer{i}.weight": rng.standard_normal((1536, 2048), np.float32) for i in range(8)}
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(arrays[name].tobytes())
    src = tmp_path / "model.safetensors"
    src.write_bytes(safetensors_bytes(arrays, dict.fromkeys(arrays, "F32"), {}))
    del arrays
    key = os.urandom(32)
    encrypt_file(src, tmp_path / "model.emw", key, model_id="big", key_id="k", chunk_size=1 << 20)
    src.unlink()
    model = {"path": "/model/model.emw", "key": key.hex(), "model_id": "big", "key_id": "k"}
    result = _run(tmp_path, {"vectors": None, "model": model}, mem_limit=MEMORY_LIMIT)
    loaded = result["model"]
    assert loaded["bytes"] == 96 * 1024 * 1024
    assert loaded["sha256"] == digest.hexdigest()
    assert loaded["key_wiped"] is True
    extra = loaded["max_rss"] - loaded["rss_before"] - loaded["bytes"]
    print(f"peak RSS grew by the arrays + {extra / 2**20:.1f} MiB (1 MiB chunks, 2 CPUs)")
    assert extra < 4 * 1024 * 1024  # two 256 KiB read buffers and change
