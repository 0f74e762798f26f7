"""The payload envelope of docs/protocol.md §2: both suites, every refusal, strict parsing."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
from typing import Any

import pytest
from cryptography.hazmat.primitives import hpke

from embassy.daemon.keys import EmbassyKeys, derive_keys
from embassy.errors import (
    RequestError,
    UnboundPayloadError,
    WireFormatError,
    WrongMeasurementError,
    WrongWorkloadError,
)
from embassy.payload.envelope import (
    SUITES,
    BadPayloadError,
    HpkePrivateKey,
    PayloadEnvelope,
    PayloadExpiredError,
    UnsupportedSuiteError,
    WrongEmbassyError,
    embassy_keyid,
    hpke_public_keys,
    info_for,
    make_payload,
    open_payload,
    seal_input,
)
from workload_sdk.stream import decrypt_bytes

NOW = 1_800_000_000.5
SUITE_NAMES = ["x25519", "mlkem768-x25519"]


def _embassy(seed: int) -> tuple[EmbassyKeys, dict[str, Any], dict[str, HpkePrivateKey], str]:
    keys = derive_keys(bytes([seed]) * 32)
    public = keys.public_json()
    private: dict[str, HpkePrivateKey] = {
        "x25519": keys.hpke_x25519,
        "mlkem768-x25519": keys.hpke_hybrid,
    }
    return keys, public, private, public["signing"]["keyid"]


_, PUBLIC, PRIVATE, KEYID = _embassy(1)
_, OTHER_PUBLIC, OTHER_PRIVATE, OTHER_KEYID = _embassy(2)
# Measurement A and workload A: what this embassy is and runs; B: another.
MEASUREMENT, OTHER_MEASUREMENT = b"\xa1" * 32, b"\xb1" * 32
LAUNCH, OTHER_LAUNCH = b"\xa2" * 32, b"\xb2" * 32


def _make(keys: Any, **kw: Any) -> tuple[PayloadEnvelope, bytes, bytes | None]:
    """make_payload for measurement A, workload A unless told otherwise."""
    kw.setdefault("measurement", MEASUREMENT)
    kw.setdefault("launch_digest", LAUNCH)
    return make_payload(keys, **kw)


def _open(
    env: PayloadEnvelope,
    now: float = NOW,
    *,
    measurement: bytes = MEASUREMENT,
    launch_digest: bytes = LAUNCH,
    private_keys: Any = None,
    own_keyid: str = KEYID,
) -> tuple[bytes, bytes | None]:
    return open_payload(
        env,
        private_keys=PRIVATE if private_keys is None else private_keys,
        own_keyid=own_keyid,
        own_measurement=measurement,
        own_launch_digest=launch_digest,
        now=now,
    )


# --- round trips ---------------------------------------------------------------------


@pytest.mark.parametrize("suite", SUITE_NAMES)
@pytest.mark.parametrize("action_key", [False, True])
def test_round_trip(suite: str, action_key: bool) -> None:
    env, input_key, action = _make(PUBLIC, suite=suite, now=NOW, action_key=action_key)
    assert len(input_key) == 32
    assert (action is not None) == action_key == env.has_action_key
    assert env.suite == suite
    assert env.embassy_keyid == KEYID
    assert (env.measurement, env.launch_digest) == (MEASUREMENT, LAUNCH)
    assert env.expires_unix == int(NOW) + 3600
    assert len(env.payload_id) == 16
    assert _open(env) == (input_key, action)
    assert PayloadEnvelope.parse(env.to_bytes()) == env
    assert PayloadEnvelope.from_json(json.loads(env.to_bytes())) == env


def test_wrapped_sizes() -> None:
    x, _, _ = _make(PUBLIC, suite="x25519", now=NOW)
    h, _, _ = _make(PUBLIC, suite="mlkem768-x25519", now=NOW, action_key=True)
    assert len(x.wrapped) == hpke.KEM.X25519.enc_length() + 32 + 16
    assert len(h.wrapped) == hpke.KEM.MLKEM768_X25519.enc_length() + 64 + 16


def test_default_suite_is_hybrid_and_keys_are_fresh() -> None:
    a, ka, _ = _make(PUBLIC, now=NOW)
    b, kb, _ = _make(PUBLIC, now=NOW)
    assert a.suite == "mlkem768-x25519"
    assert a.payload_id != b.payload_id
    assert ka != kb


def test_given_payload_id_and_ttl() -> None:
    env, _, _ = _make(PUBLIC, now=NOW, ttl_seconds=60, payload_id=b"p" * 16)
    assert env.payload_id == b"p" * 16
    assert env.expires_unix == int(NOW) + 60


@pytest.mark.parametrize("ttl", [0, -1, True])
def test_bad_ttl(ttl: int) -> None:
    with pytest.raises(ValueError, match="ttl_seconds"):
        _make(PUBLIC, now=NOW, ttl_seconds=ttl)


def _env(has_action_key: bool, wrapped: bytes) -> PayloadEnvelope:
    return PayloadEnvelope(
        b"\x01" * 16, 1_800_000_000, "ab" * 32, b"\xcd" * 32, b"\xef" * 32, "x25519",
        has_action_key, wrapped,
    )  # fmt: skip


def test_to_json_is_the_wire_shape() -> None:
    assert _env(False, b"\xff\x00").to_bytes() == (
        b'{"embassy_keyid":"' + b"ab" * 32 + b'","expires_unix":1800000000,'
        b'"has_action_key":false,"launch_digest":"' + b"ef" * 32 + b'",'
        b'"measurement":"' + b"cd" * 32 + b'","payload_id":"' + b"01" * 16 + b'",'
        b'"suite":"x25519","v":2,"wrapped":"/wA="}'
    )


def test_info_binds_every_field_but_wrapped() -> None:
    env = _env(True, b"\xff")
    assert info_for(env) == (
        b'embassy-payload-v2\x00{"embassy_keyid":"' + b"ab" * 32 + b'",'
        b'"expires_unix":1800000000,"has_action_key":true,"launch_digest":"' + b"ef" * 32 + b'",'
        b'"measurement":"' + b"cd" * 32 + b'","payload_id":"' + b"01" * 16 + b'",'
        b'"suite":"x25519","v":2}'
    )
    assert info_for(dataclasses.replace(env, wrapped=b"other")) == info_for(env)


def test_seal_input_end_to_end() -> None:
    data = os.urandom(200_000)
    out = io.BytesIO()
    env, input_key = seal_input(
        PUBLIC,
        io.BytesIO(data),
        out,
        measurement=MEASUREMENT,
        launch_digest=LAUNCH,
        now=NOW,
        chunk_size=4096,
    )
    opened, action = _open(PayloadEnvelope.parse(env.to_bytes()))
    assert (opened, action) == (input_key, None)
    assert decrypt_bytes(opened, out.getvalue(), expected_payload_id=env.payload_id) == data


# --- refusals, in order --------------------------------------------------------------


@pytest.fixture(params=SUITE_NAMES)
def envelope(request: pytest.FixtureRequest) -> PayloadEnvelope:
    env, _, _ = _make(PUBLIC, suite=request.param, now=NOW, action_key=True)
    return env


def test_expired(envelope: PayloadEnvelope) -> None:
    with pytest.raises(PayloadExpiredError, match=r"expired at 1800003600 \(now 1800003600\)"):
        _open(envelope, now=envelope.expires_unix)
    _open(envelope, now=envelope.expires_unix - 0.001)


def test_tampered_expiry_later_does_not_unwrap(envelope: PayloadEnvelope) -> None:
    with pytest.raises(BadPayloadError, match="does not unwrap"):
        _open(dataclasses.replace(envelope, expires_unix=envelope.expires_unix + 1))


def test_tampered_expiry_earlier_is_expired_first(envelope: PayloadEnvelope) -> None:
    with pytest.raises(PayloadExpiredError):
        _open(dataclasses.replace(envelope, expires_unix=int(NOW) - 1))


def test_tampered_payload_id(envelope: PayloadEnvelope) -> None:
    with pytest.raises(BadPayloadError):
        _open(dataclasses.replace(envelope, payload_id=bytes(16)))


def test_tampered_has_action_key(envelope: PayloadEnvelope) -> None:
    with pytest.raises(BadPayloadError, match="does not unwrap"):
        _open(dataclasses.replace(envelope, has_action_key=False))


def test_tampered_suite(envelope: PayloadEnvelope) -> None:
    other = "x25519" if envelope.suite == "mlkem768-x25519" else "mlkem768-x25519"
    with pytest.raises(BadPayloadError):
        _open(dataclasses.replace(envelope, suite=other))


def test_tampered_wrapped(envelope: PayloadEnvelope) -> None:
    for i in (0, 40, len(envelope.wrapped) - 1):
        w = bytearray(envelope.wrapped)
        w[i] ^= 1
        with pytest.raises(BadPayloadError):
            _open(dataclasses.replace(envelope, wrapped=bytes(w)))
    with pytest.raises(BadPayloadError):
        _open(dataclasses.replace(envelope, wrapped=envelope.wrapped[:-1]))
    with pytest.raises(BadPayloadError):
        _open(dataclasses.replace(envelope, wrapped=b"\x00"))


def test_tampered_keyid_is_wrong_embassy_first(envelope: PayloadEnvelope) -> None:
    with pytest.raises(WrongEmbassyError, match=f"is for embassy {'00' * 32}"):
        _open(dataclasses.replace(envelope, embassy_keyid="00" * 32))


def test_other_embassys_payload() -> None:
    env, _, _ = _make(OTHER_PUBLIC, now=NOW)
    assert env.embassy_keyid == OTHER_KEYID
    with pytest.raises(WrongEmbassyError, match=f"this embassy is {KEYID}"):
        _open(env)
    # Expiry is checked before the keyid.
    with pytest.raises(PayloadExpiredError):
        _open(env, now=NOW + 7200)


@pytest.mark.parametrize("suite", SUITE_NAMES)
def test_wrapped_to_another_embassys_key_but_naming_this_one(suite: str) -> None:
    forged = {"signing": PUBLIC["signing"], "hpke": OTHER_PUBLIC["hpke"]}
    env, _, _ = _make(forged, suite=suite, now=NOW)
    assert env.embassy_keyid == KEYID
    with pytest.raises(BadPayloadError, match="wrapped to another key"):
        _open(env)
    # ... which the other embassy cannot use either: it names this one.
    with pytest.raises(WrongEmbassyError):
        _open(env, private_keys=OTHER_PRIVATE, own_keyid=OTHER_KEYID)


# --- bound to the embassy's measurement and workload ----------------------------------


def test_a_payload_for_measurement_a_is_refused_by_measurement_b(
    envelope: PayloadEnvelope,
) -> None:
    """The same keys (the same TPM and boot) restarted with another code or config."""
    with pytest.raises(WrongMeasurementError) as caught:
        _open(envelope, measurement=OTHER_MEASUREMENT)
    assert caught.value.code == "payload-wrong-measurement"
    assert f"payload.measurement is {MEASUREMENT.hex()}" in caught.value.message
    assert f"this embassy's measurement is {OTHER_MEASUREMENT.hex()}" in caught.value.message
    # Checked after the keyid and expiry, before the workload.
    with pytest.raises(WrongEmbassyError):
        _open(envelope, measurement=OTHER_MEASUREMENT, own_keyid=OTHER_KEYID)
    with pytest.raises(WrongMeasurementError):
        _open(envelope, measurement=OTHER_MEASUREMENT, launch_digest=OTHER_LAUNCH)


def test_a_payload_for_workload_a_is_refused_beside_workload_b(
    envelope: PayloadEnvelope,
) -> None:
    with pytest.raises(WrongWorkloadError) as caught:
        _open(envelope, launch_digest=OTHER_LAUNCH)
    assert caught.value.code == "payload-wrong-workload"
    assert f"payload.launch_digest is {LAUNCH.hex()}" in caught.value.message
    assert f"launch digest {OTHER_LAUNCH.hex()}" in caught.value.message


@pytest.mark.parametrize(
    ("field_name", "value"), [("measurement", OTHER_MEASUREMENT), ("launch_digest", OTHER_LAUNCH)]
)
def test_rewriting_a_bound_field_to_match_does_not_unwrap(
    envelope: PayloadEnvelope, field_name: str, value: bytes
) -> None:
    """The attacker's edit: make a payload for A claim B so that embassy B takes it."""
    forged = PayloadEnvelope.from_json({**envelope.to_json(), field_name: value.hex()})
    at_b = {field_name: value}
    with pytest.raises(BadPayloadError, match="does not unwrap"):
        _open(forged, **at_b)  # type: ignore[arg-type]
    # Unaltered, only A opens it.
    assert _open(envelope)[0]


