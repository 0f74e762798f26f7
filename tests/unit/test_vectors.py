"""Run every pinned vector in tests/vectors/ through the verifier and check its outcome.

Good vectors must verify; hostile ones must fail with exactly the error code they name (and
a message naming the right reason). A last test regenerates the vectors in memory, so a
change in any wire format or check that moves a vector fails here until it is regenerated
(``python scripts/gen_vectors.py``) and the diff reviewed.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from embassy.attest.ek import load_pem_bundle
from embassy.errors import EmbassyError
from embassy.log.entry import parse_entry
from embassy.verify.policy import TrustPolicy
from embassy.verify.report import run
from embassy.wire.dsse import parse_envelope, verify_envelope
from embassy.wire.statement import parse_statement

ROOT = Path(__file__).resolve().parents[2]
VECTOR_DIR = ROOT / "tests" / "vectors"
VECTORS = sorted(VECTOR_DIR.glob("*.json"))
KINDS = {
    "identity",
    "log",
    "evidence",
    "statement",
    "result",
    "envelope",
    "entry",
    "statement-payload",
    "payload",
}


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "gen_vectors", ROOT / "scripts" / "gen_vectors.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bytes(inputs: dict[str, Any], key: str) -> bytes:
    data = base64.b64decode(inputs[key], validate=True)
    pad_to = inputs.get("pad_to")
    if pad_to is not None:
        assert pad_to > len(data)
        data += b" " * (pad_to - len(data))
    return data


def _policy(spec: dict[str, Any]) -> TrustPolicy:
    measurement = spec.get("expected_measurement")

    def bundle(key: str) -> tuple[Any, ...]:
        name = spec.get(key)
        return () if name is None else tuple(load_pem_bundle((VECTOR_DIR / name).read_bytes()))

    return TrustPolicy(
        ek_cas=bundle("ek_ca"),
        software_ek_cas=bundle("swtpm_ca"),
        ak_cas=bundle("ak_ca"),
        expected_measurement=None if measurement is None else bytes.fromhex(measurement),
        allow_software_tpm=spec["allow_software_tpm"],
        at=datetime.fromisoformat(spec["at"]),
    )


def _run_report(kind: str, files: dict[str, bytes], policy: TrustPolicy, **args: Any) -> None:
    result = run(kind, argparse.Namespace(**args), policy, files.__getitem__)
    assert result["ok"] is True


def run_vector(vector: dict[str, Any]) -> None:
    """Verify one vector's input as its kind says; raise whatever the verifier raises."""
    kind, inputs, spec = vector["kind"], vector["input"], vector["policy"]
    if kind == "envelope":
        key = base64.b64decode(inputs["public_key_b64"])
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        verify_envelope(
            parse_envelope(_bytes(inputs, "envelope_b64")),
            Ed25519PublicKey.from_public_bytes(key),
        )
    elif kind == "entry":
        parse_entry(_bytes(inputs, "entry_b64"))
    elif kind == "statement-payload":
        parse_statement(_bytes(inputs, "payload_b64"))
    elif kind == "identity":
        _run_report("identity", {"doc": _bytes(inputs, "document_b64")}, _policy(spec), file="doc")
    elif kind == "log":
        files = {"identity": _bytes(inputs, "identity_b64")}
        names = []
        for i, segment in enumerate(inputs["segments_b64"]):
            names.append(f"segment-{i}")
            files[names[-1]] = base64.b64decode(segment)
        complete: dict[str, Any] = {}
        if "evidence_b64" in inputs:  # shown complete by fresh evidence over the nonce
            files["ev"] = _bytes(inputs, "evidence_b64")
            complete = {"complete": True, "evidence": "ev", "nonce": spec["nonce"]}
        _run_report("log", files, _policy(spec), identity="identity", file=names, **complete)
    elif kind == "evidence":
        files = {"identity": _bytes(inputs, "identity_b64"), "ev": _bytes(inputs, "evidence_b64")}
        _run_report(
            "evidence", files, _policy(spec), identity="identity", file="ev", nonce=spec["nonce"]
        )
    elif kind == "statement":
        files = {
            "identity": _bytes(inputs, "identity_b64"),
            "statement": _bytes(inputs, "statement_b64"),
            "segment": _bytes(inputs, "segment_b64"),
        }
        _run_report(
            "statement", files, _policy(spec), identity="identity", file="statement", log="segment"
        )
    elif kind == "result":
        files = {"identity": _bytes(inputs, "identity_b64"), "r": _bytes(inputs, "result_b64")}
        evidence: dict[str, Any] = {}
        for when in ("before", "after"):
            if f"{when}_b64" in inputs:
                files[when] = _bytes(inputs, f"{when}_b64")
                evidence |= {when: when, f"{when}_nonce": inputs[f"{when}_nonce"]}
        _run_report(
            "result",
            files,
            _policy(spec),
            identity="identity",
            file="r",
            payload_id=inputs.get("payload_id"),
            **evidence,
        )
    elif kind == "payload":
        _open_payload(inputs, spec)
    else:
        raise AssertionError(f"unknown vector kind {kind!r}")


