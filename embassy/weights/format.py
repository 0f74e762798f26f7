"""The encrypted model file, the embassy's view (docs/protocol.md, "Encrypted model files").

Pure: the format's definitions and its strict parser are :mod:`workload_sdk.weights` (the
workload's loader must not import ``embassy``, so the one parser lives there). This module
turns its :class:`~workload_sdk.weights.WeightsError` into the embassy's error tree, builds
the header the owner writes, and reads the public header of a file without the key.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from embassy.errors import (
    ConfigError,
    WeightsChunkTamperedError,
    WeightsFileError,
    WeightsHeaderTamperedError,
    WeightsTruncatedError,
    WeightsWrongKeyError,
    WeightsWrongModelError,
)
from workload_sdk import weights as sdk
from workload_sdk.weights import CIPHER, Header, Keys, TensorTable

__all__ = [
    "CIPHER",
    "Header",
    "Keys",
    "TensorTable",
    "build_header",
    "embassy_error",
    "inspect",
    "parse_header",
]

_ERRORS: dict[str, type[WeightsFileError]] = {
    cls.code: cls
    for cls in (
        WeightsFileError,
        WeightsTruncatedError,
        WeightsWrongModelError,
        WeightsWrongKeyError,
        WeightsHeaderTamperedError,
        WeightsChunkTamperedError,
    )
}

T = TypeVar("T")


def embassy_error(exc: sdk.WeightsError) -> WeightsFileError:
    """The embassy's error for the SDK's (same code, same message)."""
    return _ERRORS.get(exc.code, WeightsFileError)(exc.message)


def _translated(call: Callable[[], T]) -> T:
    try:
        return call()
    except sdk.WeightsError as exc:
        raise embassy_error(exc) from None


def parse_header(raw: bytes) -> Header:
    """Parse ``bytes[0:16+H]`` of a file strictly (unauthenticated: that needs the key)."""
    return _translated(lambda: sdk.parse_header(raw))


def build_header(
    *,
    model_id: str,
    key_id: str,
    chunk_size: int,
    salt: bytes,
    keys: Keys,
    table: TensorTable,
    encrypted_table_size: int | None,
) -> dict[str, Any]:
    """The header object (``encrypted_table_size``: the table is hidden, in a chunk that
    long). Checked by parsing it back, so the writer cannot emit what the reader refuses."""
    header: dict[str, Any] = {
        "chunk_size": chunk_size,
        "cipher": CIPHER,
        "key_commitment": keys.commitment.hex(),
        "key_id": key_id,
        "model_id": model_id,
        "salt": salt.hex(),
        "table": table.to_json()
        if encrypted_table_size is None
        else {"encrypted_size": encrypted_table_size},
    }
    try:
        parse_header(sdk.encode_prefix_and_header(header))
    except WeightsFileError as exc:
        raise ConfigError(exc.message) from None
    return header


def inspect(path: Path) -> dict[str, Any]:
    """The public header of an encrypted model file and its size: no key needed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        header = _translated(lambda: sdk.read_header(fd))
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    out = header.public_json()
    out["file_size"] = size
    if header.table is not None:
        expected = sdk.file_size(header, header.table)
        if size != expected:
            cls = WeightsTruncatedError if size < expected else WeightsFileError
            raise cls(f"the file has {size} bytes, its header describes {expected}")
    return out