def test_a_version_1_envelope_is_refused_as_unbound() -> None:
    good = _good()
    v1 = {k: v for k, v in good.items() if k not in ("measurement", "launch_digest")}
    for obj in ({**v1, "v": 1}, {**good, "v": 1}):
        with pytest.raises(UnboundPayloadError, match="version 1 binds neither") as caught:
            _parse(obj)
        assert caught.value.code == "payload-unbound"


@pytest.mark.parametrize("name", ["measurement", "launch_digest"])
@pytest.mark.parametrize("value", [b"", b"\x00" * 31, "ab" * 32])
def test_make_payload_needs_both_digests(name: str, value: Any) -> None:
    with pytest.raises(ValueError, match=name):
        _make(PUBLIC, now=NOW, **{name: value})


def test_unknown_suite(envelope: PayloadEnvelope) -> None:
    env = PayloadEnvelope.parse(
        envelope.to_bytes().replace(envelope.suite.encode(), b"mlkem1024-p384")
    )
    with pytest.raises(UnsupportedSuiteError, match="unsupported HPKE suite 'mlkem1024-p384'"):
        _open(env)
    # The keyid is checked first.
    with pytest.raises(WrongEmbassyError):
        _open(dataclasses.replace(env, embassy_keyid="00" * 32))


def test_suite_without_a_key_here(envelope: PayloadEnvelope) -> None:
    with pytest.raises(UnsupportedSuiteError, match="has no"):
        _open(envelope, private_keys={})


