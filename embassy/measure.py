"""The embassy's reproducible measurement: computed from its code and its effective config.

The document's wire format (version 1) and its parser are :mod:`embassy.wire.measurement`
(pure, what the verifier imports); they are re-exported here. ``code`` hashes every file of
the installed ``embassy`` package (relative POSIX path and SHA-256 of its bytes, sorted;
byte-code caches excluded), so the same source tree gives the same value on any machine.
``config`` hashes the effective config without the policy; ``policy`` hashes the
authorities. ``measurement`` hashes the three. The daemon extends the SHA-256 of this
document into its PCR at every start, and records the document itself.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import embassy
from embassy.wire.codec import canonical_json
from embassy.wire.measurement import (
    MEASUREMENT_VERSION,
    Measurement,
    measurement_from_json,
    parse_measurement,
)

if TYPE_CHECKING:
    from embassy.config import Config

__all__ = [
    "MEASUREMENT_VERSION",
    "Measurement",
    "code_digest",
    "measure",
    "measure_config",
    "measurement_from_json",
    "package_files",
    "parse_measurement",
]

_SKIP_DIRS = {"__pycache__"}
_SKIP_SUFFIXES = {".pyc", ".pyo"}


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
