"""The broker's decision log format and its verifier, from the side of someone editing the
log: each kind of tampering is refused with its own reason."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from embassy.broker.decision_log import (
    GENESIS_PREV,
    SIGNATURE_PREFIX,
    LoggedDecision,
    encode_entry,
    entry_digest,
    next_entry,
    parse_entry,
    verify_decision_log,
)
from embassy.errors import DecisionLogError, WireFormatError
from embassy.wire.codec import canonical_json
from tests.unit.broker.decision_log_vectors import DIR, decision_log_vectors, load

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
PUBLIC = KEY.public_key()


def decision(i: int = 0, **changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "decision_id": f"d-{i}",
        "time_unix": 1_780_000_000 + i,
        "decision": "allow",
        "reason": None,
        "model_id": "minilm",
        "key_id": "k1",
        "tenant": "acme",
        "operation": "decrypt-for-load",
        "request_sha256": hashlib.sha256(b"req%d" % i).hexdigest(),
        "embassy_keyid": "ab" * 32,
        "policy_sha256": "cd" * 32,
        "input_sha256": "ef" * 32,
    }
    base.update(changes)
    return base


def denial(i: int = 0, reason: str = "unknown-model") -> dict[str, Any]:
    return decision(
        i,
        decision="deny",
        reason=reason,
        embassy_keyid=None,
        policy_sha256=None,
        input_sha256=None,
    )


def build(n: int, key: Ed25519PrivateKey = KEY) -> list[LoggedDecision]:
    log: list[LoggedDecision] = []
    for i in range(n):
        d = decision(i) if i % 2 == 0 else denial(i)
        log.append(next_entry(log[-1] if log else None, d, key.sign))
    return log


def signed(entry: bytes, seq: int, key: Ed25519PrivateKey = KEY) -> LoggedDecision:
    """An entry the broker's key really signed (what a fork or a bug would produce)."""
    return LoggedDecision(
        seq=seq,
        entry=entry,
        signature=key.sign(SIGNATURE_PREFIX + entry),
        digest=entry_digest(entry),
    )


def reason_of(entries: list[LoggedDecision], **kw: Any) -> str:
    with pytest.raises(DecisionLogError) as info:
        verify_decision_log(entries, PUBLIC, **kw)
    assert info.value.code == "decision-log"
    return info.value.reason


# -- the format ---------------------------------------------------------------------------------


def test_the_entry_is_canonical_json_chained_from_zeros() -> None:
    first = next_entry(None, decision(0), KEY.sign)
    assert first.seq == 1
    assert first.entry == (
        b'{"decision":{"decision":"allow","decision_id":"d-0","embassy_keyid":"'
        + b"ab" * 32
        + b'","input_sha256":"'
        + b"ef" * 32
        + b'","key_id":"k1","model_id":"minilm","operation":"decrypt-for-load",'
        b'"policy_sha256":"'
        + b"cd" * 32
        + b'","reason":null,"request_sha256":"'
        + hashlib.sha256(b"req0").hexdigest().encode()
        + b'","tenant":"acme","time_unix":1780000000},"prev":"'
        + b"0" * 64
        + b'","seq":1,"v":1}'
    )
    assert first.digest == hashlib.sha256(first.entry).digest()
    PUBLIC.verify(first.signature, b"embassy-broker-decision-v1\0" + first.entry)
    second = next_entry(first, denial(1), KEY.sign)
    assert second.seq == 2
    assert parse_entry(second.entry).prev == first.digest
    assert parse_entry(first.entry).prev == GENESIS_PREV


def test_the_signer_gets_the_prefixed_entry_bytes() -> None:
    seen: list[bytes] = []

    def sign(data: bytes) -> bytes:
        seen.append(data)
        return KEY.sign(data)

    logged = next_entry(None, decision(), sign)
    assert seen == [SIGNATURE_PREFIX + logged.entry]