def test_mismatched_private_key_type_is_a_programming_error(envelope: PayloadEnvelope) -> None:
    swapped: dict[str, HpkePrivateKey] = {
        "x25519": PRIVATE["mlkem768-x25519"],
        "mlkem768-x25519": PRIVATE["x25519"],
    }
    with pytest.raises(TypeError):
        _open(envelope, private_keys=swapped)


@pytest.mark.parametrize("size", [0, 31, 33, 48, 64, 96])
def test_wrong_plaintext_length(size: int) -> None:
    unsigned = PayloadEnvelope(
        os.urandom(16), int(NOW) + 60, KEYID, MEASUREMENT, LAUNCH, "x25519", False, b""
    )
    public = hpke_public_keys(PUBLIC)["x25519"]
    wrapped = SUITES["x25519"].encrypt(bytes(size), public, info=info_for(unsigned))
    env = dataclasses.replace(unsigned, wrapped=wrapped)
    with pytest.raises(BadPayloadError, match=f"unwraps to {size} bytes, expected 32"):
        _open(env)


def test_make_payload_refusals() -> None:
    with pytest.raises(UnsupportedSuiteError, match="unsupported HPKE suite 'p256'"):
        _make(PUBLIC, suite="p256", now=NOW)
    only_x = {"signing": PUBLIC["signing"], "hpke": PUBLIC["hpke"][:1]}
    with pytest.raises(UnsupportedSuiteError, match="offers no 'mlkem768-x25519' HPKE key"):
        _make(only_x, now=NOW)
    with pytest.raises(ValueError, match="payload_id"):
        _make(PUBLIC, now=NOW, payload_id=b"short")


