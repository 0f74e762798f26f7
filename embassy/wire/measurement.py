"""The embassy measurement document: the wire format, defined once (version 1). Pure.

Canonical JSON::

    {"code":"<hex>","config":"<hex>","measurement":"<hex>","policy":"<hex>","v":1}

``code`` hashes the installed ``embassy`` package, ``config`` the effective config without
the policy, ``policy`` the authorities; ``measurement`` is SHA-256 of the canonical JSON of
the other three and ``v``. How the components are computed from a source tree and a config
is :mod:`embassy.measure` (which reads files and the config); this module only parses and
encodes the document, so the verifier needs neither.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from embassy.errors import WireFormatError
from embassy.wire.codec import (
    JsonObject,
    canonical_json,
    field,
    hex_decode,
    only_fields,
    parse_json_object,
)

MEASUREMENT_VERSION = 1


@dataclass(frozen=True, slots=True)
class Measurement:
    code: bytes
    config: bytes
    policy: bytes

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(
            canonical_json(
                {
                    "v": MEASUREMENT_VERSION,
                    "code": self.code.hex(),
                    "config": self.config.hex(),
                    "policy": self.policy.hex(),
                }
            )
        ).digest()

    def to_json(self) -> JsonObject:
        return {
            "v": MEASUREMENT_VERSION,
            "code": self.code.hex(),
            "config": self.config.hex(),
            "policy": self.policy.hex(),
            "measurement": self.digest.hex(),
        }

    def encode(self) -> bytes:
        return canonical_json(self.to_json())


def parse_measurement(data: bytes) -> Measurement:
    return measurement_from_json(parse_json_object(data, "measurement"))


def measurement_from_json(obj: JsonObject) -> Measurement:
    only_fields(obj, {"v", "code", "config", "policy", "measurement"}, "measurement")
    if field(obj, "v", int, "measurement") != MEASUREMENT_VERSION:
        raise WireFormatError("measurement: unsupported version")
    m = Measurement(
        code=hex_decode(field(obj, "code", str, "measurement"), "measurement.code", size=32),
        config=hex_decode(field(obj, "config", str, "measurement"), "measurement.config", size=32),
        policy=hex_decode(field(obj, "policy", str, "measurement"), "measurement.policy", size=32),
    )
    claimed = hex_decode(field(obj, "measurement", str, "measurement"), "measurement", size=32)
    if claimed != m.digest:
        raise WireFormatError("measurement: digest does not match its components")
    return m
