"""The broker decision logs pinned under tests/vectors/decision-log/ (``scripts/gen_vectors.py``).

A short log signed with a fixed test key (Ed25519 signatures are deterministic, so the files
are stable), and hostile variants of it: each way of editing a log. Every file is a JSON
object ``{"broker_public_key": hex, "after": <entry>|null, "entries": [<entry>...]}``, an
entry being ``{"seq", "entry": b64, "signature": b64, "digest": hex}``, the columns a store
holds. ``expected.json`` pins each file's verdict: ``{"ok": true}`` or the error code, the
``reason`` and a part of the message. ``tests/unit/broker/test_decision_log.py`` runs every
file through :func:`embassy.broker.decision_log.verify_decision_log`.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from embassy.broker.decision_log import (
    SIGNATURE_PREFIX,
    LoggedDecision,
    encode_entry,
    entry_digest,
    next_entry,
)
from embassy.wire.codec import canonical_json

DIR = "decision-log"
# Test keys: public, never use them for anything else.
KEY = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"embassy vectors: broker").digest())
OTHER_KEY = Ed25519PrivateKey.from_private_bytes(
    hashlib.sha256(b"embassy vectors: another broker").digest()
)
T0 = 1_780_000_000


def _decision(i: int, allow: bool) -> dict[str, Any]:
    return {
        "decision_id": f"vectors-decision-{i}",
        "time_unix": T0 + 10 * i,
        "decision": "allow" if allow else "deny",
        "reason": None if allow else ["measurement-mismatch", "unknown-model", "replayed"][i % 3],
        "model_id": "vectors/tiny-model@1",
        "key_id": "vectors-key-1",
        "tenant": "acme",
        "operation": "decrypt-for-load",
        "request_sha256": hashlib.sha256(b"vectors request %d" % i).hexdigest(),
        "embassy_keyid": hashlib.sha256(b"vectors embassy").hexdigest() if allow else None,
        "policy_sha256": hashlib.sha256(b"vectors policy").hexdigest() if allow else None,
        "input_sha256": hashlib.sha256(b"vectors input %d" % i).hexdigest() if allow else None,
    }


def good_log(n: int = 5, key: Ed25519PrivateKey = KEY) -> list[LoggedDecision]:
    log: list[LoggedDecision] = []
    for i in range(n):
        log.append(next_entry(log[-1] if log else None, _decision(i, i % 2 == 0), key.sign))
    return log


def _signed(entry: bytes, seq: int) -> LoggedDecision:
    return LoggedDecision(
        seq=seq,
        entry=entry,
        signature=KEY.sign(SIGNATURE_PREFIX + entry),
        digest=entry_digest(entry),
    )


def _entry_json(item: LoggedDecision) -> dict[str, Any]:
    return {
        "seq": item.seq,
        "entry": base64.b64encode(item.entry).decode(),
        "signature": base64.b64encode(item.signature).decode(),
        "digest": item.digest.hex(),
    }


def _doc(entries: list[LoggedDecision], after: LoggedDecision | None = None) -> bytes:
    public = KEY.public_key().public_bytes_raw().hex()
    obj = {
        "broker_public_key": public,
        "after": _entry_json(after) if after is not None else None,
        "entries": [_entry_json(e) for e in entries],
    }
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def load(data: bytes) -> tuple[bytes, LoggedDecision | None, list[LoggedDecision]]:
    """A vector file: the broker's raw public key, the checkpoint, the entries."""
    obj = json.loads(data)

    def entry(e: dict[str, Any]) -> LoggedDecision:
        return LoggedDecision(
            seq=e["seq"],
            entry=base64.b64decode(e["entry"]),
            signature=base64.b64decode(e["signature"]),
            digest=bytes.fromhex(e["digest"]),
        )

    after = entry(obj["after"]) if obj["after"] is not None else None
    return bytes.fromhex(obj["broker_public_key"]), after, [entry(e) for e in obj["entries"]]