def test_error_codes_and_tree() -> None:
    codes = {
        PayloadExpiredError: "payload-expired",
        WrongEmbassyError: "wrong-embassy",
        UnsupportedSuiteError: "unsupported-suite",
        BadPayloadError: "bad-payload",
        WrongMeasurementError: "payload-wrong-measurement",
        WrongWorkloadError: "payload-wrong-workload",
        UnboundPayloadError: "payload-unbound",
    }
    for cls, code in codes.items():
        assert issubclass(cls, RequestError)
        assert cls.code == code
        assert cls("m").code == code


# --- the identity's keys -------------------------------------------------------------


def test_hpke_public_keys_from_identity_json() -> None:
    keys = hpke_public_keys(PUBLIC)
    assert set(keys) == {"x25519", "mlkem768-x25519"}
    assert isinstance(keys["mlkem768-x25519"], hpke.MLKEM768X25519PublicKey)
    assert embassy_keyid(PUBLIC) == KEYID


def test_hpke_public_keys_skips_unknown_suites() -> None:
    extra = {**PUBLIC, "hpke": [*PUBLIC["hpke"], {"suite": "future-kem", "blob": "AA=="}]}
    assert set(hpke_public_keys(extra)) == {"x25519", "mlkem768-x25519"}


def _with_hpke(entries: list[Any]) -> dict[str, Any]:
    return {**PUBLIC, "hpke": entries}