def test_a_signer_returning_junk_is_refused() -> None:
    with pytest.raises(WireFormatError, match="signature"):
        next_entry(None, decision(), lambda _data: b"short")


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"reason": "x"}, "reason"),  # an allow has no reason
        ({"decision": "maybe"}, "decision"),
        ({"time_unix": -1}, "time_unix"),
        ({"time_unix": True}, "time_unix"),
        ({"decision_id": ""}, "decision_id"),
        ({"decision_id": "a b"}, "decision_id"),
        ({"request_sha256": "AB" * 32}, "request_sha256"),
        ({"request_sha256": "ab" * 31}, "request_sha256"),
        ({"policy_sha256": None}, "policy_sha256"),  # an allow names its policy
        ({"embassy_keyid": None}, "embassy_keyid"),
        ({"model_id": None}, "model_id"),
        ({"tenant": "a\nb"}, "tenant"),
        ({"key_id": "x" * 257}, "key_id"),
        ({"extra": 1}, "extra"),
    ],
)
def test_a_bad_decision_is_refused_naming_the_field(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(WireFormatError, match=field):
        encode_entry(1, GENESIS_PREV, decision(**changes))


def test_a_denial_needs_a_reason_and_may_lack_what_the_request_never_named() -> None:
    with pytest.raises(WireFormatError, match="reason"):
        encode_entry(1, GENESIS_PREV, denial(reason=None))  # type: ignore[arg-type]
    with pytest.raises(WireFormatError, match="reason"):
        encode_entry(1, GENESIS_PREV, denial(reason="Not Kebab"))
    anonymous = denial(reason="malformed-request") | {
        "model_id": None,
        "key_id": None,
        "tenant": None,
        "operation": None,
    }
    assert parse_entry(encode_entry(1, GENESIS_PREV, anonymous)).decision == anonymous


def test_a_missing_field_is_named() -> None:
    d = decision()
    del d["input_sha256"]
    with pytest.raises(WireFormatError, match="input_sha256"):
        encode_entry(1, GENESIS_PREV, d)


def _entry_obj() -> dict[str, Any]:
    return {"v": 1, "seq": 1, "prev": "00" * 32, "decision": decision()}


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (json.dumps(_entry_obj()).encode(), "canonical"),  # spaces
        (canonical_json(_entry_obj() | {"v": 2}), "version"),
        (canonical_json(_entry_obj() | {"seq": 0}), "seq"),
        (canonical_json(_entry_obj() | {"prev": "00" * 31}), "prev"),
        (canonical_json(_entry_obj() | {"more": 1}), "more"),
        (canonical_json(_entry_obj() | {"decision": decision(reason="x")}), "reason"),
        (b'{"v":1,"v":1}', "duplicate"),
        (b'{"decision":{},"prev":"","seq":1.0,"v":1}', "float"),
        (b"[1]", "object"),
        (b"\xff", "UTF-8"),
        (b" " * 20000, "bytes"),
    ],
)
def test_parse_entry_is_strict(data: bytes, match: str) -> None:
    with pytest.raises(WireFormatError, match=match):
        parse_entry(data)


# -- verification -------------------------------------------------------------------------------


def test_a_whole_log_verifies_and_so_does_its_tail_after_a_checkpoint() -> None:
    log = build(6)
    verify_decision_log(log, PUBLIC)
    verify_decision_log(log[3:], PUBLIC, after=log[2])
    verify_decision_log([], PUBLIC)
    verify_decision_log([], PUBLIC, after=log[5])


def test_a_removed_entry_is_a_gap() -> None:
    log = build(5)
    assert reason_of(log[:2] + log[3:]) == "gap"
    assert reason_of(log[1:]) == "gap"  # the first is missing
    assert reason_of(log[4:], after=log[2]) == "gap"


def test_swapped_entries_are_a_reorder() -> None:
    log = build(4)
    assert reason_of([log[0], log[2], log[1], log[3]]) == "reorder"
    assert reason_of(log[1:2], after=log[2]) == "reorder"


def test_an_entry_shown_twice_is_a_duplicate() -> None:
    log = build(3)
    assert reason_of([*log, log[2]]) == "duplicate"


def test_two_signed_entries_for_one_seq_are_a_fork() -> None:
    log = build(3)
    other = next_entry(log[0], denial(99, "stale-evidence"), KEY.sign)  # another seq 2
    assert other.seq == 2
    assert reason_of([*log, other]) == "fork"
    assert reason_of([other, log[2]], after=log[1]) == "fork"