def _cases() -> dict[str, tuple[str, bytes, dict[str, Any]]]:
    log = good_log()
    fork2 = next_entry(log[0], _decision(90, False), KEY.sign)
    fork3 = next_entry(fork2, _decision(91, False), KEY.sign)
    edited = log[2].entry.replace(b'"tenant":"acme"', b'"tenant":"evil"')
    noncanonical = json.dumps(json.loads(log[0].entry)).encode()
    off_genesis = encode_entry(1, b"\x01" * 32, _decision(0, True))

    def bad(reason: str, contains: str) -> dict[str, Any]:
        return {"error": "decision-log", "reason": reason, "message_contains": contains}

    ok = {"ok": True}
    return {
        "good-log": ("five decisions, allows and denials, from seq 1", _doc(log), ok),
        "good-tail": ("entries 4 and 5 after a checkpoint at 3", _doc(log[3:], log[2]), ok),
        "bad-gap": (
            "entry 3 removed",
            _doc(log[:2] + log[3:]),
            bad("gap", "seq 4 where seq 3"),
        ),
        "bad-missing-first": ("entry 1 removed", _doc(log[1:]), bad("gap", "seq 2 where seq 1")),
        "bad-reorder": (
            "entries 2 and 3 swapped",
            _doc([log[0], log[2], log[1], *log[3:]]),
            bad("reorder", "seq 2 comes after seq 3"),
        ),
        "bad-duplicate": ("entry 5 shown twice", _doc([*log, log[4]]), bad("duplicate", "seq 5")),
        "bad-fork": (
            "two signed entries for seq 2",
            _doc([*log[:3], fork2]),
            bad("fork", "seq 2"),
        ),
        "bad-fork-after-checkpoint": (
            "the checkpointed seq 2 and another signed seq 2",
            _doc([fork2, fork3], log[1]),
            bad("fork", "seq 2"),
        ),
        "bad-chain": (
            "seq 3 from the other side of a fork, after the first side's seq 2",
            _doc([log[0], log[1], fork3]),
            bad("chain", "seq 3: prev"),
        ),
        "bad-changed-digest-kept": (
            "entry 3's bytes edited, the stored digest left as it was",
            _doc([*log[:2], dataclasses.replace(log[2], entry=edited), *log[3:]]),
            bad("changed", "seq 3: digest"),
        ),
        "bad-changed-resigned-elsewhere": (
            "entry 3's bytes edited and its digest recomputed",
            _doc(
                [
                    *log[:2],
                    dataclasses.replace(log[2], entry=edited, digest=entry_digest(edited)),
                    *log[3:],
                ]
            ),
            bad("signature", "seq 3: signature"),
        ),
        "bad-other-key": (
            "a log signed by another broker's key",
            _doc(good_log(2, OTHER_KEY)),
            bad("signature", "seq 1: signature"),
        ),
        "bad-moved": (
            "entry 3 stored as seq 2",
            _doc([log[0], dataclasses.replace(log[2], seq=2)]),
            bad("changed", "says 3"),
        ),
        "bad-noncanonical": (
            "a signed entry that is not canonical JSON",
            _doc([_signed(noncanonical, 1)]),
            bad("malformed", "canonical"),
        ),
        "bad-unknown-field": (
            "a signed entry with a field the format does not have",
            _doc(
                [
                    _signed(
                        canonical_json(json.loads(log[0].entry) | {"note": "x"}),
                        1,
                    )
                ]
            ),
            bad("malformed", "note"),
        ),
        "bad-genesis": (
            "a first entry whose prev is not 64 zeros",
            _doc([_signed(off_genesis, 1)]),
            bad("chain", "seq 1: prev"),
        ),
    }


def decision_log_vectors() -> dict[str, bytes]:
    """Every file under ``decision-log/``, by path relative to the vector directory."""
    out: dict[str, bytes] = {}
    expected: dict[str, Any] = {}
    for name, (description, data, verdict) in _cases().items():
        out[f"{DIR}/{name}.json"] = data
        expected[name] = {"description": description, **verdict}
    out[f"{DIR}/expected.json"] = (json.dumps(expected, indent=2, sort_keys=True) + "\n").encode()
    return out