@pytest.mark.parametrize(
    ("keys", "match"),
    [
        ({"signing": PUBLIC["signing"]}, "missing field 'hpke'"),
        (_with_hpke([*PUBLIC["hpke"], PUBLIC["hpke"][0]]), "listed twice"),
        (_with_hpke(["x25519"]), r"hpke\[0\]: expected an object"),
        (_with_hpke([{"suite": "x25519", "x25519": "AAAA"}]), "expected 32 bytes, got 3"),
        (_with_hpke([{"suite": "x25519"}]), "missing field 'x25519'"),
        (
            _with_hpke([{**PUBLIC["hpke"][1], "mlkem768": PUBLIC["hpke"][0]["x25519"]}]),
            "expected 1184 bytes",
        ),
        (_with_hpke([{"suite": "x25519", "x25519": "not base64!"}]), "not valid base64"),
    ],
)
def test_bad_identity_hpke_keys(keys: dict[str, Any], match: str) -> None:
    with pytest.raises(WireFormatError, match=match):
        hpke_public_keys(keys)


def test_identity_keyid_must_match_its_public_key() -> None:
    bad = {**PUBLIC, "signing": {**PUBLIC["signing"], "keyid": OTHER_KEYID}}
    with pytest.raises(WireFormatError, match="not SHA-256 of the signing public key"):
        _make(bad, now=NOW)


# --- strict parsing ------------------------------------------------------------------


def _good() -> dict[str, Any]:
    env, _, _ = _make(PUBLIC, suite="x25519", now=NOW)
    return env.to_json()


def _parse(obj: dict[str, Any]) -> PayloadEnvelope:
    return PayloadEnvelope.parse(json.dumps(obj).encode())