def _open_payload(inputs: dict[str, Any], embassy: dict[str, Any]) -> None:
    """The embassy side: the vector's embassy opens the payload (and gets its key back)."""
    from embassy.daemon.keys import derive_keys
    from embassy.payload.envelope import PayloadEnvelope, open_payload
    from embassy.wire.dsse import keyid

    keys = derive_keys(bytes.fromhex(embassy["master"]))
    input_key, _ = open_payload(
        PayloadEnvelope.parse(_bytes(inputs, "envelope_b64")),
        private_keys={"x25519": keys.hpke_x25519, "mlkem768-x25519": keys.hpke_hybrid},
        own_keyid=keyid(keys.signing.public_key()),
        own_measurement=bytes.fromhex(embassy["measurement"]),
        own_launch_digest=bytes.fromhex(embassy["launch_digest"]),
        now=embassy["now"],
    )
    assert input_key == _bytes(inputs, "input_key_b64")


def test_vectors_exist() -> None:
    names = {p.stem for p in VECTORS}
    assert any(n.startswith("good-") for n in names)
    assert any(n.startswith("bad-") for n in names)
    kinds = {json.loads(p.read_bytes())["kind"] for p in VECTORS}
    assert kinds == KINDS


@pytest.mark.parametrize("path", VECTORS, ids=[p.stem for p in VECTORS])
def test_vector(path: Path) -> None:
    vector = json.loads(path.read_bytes())
    assert set(vector) == {"description", "kind", "input", "policy", "expect"}
    expect = vector["expect"]
    assert path.stem.startswith("good-" if "ok" in expect else "bad-")
    if expect.get("ok"):
        run_vector(vector)
        return
    with pytest.raises(EmbassyError) as caught:
        run_vector(vector)
    assert caught.value.code == expect["error"], caught.value.message
    assert expect["message"] in caught.value.message


WEIGHTS_DIR = VECTOR_DIR / "weights"
WEIGHTS: dict[str, dict[str, Any]] = json.loads((WEIGHTS_DIR / "expected.json").read_bytes())


@pytest.mark.parametrize("name", sorted(WEIGHTS))
def test_weights_vector(name: str) -> None:
    """Each encrypted model file loads with the workload's loader exactly as pinned."""
    import hashlib

    from workload_sdk.weights import DTYPES, WeightsError, load_encrypted

    case = WEIGHTS[name]
    path = WEIGHTS_DIR / f"{name}.emw"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == case["sha256"]
    load = case["load"]
    for threads in (1, 4):
        args = {"model_id": load["model_id"], "key_id": load["key_id"], "threads": threads}
        if case["expect"] != "ok":
            with pytest.raises(WeightsError) as caught:
                load_encrypted(path, bytes.fromhex(load["key"]), **args)
            assert caught.value.code == case["expect"], caught.value.message
            assert case["message"] in caught.value.message
            continue
        tensors = load_encrypted(path, bytes.fromhex(load["key"]), **args)
        assert sorted(tensors) == sorted(case["tensors"])
        for tensor, want in case["tensors"].items():
            array = tensors[tensor]
            assert array.dtype.str == DTYPES[want["dtype"]][1]
            assert list(array.shape) == want["shape"]
            assert hashlib.sha256(array.tobytes()).hexdigest() == want["sha256"]


def test_vectors_are_up_to_date() -> None:
    problems = _load_generator().check(VECTOR_DIR)
    assert problems == [], "run python scripts/gen_vectors.py and review the diff"


def test_check_reports_drift(tmp_path: Path) -> None:
    generator = _load_generator()
    generator.write(tmp_path)
    assert generator.check(tmp_path) == []
    (tmp_path / "good-entry.json").write_bytes(b"{}\n")
    (tmp_path / "good-log.json").unlink()
    (tmp_path / "stray.json").write_bytes(b"{}\n")
    assert generator.check(tmp_path) == [
        "differs: good-entry.json",
        "missing: good-log.json",
        "extra: stray.json",
    ]
    assert generator.main(["--check", "--dir", str(tmp_path)]) == 1
