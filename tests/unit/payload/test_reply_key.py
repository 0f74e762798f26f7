"""The payload's optional reply key (docs/protocol.md §2b): strict, optional, bound by HPKE."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from embassy.daemon.keys import derive_keys
from embassy.errors import BadPayloadError, UnsupportedSuiteError, WireFormatError
from embassy.jobs.result import ReplyPrivateKey
from embassy.payload.envelope import PayloadEnvelope, ReplyKey, make_payload, open_payload
from embassy.wire.codec import canonical_json

NOW = 1_800_000_000
SUITE_NAMES = ["x25519", "mlkem768-x25519"]
KEYS = derive_keys(b"\x01" * 32)
PUBLIC = KEYS.public_json()
PRIVATE: dict[str, Any] = {"x25519": KEYS.hpke_x25519, "mlkem768-x25519": KEYS.hpke_hybrid}
MEASUREMENT, LAUNCH = b"\xa1" * 32, b"\xa2" * 32
USER = {s: ReplyPrivateKey.generate(s) for s in SUITE_NAMES}
OTHER_USER = ReplyPrivateKey.generate("x25519")


def _make(reply_key: ReplyKey | None, suite: str = "x25519") -> PayloadEnvelope:
    env, _, _ = make_payload(
        PUBLIC,
        measurement=MEASUREMENT,
        launch_digest=LAUNCH,
        suite=suite,
        now=NOW,
        reply_key=reply_key,
    )
    return env


def _open(env: PayloadEnvelope) -> bytes:
    key, _ = open_payload(
        env,
        private_keys=PRIVATE,
        own_keyid=PUBLIC["signing"]["keyid"],
        own_measurement=MEASUREMENT,
        own_launch_digest=LAUNCH,
        now=NOW,
    )
    return key


@pytest.mark.parametrize("reply_suite", SUITE_NAMES)
@pytest.mark.parametrize("suite", SUITE_NAMES)
def test_reply_key_round_trips_through_the_envelope_and_opens(suite: str, reply_suite: str) -> None:
    reply = USER[reply_suite].public
    env = _make(reply, suite)
    parsed = PayloadEnvelope.parse(env.to_bytes())
    assert parsed == env
    assert parsed.reply_key == reply
    assert len(_open(parsed)) == 32
    assert json.loads(env.to_bytes())["reply_key"] == reply.to_json()


def test_without_reply_key_the_envelope_has_no_such_field() -> None:
    env = _make(None)
    assert "reply_key" not in json.loads(env.to_bytes())
    assert PayloadEnvelope.parse(env.to_bytes()).reply_key is None
    _open(env)


def _rewrite(env: PayloadEnvelope, **fields: Any) -> PayloadEnvelope:
    return PayloadEnvelope.parse(canonical_json({**env.to_json(), **fields}))


def test_a_reply_key_swapped_for_the_hosts_own_does_not_unwrap() -> None:
    """The attacker (the host relaying the payload) puts its own reply key in, to read the
    result: the HPKE info binds the user's, so the embassy refuses the payload."""
    env = _make(USER["x25519"].public)
    swapped = _rewrite(env, reply_key=OTHER_USER.public.to_json())
    with pytest.raises(BadPayloadError, match="does not unwrap"):
        _open(swapped)


def test_a_reply_key_added_to_a_payload_sealed_without_one_does_not_unwrap() -> None:
    env = _make(None)
    with pytest.raises(BadPayloadError):
        _open(_rewrite(env, reply_key=OTHER_USER.public.to_json()))


def test_a_reply_key_removed_does_not_unwrap() -> None:
    env = _make(USER["x25519"].public)
    stripped = {k: v for k, v in env.to_json().items() if k != "reply_key"}
    with pytest.raises(BadPayloadError):
        _open(PayloadEnvelope.parse(canonical_json(stripped)))


def _b64(n: int) -> str:
    return base64.b64encode(b"\x07" * n).decode()


@pytest.mark.parametrize(
    ("reply_key", "error", "message"),
    [
        (None, WireFormatError, "reply_key: expected a JSON object"),
        ("x", WireFormatError, "reply_key: expected a JSON object"),
        ({"x25519": _b64(32)}, WireFormatError, "missing field 'suite'"),
        ({"suite": "x25519"}, WireFormatError, "missing field 'x25519'"),
        ({"suite": "x25519", "x25519": _b64(31)}, WireFormatError, "expected 32 bytes"),
        ({"suite": "x25519", "x25519": _b64(32), "kem": "x"}, WireFormatError, "'kem'"),
        (
            {"suite": "x25519", "x25519": _b64(32), "mlkem768": _b64(1184)},
            WireFormatError,
            "'mlkem768'",
        ),
        ({"suite": "mlkem768-x25519", "x25519": _b64(32)}, WireFormatError, "'mlkem768'"),
        (
            {"suite": "mlkem768-x25519", "x25519": _b64(32), "mlkem768": _b64(1183)},
            WireFormatError,
            "expected 1184 bytes",
        ),
        (
            {"suite": "mlkem768-x25519", "x25519": _b64(32), "mlkem768": "AAA="},
            WireFormatError,
            "mlkem768",
        ),
        ({"suite": "p256", "x25519": _b64(32)}, UnsupportedSuiteError, "reply_key.suite"),
        ({"suite": "x25519", "x25519": _b64(32)[:-1] + "x"}, WireFormatError, "x25519"),
    ],
)
def test_a_malformed_reply_key_is_refused_naming_the_field(
    reply_key: object, error: type[Exception], message: str
) -> None:
    env = _make(USER["x25519"].public)
    with pytest.raises(error, match=message):
        _rewrite(env, reply_key=reply_key)


def test_an_invalid_mlkem_public_key_is_refused() -> None:
    # ML-KEM-768 encodes coefficients mod 3329 in 12 bits: all-ones bytes are out of range.
    bad = {
        "suite": "mlkem768-x25519",
        "x25519": _b64(32),
        "mlkem768": base64.b64encode(b"\xff" * 1184).decode(),
    }
    with pytest.raises(WireFormatError, match="not a valid ML-KEM-768 key"):
        ReplyKey.from_json(bad)


def test_reply_keyid_names_the_key_and_its_suite() -> None:
    a, b = USER["x25519"].public, USER["mlkem768-x25519"].public
    assert a.keyid() != b.keyid()
    assert len(bytes.fromhex(a.keyid())) == 32
    assert ReplyKey.parse(canonical_json(a.to_json())) == a


@pytest.mark.parametrize("suite", SUITE_NAMES)
@pytest.mark.parametrize("point", [bytes(32), b"\x01" + bytes(31)])
def test_a_small_order_x25519_reply_key_is_refused_when_parsed(suite: str, point: bytes) -> None:
    """Every shared secret with it is zero: HPKE to it fails, and would only once the job
    has started; refused where the payload is read instead."""
    reply = USER[suite].public.to_json()
    reply["x25519"] = base64.b64encode(point).decode()
    with pytest.raises(WireFormatError, match=r"reply_key\.x25519: a small-order point"):
        _rewrite(_make(USER[suite].public), reply_key=reply)
