"""``expected.json``: canonical out, strict in, and what it pins."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import pytest

from embassy.errors import WireFormatError
from embassy.image import ExpectedImage, expected_image, parse_expected, predict_boot_pcrs
from embassy.image.pe import authenticode_digest
from embassy.measure import Measurement
from embassy.wire.codec import canonical_json
from tests.unit.image.builder import build_uki, standard_sections

MEASUREMENT = Measurement(code=bytes(32), config=bytes([1]) * 32, policy=bytes([2]) * 32)
UKI = build_uki("257.6", standard_sections())


def test_expected_image_pins_the_prediction_and_the_file() -> None:
    expected = expected_image(UKI, MEASUREMENT)
    prediction = predict_boot_pcrs(UKI)
    assert expected.uki_sha256 == hashlib.sha256(UKI).digest()
    assert expected.uki_authenticode == authenticode_digest(UKI)
    assert expected.stub_version == 257
    assert dict(expected.pcrs) == dict(prediction.pcrs)
    assert expected.phases == ("enter-initrd", "leave-initrd", "sysinit", "ready")
    assert expected.measurement == MEASUREMENT
    assert not expected.secure_boot
    fewer = expected_image(UKI, None, phases=["enter-initrd"], secure_boot=True)
    assert fewer.phases == ("enter-initrd",)
    assert fewer.pcrs[11] == predict_boot_pcrs(UKI, phases=["enter-initrd"]).pcrs[11]
    assert fewer.pcrs[4] == predict_boot_pcrs(UKI, secure_boot=True).pcrs[4] != expected.pcrs[4]


def test_encode_is_canonical_and_round_trips() -> None:
    for measurement in (MEASUREMENT, None):
        expected = expected_image(UKI, measurement)
        data = expected.encode()
        obj = json.loads(data)
        assert canonical_json(obj) == data
        assert obj["v"] == 1
        assert set(obj["pcrs"]) == {"4", "11", "12"}
        assert obj["uki"]["stub_version"] == 257
        assert obj["secure_boot"] is False
        assert obj["measurement"] == (None if measurement is None else measurement.to_json())
        parsed = parse_expected(data)
        assert parsed == expected
        assert parsed.encode() == data


def mutated(change: Callable[[dict[str, Any]], None]) -> bytes:
    obj = json.loads(expected_image(UKI, MEASUREMENT).encode())
    change(obj)
    return json.dumps(obj).encode()


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(obj: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for key in parents:
            obj = obj[key]
        obj[last] = value

    return change


def _drop(path: str) -> Callable[[dict[str, Any]], None]:
    def change(obj: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for key in parents:
            obj = obj[key]
        del obj[last]

    return change


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_set("v", 2), "expected: unsupported version 2"),
        (_set("v", True), "expected.v: expected int, got bool"),
        (_drop("v"), "expected: missing field 'v'"),
        (_set("extra", 1), "expected: unknown field(s) 'extra'"),
        (_set("uki.extra", 1), "expected.uki: unknown field(s) 'extra'"),
        (_drop("uki.stub_version"), "expected.uki: missing field 'stub_version'"),
        (_set("uki.stub_version", "257"), "expected.uki.stub_version: expected int, got str"),
        (_set("uki.stub_version", -1), "expected.uki.stub_version: negative"),
        (_set("uki.sha256", "ab" * 31), "expected.uki.sha256: expected 32 bytes, got 31"),
        (_set("uki.sha256", "AB" * 32), "expected.uki.sha256: hex must be lower-case"),
        (_set("uki.authenticode_sha256", 7), "expected.uki.authenticode_sha256: expected str"),
        (_set("pcrs.4", "00" * 33), "expected.pcrs.4: expected 32 bytes, got 33"),
        (_set("pcrs.7", "00" * 32), "expected.pcrs: expected exactly the keys"),
        (_drop("pcrs.12"), "expected.pcrs: expected exactly the keys"),
        (_set("pcrs", []), "expected.pcrs: expected dict, got list"),
        (_set("phases", "ready"), "expected.phases: expected list, got str"),
        (_set("phases", ["ready", 1]), "expected.phases: expected a list of strings"),
        (_set("phases", ["not a word"]), "expected.phases: 'not a word' is not a boot phase word"),
        (_set("secure_boot", 0), "expected.secure_boot: expected bool, got int"),
        (_drop("measurement"), "expected: missing field 'measurement'"),
        (_set("measurement", "abc"), "expected.measurement: expected dict, got str"),
        (
            _set("measurement.code", "11" * 32),
            "measurement: digest does not match its components",
        ),
        (_set("measurement.extra", 1), "measurement: unknown field(s) 'extra'"),
    ],
)
def test_parse_is_strict(change: Callable[[dict[str, Any]], None], message: str) -> None:
    with pytest.raises(WireFormatError) as caught:
        parse_expected(mutated(change))
    assert message in caught.value.message


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"[]", "expected: expected a JSON object, got list"),
        (b'{"v":1,"v":1}', "duplicate JSON key 'v'"),
        (b"\xff", "expected: not UTF-8"),
        (b'{"v":NaN}', "JSON constant NaN is not allowed"),
    ],
)
def test_parse_refuses_malformed_json(data: bytes, message: str) -> None:
    with pytest.raises(WireFormatError, match=message):
        parse_expected(data)


def test_construction_refuses_what_could_not_round_trip() -> None:
    good: dict[str, Any] = {
        "uki_sha256": bytes(32),
        "uki_authenticode": bytes(32),
        "stub_version": 257,
        "phases": ("ready",),
        "pcrs": {4: bytes(32), 11: bytes(32), 12: bytes(32)},
        "measurement": None,
    }
    assert ExpectedImage(**good).pcrs[4] == bytes(32)
    for key, value, message in [
        ("uki_sha256", bytes(31), "uki_sha256 must be 32 bytes"),
        ("pcrs", {4: bytes(32), 11: bytes(32)}, "pcrs must be exactly"),
        ("pcrs", {4: bytes(32), 11: bytes(32), 12: bytes(20)}, "every PCR value"),
        ("stub_version", -3, "must not be negative"),
    ]:
        with pytest.raises(ValueError, match=message):
            ExpectedImage(**{**good, key: value})
    with pytest.raises(WireFormatError, match="not a boot phase word"):
        ExpectedImage(**{**good, "phases": ("two words",)})
    pinned = ExpectedImage(**good)
    with pytest.raises(TypeError):
        pinned.pcrs[4] = bytes(32)  # type: ignore[index]