def test_parse_accepts_non_canonical_key_order_and_spacing() -> None:
    good = _good()
    text = json.dumps(dict(reversed(list(good.items()))), indent=2).encode()
    assert PayloadEnvelope.parse(text).to_json() == good


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"extra": 1}, "unknown field"),
        ({"v": 3}, "unsupported version 3"),
        ({"v": 0}, "unsupported version 0"),
        ({"v": True}, "v: expected int, got bool"),
        ({"v": "1"}, "v: expected int, got str"),
        ({"expires_unix": True}, "expires_unix: expected int, got bool"),
        ({"expires_unix": 1.5}, "expires_unix: expected int, got float"),
        ({"expires_unix": -1}, "expires_unix: out of range"),
        ({"expires_unix": 2**63}, "expires_unix: out of range"),
        ({"has_action_key": 0}, "has_action_key: expected bool, got int"),
        ({"has_action_key": "false"}, "has_action_key: expected bool, got str"),
        ({"payload_id": "AB" * 16}, "payload_id: hex must be lower-case"),
        ({"payload_id": "ab" * 15}, "payload_id: expected 16 bytes, got 15"),
        ({"payload_id": 5}, "payload_id: expected str"),
        ({"embassy_keyid": "ab" * 20}, "embassy_keyid: expected 32 bytes"),
        ({"embassy_keyid": "xyz"}, "embassy_keyid: not valid hex"),
        ({"measurement": "ab" * 31}, "measurement: expected 32 bytes, got 31"),
        ({"measurement": "AB" * 32}, "measurement: hex must be lower-case"),
        ({"measurement": None}, "measurement: expected str"),
        ({"launch_digest": "ab" * 33}, "launch_digest: expected 32 bytes, got 33"),
        ({"launch_digest": "zz" * 32}, "launch_digest: not valid hex"),
        ({"suite": ""}, "suite: expected a short ASCII suite name"),
        ({"suite": "é"}, "suite: expected a short ASCII suite name"),
        ({"suite": 1}, "suite: expected str"),
        ({"wrapped": ""}, "wrapped: 0 bytes is out of range"),
        ({"wrapped": base64.b64encode(bytes(4097)).decode()}, "wrapped: 4097 bytes"),
        ({"wrapped": "AAA"}, "wrapped: not valid base64"),
        ({"wrapped": "AA AA"}, "wrapped: not valid base64"),
        ({"wrapped": "AAAA\n"}, "wrapped: not valid base64"),
        ({"wrapped": "_-__"}, "wrapped: not valid base64"),
    ],
)
def test_strict_fields(change: dict[str, Any], match: str) -> None:
    with pytest.raises(WireFormatError, match=match):
        _parse({**_good(), **change})


@pytest.mark.parametrize(
    "name",
    [
        "v",
        "payload_id",
        "expires_unix",
        "embassy_keyid",
        "measurement",
        "launch_digest",
        "suite",
        "has_action_key",
    ],
)
def test_missing_field(name: str) -> None:
    good = _good()
    del good[name]
    with pytest.raises(WireFormatError, match=f"missing field '{name}'"):
        _parse(good)


def test_non_canonical_base64() -> None:
    # "QR==" decodes to b"A" (the pad bits are not zero); only "QQ==" is canonical.
    assert base64.b64decode("QR==") == b"A"
    _parse({**_good(), "wrapped": "QQ=="})
    with pytest.raises(WireFormatError, match="wrapped: base64 is not in canonical form"):
        _parse({**_good(), "wrapped": "QR=="})


def test_duplicate_keys() -> None:
    text = json.dumps(_good())[:-1] + ', "v": 2}'
    with pytest.raises(WireFormatError, match="duplicate JSON key 'v'"):
        PayloadEnvelope.parse(text.encode())


@pytest.mark.parametrize("data", [b"[]", b"null", b'"x"', b"{", b"\xff"])
def test_not_an_object(data: bytes) -> None:
    with pytest.raises(WireFormatError):
        PayloadEnvelope.parse(data)


def test_from_json_refuses_non_objects() -> None:
    with pytest.raises(WireFormatError, match="payload: expected a JSON object"):
        PayloadEnvelope.from_json([1], "payload")
