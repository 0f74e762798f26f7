"""The pinned job-result vectors (tests/vectors/job-result/, docs/protocol.md §14).

:func:`job_result_vectors` makes them (scripts/gen_vectors.py writes them), deterministically:
the reply key, result key and HPKE ephemeral key come from labels, the wrap is RFC 9180's
base mode written out (``tests/unit/payload/payload_vectors.py``) and the stream's nonce
prefix is fixed. The tests open each one with :func:`embassy.jobs.result.open_result`, so a
good vector also checks that independent sender against cryptography's HPKE.

Each file: ``{"description", "input": {"bundle_b64", "binding", "reply_x25519_b64"},
"expect": {"ok": true, "plaintext_b64"} | {"error": <code>, "message": <substring>}}``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from embassy.errors import EmbassyError
from embassy.jobs.result import (
    JobResultBundle,
    ReplyPrivateKey,
    WrappedResultKey,
    open_result,
    result_info,
)
from embassy.wire.codec import JsonObject, b64encode, canonical_json
from tests.unit.payload.payload_vectors import hpke_seal_x25519
from workload_sdk.results import result_stream_id
from workload_sdk.stream import MIN_CHUNK_SIZE, encrypt_stream

DIRECTORY = "job-result"
ROOT = Path(__file__).resolve().parents[3]
VECTOR_DIR = ROOT / "tests" / "vectors" / DIRECTORY
PLAINTEXT = b"the job's result, for the user's eyes only\n" * 40  # 1,760 bytes: two chunks


def _seed(label: str) -> bytes:
    return hashlib.sha256(b"embassy job-result vector " + label.encode()).digest()


def _user(label: str) -> ReplyPrivateKey:
    return ReplyPrivateKey(X25519PrivateKey.from_private_bytes(_seed(f"{label} reply key")))


def _binding(job: str) -> JsonObject:
    return {
        "embassy_keyid": _seed("embassy").hex(),
        "image_digest": "sha256:" + _seed("image").hex(),
        "job": _seed(f"job {job}")[:16].hex(),
        "payload_id": _seed(f"payload {job}")[:16].hex(),
    }


def _result(label: str, user: ReplyPrivateKey, binding: JsonObject) -> tuple[JsonObject, bytes]:
    """(wrapped key JSON, ciphertext) of one job, deterministically."""
    key = _seed(f"{label} result key")
    ephemeral = X25519PrivateKey.from_private_bytes(_seed(f"{label} ephemeral"))
    public = user.public
    wrapped = hpke_seal_x25519(user.x25519.public_key(), result_info(binding), key, ephemeral)
    out = io.BytesIO()
    encrypt_stream(
        key,
        result_stream_id(key),
        io.BytesIO(PLAINTEXT),
        out,
        chunk_size=MIN_CHUNK_SIZE,
        nonce_prefix=_seed(f"{label} nonce prefix")[:7],
    )
    wrapped_json = WrappedResultKey(public.suite, public.keyid(), binding, wrapped).to_json()
    return wrapped_json, out.getvalue()


def _bundle(job: str, wrapped: JsonObject, sent: bytes, **change: Any) -> bytes:
    """A bundle for ``job`` carrying ``sent`` and its digest, then ``change`` applied."""
    obj: JsonObject = {
        "v": 1,
        "type": "embassy-job-result",
        "job": _binding(job)["job"],
        "wrapped_key": wrapped,
        "ciphertext_sha256": hashlib.sha256(sent).hexdigest(),
        "ciphertext": b64encode(sent),
        "statements": [b64encode(b'{"payloadType":"application/vnd.in-toto+json"}')],
        "log": {"v": 1},
    }
    return canonical_json({**obj, **change})


def _flip(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0x01
    return bytes(out)


def job_result_vectors() -> dict[str, bytes]:
    """Every file under tests/vectors/job-result/, by path relative to tests/vectors/."""
    alice, bob = _user("alice"), _user("bob")
    mine, theirs = _binding("A"), _binding("B")
    wrapped, ct = _result("A", alice, mine)
    other_job_wrapped, other_job_ct = _result("B", alice, theirs)
    to_bob, _ = _result("A to bob", bob, mine)
    cut = ct[: -(len(PLAINTEXT) - MIN_CHUNK_SIZE + 16)]  # the last chunk's record dropped
    flipped = _flip(ct, -1)

    def refused(code: str, message: str) -> JsonObject:
        return {"error": code, "message": message}

    cases: dict[str, tuple[str, bytes, JsonObject]] = {
        "good-job-result": (
            "a result encrypted to the user's reply key (x25519) for this job opens",
            _bundle("A", wrapped, ct),
            {"ok": True, "plaintext_b64": b64encode(PLAINTEXT)},
        ),
        "bad-job-result-other-reply-key": (
            "the result key wrapped to another user's reply key (bob), opened by alice",
            _bundle("A", to_bob, ct),
            refused("result-wrong-reply-key", "another user's reply key"),
        ),
        "bad-job-result-reply-key-altered": (
            "wrapped to bob's reply key, its reply_keyid rewritten to alice's: HPKE does not "
            "unwrap it with alice's key",
            _bundle("A", {**to_bob, "reply_keyid": alice.public.keyid()}, ct),
            refused("result-key-unwrap", "does not unwrap"),
        ),
        "bad-job-result-other-job": (
            "another job's wrapped key (job B, same user) in this job's bundle",
            _bundle("A", other_job_wrapped, ct),
            refused("result-wrong-job", "binding.job is"),
        ),
        "bad-job-result-binding-altered": (
            "job B's wrapped key with its binding rewritten to job A's: the HPKE info was B's",
            _bundle("A", {**other_job_wrapped, "binding": mine}, ct),
            refused("result-key-unwrap", "does not unwrap"),
        ),
        "bad-job-result-ciphertext-altered": (
            "one bit of the ciphertext flipped in transit",
            _bundle("A", wrapped, ct, ciphertext=b64encode(flipped)),
            refused("result-tampered", "ciphertext_sha256"),
        ),
        "bad-job-result-ciphertext-altered-digest-fixed": (
            "one bit of the last chunk flipped and ciphertext_sha256 recomputed to match",
            _bundle(
                "A",
                wrapped,
                flipped,
            ),
            refused("result-tampered", "does not authenticate"),
        ),
        "bad-job-result-other-jobs-ciphertext": (
            "job B's ciphertext (same user) with its digest, in job A's bundle",
            _bundle("A", wrapped, other_job_ct),
            refused("result-wrong-job", "another result key"),
        ),
        "bad-job-result-truncated": (
            "the last chunk dropped and ciphertext_sha256 recomputed to match",
            _bundle("A", wrapped, cut),
            refused("result-truncated", "cut short"),
        ),
        "bad-job-result-unknown-field": (
            "a field the format does not have",
            _bundle("A", wrapped, ct, note="x"),
            refused("malformed", "unknown field(s) 'note'"),
        ),
    }
    out: dict[str, bytes] = {}
    for name, (description, bundle, expect) in cases.items():
        doc = {
            "description": description,
            "input": {
                "bundle_b64": b64encode(bundle),
                "binding": mine,
                "reply_x25519_b64": b64encode(_seed("alice reply key")),
            },
            "expect": expect,
        }
        text = json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        out[f"{DIRECTORY}/{name}.json"] = text.encode()
    return out


VECTORS = sorted(VECTOR_DIR.glob("*.json"))


def test_the_vectors_are_there_and_current() -> None:
    names = {p.name for p in VECTORS}
    assert names == {Path(n).name for n in job_result_vectors()}
    for name, data in job_result_vectors().items():
        assert (VECTOR_DIR.parent / name).read_bytes() == data, (
            f"{name}: run scripts/gen_vectors.py"
        )


@pytest.mark.parametrize("path", VECTORS, ids=[p.stem for p in VECTORS])
def test_job_result_vector(path: Path) -> None:
    vector = json.loads(path.read_bytes())
    inputs, expect = vector["input"], vector["expect"]
    assert path.stem.startswith("good-" if expect.get("ok") else "bad-")
    key = ReplyPrivateKey(
        X25519PrivateKey.from_private_bytes(base64.b64decode(inputs["reply_x25519_b64"]))
    )
    bundle = base64.b64decode(inputs["bundle_b64"])
    if expect.get("ok"):
        assert open_result(bundle, key, inputs["binding"]) == base64.b64decode(
            expect["plaintext_b64"]
        )
        assert JobResultBundle.parse(bundle).to_bytes() == bundle
        return
    with pytest.raises(EmbassyError) as caught:
        open_result(bundle, key, inputs["binding"])
    assert caught.value.code == expect["error"], caught.value.message
    assert expect["message"] in caught.value.message
