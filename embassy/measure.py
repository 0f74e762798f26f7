"""The embassy's reproducible measurement: its code, its effective config, its policy.

Wire format (version 1, canonical JSON)::

    {"code":"<hex>","config":"<hex>","measurement":"<hex>","policy":"<hex>","v":1}

``code`` hashes every file of the installed ``embassy`` package (relative POSIX path and
SHA-256 of its bytes, sorted; byte-code caches excluded), so the same source tree gives the
same value on any machine. ``config`` hashes the effective config without the policy;
``policy`` hashes the authorities. ``measurement`` hashes the three. The daemon extends the
SHA-256 of this document into its PCR at every start, and records the document itself.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import embassy
from embassy.config import Config
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
_SKIP_DIRS = {"__pycache__"}
_SKIP_SUFFIXES = {".pyc", ".pyo"}


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


def code_digest(files: Iterable[tuple[str, bytes]]) -> bytes:
    """Pure: digest of (relative path, content) pairs, order-independent."""
    listing = sorted((path, hashlib.sha256(content).hexdigest()) for path, content in files)
    return hashlib.sha256(canonical_json({"files": [list(p) for p in listing]})).digest()


def package_files(root: Path) -> list[tuple[str, bytes]]:
    out = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if not path.is_file() or _SKIP_DIRS & set(rel.parts) or path.suffix in _SKIP_SUFFIXES:
            continue
        out.append((rel.as_posix(), path.read_bytes()))
    return out


def measure_config(effective: Mapping[str, Any]) -> tuple[bytes, bytes]:
    """Pure: (config digest, policy digest) of an effective config."""
    config = {k: v for k, v in effective.items() if k != "authorities"}
    policy = {"authorities": effective.get("authorities", [])}
    return (
        hashlib.sha256(canonical_json(config)).digest(),
        hashlib.sha256(canonical_json(policy)).digest(),
    )


def measure(config: Config, package_root: Path | None = None) -> Measurement:
    root = package_root or Path(embassy.__file__).resolve().parent
    config_digest, policy_digest = measure_config(config.effective())
    return Measurement(code_digest(package_files(root)), config_digest, policy_digest)
