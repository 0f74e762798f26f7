"""Deterministic payload envelopes for the pinned vectors (scripts/gen_vectors.py).

cryptography's HPKE draws a fresh ephemeral key on every call, and pinned vectors must be the
same bytes on every run, so the sender here is RFC 9180's base mode written out for the
``x25519`` suite (DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM) with an ephemeral
key derived from a label. The embassy opens the vectors with cryptography's HPKE, so a good
vector is also a check of this independent sender against it. (The ML-KEM suite's
encapsulation has no deterministic API to build on: its vectors are the unit tests'.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from embassy.daemon.keys import derive_keys
from embassy.payload.envelope import PayloadEnvelope, ReplyKey, info_for
from embassy.wire.codec import JsonObject, canonical_json

_KEM_X25519, _KDF_HKDF_SHA256, _AEAD_AES_256_GCM = 0x0020, 0x0001, 0x0002
_KEM_SUITE = b"KEM" + _KEM_X25519.to_bytes(2, "big")
_HPKE_SUITE = b"HPKE" + b"".join(
    i.to_bytes(2, "big") for i in (_KEM_X25519, _KDF_HKDF_SHA256, _AEAD_AES_256_GCM)
)
_RAW = (Encoding.Raw, PublicFormat.Raw)


def _extract(suite: bytes, salt: bytes, label: bytes, ikm: bytes) -> bytes:
    return hmac.digest(salt or bytes(32), b"HPKE-v1" + suite + label + ikm, "sha256")


def _expand(suite: bytes, prk: bytes, label: bytes, info: bytes, length: int) -> bytes:
    labeled = length.to_bytes(2, "big") + b"HPKE-v1" + suite + label + info
    return HKDFExpand(hashes.SHA256(), length, labeled).derive(prk)


def hpke_seal_x25519(
    recipient: X25519PublicKey, info: bytes, plaintext: bytes, ephemeral: X25519PrivateKey
) -> bytes:
    """RFC 9180 SealBase with a given ephemeral key; returns enc || ciphertext."""
    enc = ephemeral.public_key().public_bytes(*_RAW)
    dh = ephemeral.exchange(recipient)
    kem_context = enc + recipient.public_bytes(*_RAW)
    eae_prk = _extract(_KEM_SUITE, b"", b"eae_prk", dh)
    shared = _expand(_KEM_SUITE, eae_prk, b"shared_secret", kem_context, 32)
    context = (
        b"\x00"  # mode_base
        + _extract(_HPKE_SUITE, b"", b"psk_id_hash", b"")
        + _extract(_HPKE_SUITE, b"", b"info_hash", info)
    )
    secret = _extract(_HPKE_SUITE, shared, b"secret", b"")
    key = _expand(_HPKE_SUITE, secret, b"key", context, 32)
    nonce = _expand(_HPKE_SUITE, secret, b"base_nonce", context, 12)  # sequence number 0
    return enc + AESGCM(key).encrypt(nonce, plaintext, b"")


@dataclass(frozen=True)
class PayloadCase:
    description: str
    envelope: bytes  # the envelope's exact JSON bytes
    input_key: bytes  # what a good one unwraps to
    embassy: JsonObject  # the opening embassy: its master secret, measurement, workload, now
    expect: JsonObject


def _seed(label: str) -> bytes:
    return hashlib.sha256(b"embassy payload vector " + label.encode()).digest()


def payload_cases(
    master: bytes, measurement: bytes, launch_digest: bytes
) -> dict[str, PayloadCase]:
    """Good and hostile payloads for the embassy of ``master`` running ``launch_digest``."""
    keys = derive_keys(master)
    public = keys.public_json()
    now, expires = 1_800_000_000, 1_800_003_600
    other_measurement = hashlib.sha256(b"another embassy config").digest()
    other_launch = hashlib.sha256(b"another workload").digest()

    def embassy(m: bytes = measurement, w: bytes = launch_digest) -> JsonObject:
        return {
            "master": master.hex(),
            "measurement": m.hex(),
            "launch_digest": w.hex(),
            "now": now,
        }

    def make(
        label: str, m: bytes, w: bytes, reply_key: ReplyKey | None = None
    ) -> tuple[PayloadEnvelope, bytes]:
        input_key = _seed(f"{label} input key")
        unsigned = PayloadEnvelope(
            payload_id=_seed(f"{label} payload id")[:16],
            expires_unix=expires,
            embassy_keyid=public["signing"]["keyid"],
            measurement=m,
            launch_digest=w,
            suite="x25519",
            has_action_key=False,
            wrapped=b"",
            reply_key=reply_key,
        )
        ephemeral = X25519PrivateKey.from_private_bytes(_seed(f"{label} ephemeral"))
        wrapped = hpke_seal_x25519(
            keys.hpke_x25519.public_key(), info_for(unsigned), input_key, ephemeral
        )
        return dataclasses.replace(unsigned, wrapped=wrapped), input_key

    good, good_key = make("good", measurement, launch_digest)
    for_b, _ = make("for measurement B", other_measurement, launch_digest)
    for_other_workload, _ = make("for workload B", measurement, other_launch)
    v1 = {k: v for k, v in good.to_json().items() if k not in ("measurement", "launch_digest")}
    users_reply, hosts_reply = (
        ReplyKey(
            "x25519",
            X25519PrivateKey.from_private_bytes(_seed(f"{who} reply key"))
            .public_key()
            .public_bytes(*_RAW),
        )
        for who in ("user", "host")
    )
    with_reply, with_reply_key = make("with a reply key", measurement, launch_digest, users_reply)

    def refused(code: str, message: str) -> JsonObject:
        return {"error": code, "message": message}

    return {
        "good-payload": PayloadCase(
            "a payload (x25519) for this embassy's measurement and workload opens",
            good.to_bytes(),
            good_key,
            embassy(),
            {"ok": True},
        ),
        "bad-payload-wrong-measurement": PayloadCase(
            "a payload sealed for measurement A, offered to an embassy of measurement B "
            "(same keys: same TPM and boot, another code or config)",
            good.to_bytes(),
            good_key,
            embassy(m=other_measurement),
            refused("payload-wrong-measurement", f"payload.measurement is {measurement.hex()}"),
        ),
        "bad-payload-wrong-workload": PayloadCase(
            "a payload sealed for workload A, offered to the same embassy running workload B",
            good.to_bytes(),
            good_key,
            embassy(w=other_launch),
            refused("payload-wrong-workload", f"payload.launch_digest is {launch_digest.hex()}"),
        ),
        "bad-payload-measurement-altered": PayloadCase(
            "a payload sealed for measurement B whose measurement field was rewritten to this "
            "embassy's (A): HPKE's info binds it, so it does not unwrap",
            canonical_json({**for_b.to_json(), "measurement": measurement.hex()}),
            good_key,
            embassy(),
            refused("bad-payload", "does not unwrap"),
        ),
        "bad-payload-launch-digest-altered": PayloadCase(
            "a payload sealed for workload B whose launch_digest field was rewritten to this "
            "embassy's workload (A): it does not unwrap",
            canonical_json({**for_other_workload.to_json(), "launch_digest": launch_digest.hex()}),
            good_key,
            embassy(),
            refused("bad-payload", "does not unwrap"),
        ),
        "good-payload-reply-key": PayloadCase(
            "a payload carrying the user's reply key (for a job's result) opens",
            with_reply.to_bytes(),
            with_reply_key,
            embassy(),
            {"ok": True},
        ),
        "bad-payload-reply-key-swapped": PayloadCase(
            "the user's reply key swapped for the host's (to read the result): HPKE's info "
            "binds the reply key, so it does not unwrap",
            canonical_json({**with_reply.to_json(), "reply_key": hosts_reply.to_json()}),
            with_reply_key,
            embassy(),
            refused("bad-payload", "does not unwrap"),
        ),
        "bad-payload-version-1": PayloadCase(
            "a version-1 envelope (it bound neither measurement nor workload) is refused",
            canonical_json({**v1, "v": 1}),
            good_key,
            embassy(),
            refused("payload-unbound", "version 1 binds neither"),
        ),
    }