def test_a_branch_continued_from_the_other_side_of_a_fork_breaks_the_chain() -> None:
    log = build(2)
    other2 = next_entry(log[0], denial(99), KEY.sign)
    their3 = next_entry(other2, denial(100), KEY.sign)
    assert reason_of([log[0], log[1], their3]) == "chain"
    # A checkpointed head that the continuation does not build on: the same.
    assert reason_of([their3], after=log[1]) == "chain"


def test_a_changed_entry_is_caught_by_its_digest_or_its_signature() -> None:
    log = build(3)
    changed = log[1].entry.replace(b'"reason":"unknown-model"', b'"reason":"unknown-modes"')
    assert changed != log[1].entry
    # The bytes changed, the stored digest did not.
    assert reason_of([log[0], dataclasses.replace(log[1], entry=changed), log[2]]) == "changed"
    # The digest recomputed as well: the signature no longer covers the bytes.
    edited = dataclasses.replace(log[1], entry=changed, digest=entry_digest(changed))
    assert reason_of([log[0], edited, log[2]]) == "signature"


def test_an_entry_signed_by_another_key_is_refused() -> None:
    assert reason_of(build(2, OTHER)) == "signature"
    log = build(2)
    resigned = dataclasses.replace(log[1], signature=OTHER.sign(SIGNATURE_PREFIX + log[1].entry))
    assert reason_of([log[0], resigned]) == "signature"
    # Signed without the prefix (a signature meant for something else).
    bare = dataclasses.replace(log[1], signature=KEY.sign(log[1].entry))
    assert reason_of([log[0], bare]) == "signature"


def test_an_entry_moved_to_another_seq_is_refused() -> None:
    log = build(3)
    moved = dataclasses.replace(log[2], seq=2)
    assert reason_of([log[0], moved]) == "changed"


def test_a_signed_but_malformed_entry_is_refused() -> None:
    bad = canonical_json({"v": 1, "seq": 1, "prev": "00" * 32, "decision": {"x": 1}})
    assert reason_of([signed(bad, 1)]) == "malformed"
    spaced = json.dumps(_entry_obj()).encode()
    assert reason_of([signed(spaced, 1)]) == "malformed"


def test_a_first_entry_not_chained_to_zeros_is_refused() -> None:
    entry = encode_entry(1, b"\x01" * 32, decision())
    assert reason_of([signed(entry, 1)]) == "chain"


def test_a_forged_checkpoint_is_refused() -> None:
    log = build(3)
    forged = dataclasses.replace(log[1], signature=OTHER.sign(SIGNATURE_PREFIX + log[1].entry))
    assert reason_of(log[2:], after=forged) == "signature"


# -- the pinned vectors (tests/vectors/decision-log/) ---------------------------------------------

VECTOR_DIR = Path(__file__).resolve().parents[2] / "vectors" / DIR
EXPECTED = json.loads((VECTOR_DIR / "expected.json").read_text())


def test_every_vector_file_has_a_verdict() -> None:
    names = {p.stem for p in VECTOR_DIR.glob("*.json")} - {"expected"}
    assert names == set(EXPECTED)
    assert any(v.get("ok") for v in EXPECTED.values())
    assert len({v.get("reason") for v in EXPECTED.values()} - {None}) >= 8


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_pinned_vector(name: str) -> None:
    public_raw, after, entries = load((VECTOR_DIR / f"{name}.json").read_bytes())
    public = Ed25519PublicKey.from_public_bytes(public_raw)
    verdict = EXPECTED[name]
    if verdict.get("ok"):
        verify_decision_log(entries, public, after=after)
        return
    with pytest.raises(DecisionLogError) as info:
        verify_decision_log(entries, public, after=after)
    assert info.value.code == verdict["error"]
    assert info.value.reason == verdict["reason"]
    assert verdict["message_contains"] in info.value.message


def test_the_pinned_vectors_are_current() -> None:
    for path, data in decision_log_vectors().items():
        assert (VECTOR_DIR.parent / path).read_bytes() == data, (
            f"{path} is stale: run .venv/bin/python scripts/gen_vectors.py"
        )
