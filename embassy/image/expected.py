"""``expected.json``: what a verifier pins about a boot image, versioned canonical JSON.

Version 1::

    {"measurement": <the embassy measurement document (embassy.measure)> | null,
     "pcrs": {"11": "<hex>", "12": "<hex>", "4": "<hex>"},
     "phases": ["enter-initrd", "leave-initrd", "sysinit", "ready"],
     "secure_boot": false,
     "uki": {"authenticode_sha256": "<hex>", "sha256": "<hex>", "stub_version": 257 | null},
     "v": 1}

``pcrs`` are SHA-256 bank values predicted by :mod:`embassy.image.uki` for the UKI whose
file SHA-256 and Authenticode SHA-256 are given, booted directly by UEFI firmware with
Secure Boot as ``secure_boot`` says, after systemd measured ``phases`` into PCR 11. The
document is produced canonical (sorted keys, no whitespace) and read strictly: unknown or
missing fields, wrong digest sizes, another version, or a measurement whose digest does not
match its components are refused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from embassy.errors import ImageFormatError, WireFormatError
from embassy.image.pe import authenticode_digest
from embassy.image.uki import DEFAULT_PHASES, PREDICTED_PCRS, check_phases, predict_boot_pcrs
from embassy.measure import Measurement, measurement_from_json
from embassy.wire.codec import (
    JsonObject,
    canonical_json,
    field,
    hex_decode,
    only_fields,
    parse_json_object,
)

EXPECTED_VERSION = 1
_WHAT = "expected"
_DIGEST_SIZE = 32


@dataclass(frozen=True, slots=True)
class ExpectedImage:
    uki_sha256: bytes
    uki_authenticode: bytes
    stub_version: int | None
    phases: tuple[str, ...]
    pcrs: Mapping[int, bytes]
    measurement: Measurement | None
    secure_boot: bool = False

    def __post_init__(self) -> None:
        # Refuse at construction what could not be encoded and read back as the same value.
        for name, digest in (
            ("uki_sha256", self.uki_sha256),
            ("uki_authenticode", self.uki_authenticode),
        ):
            if len(digest) != _DIGEST_SIZE:
                raise ValueError(f"{name} must be {_DIGEST_SIZE} bytes, got {len(digest)}")
        if set(self.pcrs) != set(PREDICTED_PCRS):
            raise ValueError(
                f"pcrs must be exactly {list(PREDICTED_PCRS)}, got {sorted(self.pcrs)}"
            )
        if any(len(v) != _DIGEST_SIZE for v in self.pcrs.values()):
            raise ValueError(f"every PCR value must be {_DIGEST_SIZE} bytes")
        if self.stub_version is not None and self.stub_version < 0:
            raise ValueError("stub_version must not be negative")
        object.__setattr__(self, "phases", check_phases(self.phases))
        object.__setattr__(self, "pcrs", MappingProxyType(dict(self.pcrs)))

    def to_json(self) -> JsonObject:
        return {
            "v": EXPECTED_VERSION,
            "uki": {
                "sha256": self.uki_sha256.hex(),
                "authenticode_sha256": self.uki_authenticode.hex(),
                "stub_version": self.stub_version,
            },
            "phases": list(self.phases),
            "secure_boot": self.secure_boot,
            "pcrs": {str(pcr): self.pcrs[pcr].hex() for pcr in PREDICTED_PCRS},
            "measurement": None if self.measurement is None else self.measurement.to_json(),
        }

    def encode(self) -> bytes:
        return canonical_json(self.to_json())


def expected_image(
    uki: bytes,
    measurement: Measurement | None,
    phases: Sequence[str] = DEFAULT_PHASES,
    *,
    secure_boot: bool = False,
) -> ExpectedImage:
    """Predict the boot PCRs of ``uki`` and pin them with its digests and ``measurement``."""
    prediction = predict_boot_pcrs(uki, phases=phases, secure_boot=secure_boot)
    return ExpectedImage(
        uki_sha256=hashlib.sha256(uki).digest(),
        uki_authenticode=authenticode_digest(uki),
        stub_version=prediction.stub_version,
        phases=prediction.phases,
        pcrs=prediction.pcrs,
        measurement=measurement,
        secure_boot=secure_boot,
    )


def parse_expected(data: bytes) -> ExpectedImage:
    return expected_from_json(parse_json_object(data, _WHAT))


def expected_from_json(obj: JsonObject) -> ExpectedImage:
    only_fields(obj, {"v", "uki", "phases", "secure_boot", "pcrs", "measurement"}, _WHAT)
    version = field(obj, "v", int, _WHAT)
    if version != EXPECTED_VERSION:
        raise WireFormatError(
            f"{_WHAT}: unsupported version {version} (expected {EXPECTED_VERSION})"
        )

    uki = field(obj, "uki", dict, _WHAT)
    only_fields(uki, {"sha256", "authenticode_sha256", "stub_version"}, f"{_WHAT}.uki")
    if "stub_version" not in uki:
        raise WireFormatError(f"{_WHAT}.uki: missing field 'stub_version'")
    stub = uki["stub_version"]
    if stub is not None:
        stub = field(uki, "stub_version", int, f"{_WHAT}.uki")
        if stub < 0:
            raise WireFormatError(f"{_WHAT}.uki.stub_version: negative ({stub})")

    phases = field(obj, "phases", list, _WHAT)
    if not all(isinstance(p, str) for p in phases):
        raise WireFormatError(f"{_WHAT}.phases: expected a list of strings")
    try:
        words = check_phases(phases)
    except ImageFormatError as exc:
        raise WireFormatError(f"{_WHAT}.{exc.message}") from None

    pcrs_obj = field(obj, "pcrs", dict, _WHAT)
    wanted = {str(pcr) for pcr in PREDICTED_PCRS}
    if set(pcrs_obj) != wanted:
        raise WireFormatError(
            f"{_WHAT}.pcrs: expected exactly the keys {sorted(wanted)}, got {sorted(pcrs_obj)}"
        )
    pcrs = {
        pcr: hex_decode(pcrs_obj[str(pcr)], f"{_WHAT}.pcrs.{pcr}", size=_DIGEST_SIZE)
        for pcr in PREDICTED_PCRS
    }

    if "measurement" not in obj:
        raise WireFormatError(f"{_WHAT}: missing field 'measurement'")
    measurement = None
    if obj["measurement"] is not None:
        measurement = measurement_from_json(field(obj, "measurement", dict, _WHAT))

    return ExpectedImage(
        uki_sha256=hex_decode(
            field(uki, "sha256", str, f"{_WHAT}.uki"), f"{_WHAT}.uki.sha256", size=_DIGEST_SIZE
        ),
        uki_authenticode=hex_decode(
            field(uki, "authenticode_sha256", str, f"{_WHAT}.uki"),
            f"{_WHAT}.uki.authenticode_sha256",
            size=_DIGEST_SIZE,
        ),
        stub_version=stub,
        phases=words,
        pcrs=pcrs,
        measurement=measurement,
        secure_boot=field(obj, "secure_boot", bool, _WHAT),
    )
