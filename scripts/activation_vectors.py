#!/usr/bin/env python3
"""Deterministic activation files, good and hostile, for the pinned vectors.

:func:`activation_vectors` returns ``{name: (file bytes, expected error code or None)}``.
Each is checked with ``parse_activation(data, max_bytes=VECTOR_MAX_BYTES)``: ``None`` means
it parses, a code is the ``code`` of the ``ActivationError`` it must raise. A hostile file is
a good one with exactly one thing wrong; after an edit the checksum is recomputed (except in
``checksum*``), so each file tests the one check its name says and not the checksum.

Pure and deterministic: a fixed session, data from ``np.arange``, no clock, no randomness.
``scripts/gen_vectors.py`` pins them under ``tests/vectors/activations/``.

    python scripts/activation_vectors.py    # list the vectors and check each against the parser
"""

from __future__ import annotations

import hashlib
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from embassy.errors import (  # noqa: E402
    ActivationCorruptError,
    ActivationOversizedError,
    ActivationTruncatedError,
)
from workload_sdk.activations import (  # noqa: E402
    CHECKSUM_LEN,
    CHECKSUM_OFFSET,
    FIXED_HEADER_LEN,
    encode_activation,
)

# The limit every vector is parsed with.
VECTOR_MAX_BYTES = 4096
SESSION = bytes.fromhex("5e55104e5e55104e5e55104e5e55104e")
NAME = "model.layers.3/mlp:out"  # 22 bytes: header_len 192, 58 bytes of padding

CORRUPT = ActivationCorruptError.code
TRUNCATED = ActivationTruncatedError.code
OVERSIZED = ActivationOversizedError.code

# Offsets of the fixed header (workload_sdk/activations.py draws the table).
_VERSION, _DTYPE, _NDIM, _NAME_LEN, _RES14, _HEADER_LEN, _RES20 = 8, 10, 11, 12, 14, 16, 20
_SEQ, _SHAPE = 40, 48


def _array(dtype: str, shape: tuple[int, ...]) -> npt.NDArray[np.floating[Any]]:
    count = int(np.prod(shape))
    return (np.arange(count, dtype="<f8") / 8 - 3).astype(dtype).reshape(shape)


def _good(dtype: str = "<f4", shape: tuple[int, ...] = (3, 5), seq: int = 7) -> bytes:
    return encode_activation(SESSION, seq, NAME, _array(dtype, shape))


def _reseal(data: bytearray | bytes) -> bytes:
    """``data`` with its checksum recomputed, so only the intended defect remains."""
    buf = bytearray(data)
    buf[CHECKSUM_OFFSET : CHECKSUM_OFFSET + CHECKSUM_LEN] = bytes(CHECKSUM_LEN)
    buf[CHECKSUM_OFFSET : CHECKSUM_OFFSET + CHECKSUM_LEN] = hashlib.sha256(buf).digest()
    return bytes(buf)


def _edit(data: bytes, offset: int, fmt: str, value: int, *, reseal: bool = True) -> bytes:
    buf = bytearray(data)
    struct.pack_into(fmt, buf, offset, value)
    return _reseal(buf) if reseal else bytes(buf)


def _put(data: bytes, offset: int, raw: bytes) -> bytes:
    buf = bytearray(data)
    buf[offset : offset + len(raw)] = raw
    return _reseal(buf)


def _data_offset(data: bytes) -> int:
    (header_len,) = struct.unpack_from("<I", data, _HEADER_LEN)
    return int(header_len)


def _with_value(value: float, dtype: str = "<f4") -> bytes:
    array = _array(dtype, (2, 3))
    array[1, 2] = value
    return encode_activation(SESSION, 7, NAME, array)


def activation_vectors() -> dict[str, tuple[bytes, str | None]]:
    """Every vector: name -> (file bytes, expected error code, None if it parses)."""
    good = _good()
    start = _data_offset(good)
    vectors: dict[str, tuple[bytes, str | None]] = {
        "good-f32-1d": (_good("<f4", (17,)), None),
        "good-f32-2d": (good, None),
        "good-f16-3d": (_good("<f2", (2, 3, 4)), None),
        "good-f64-4d": (_good("<f8", (2, 1, 3, 2)), None),
        "good-seq-0": (_good(seq=0), None),
        "good-seq-max": (_good(seq=2**64 - 1), None),
        "good-name-1": (encode_activation(SESSION, 0, "x", _array("<f4", (4,))), None),
        "good-name-128": (encode_activation(SESSION, 0, "a" * 128, _array("<f4", (4,))), None),
        "good-at-limit": (
            encode_activation(SESSION, 0, "x", _array("<f4", ((VECTOR_MAX_BYTES - 128) // 4,))),
            None,
        ),
        "empty": (b"", TRUNCATED),
        "bad-magic": (_put(good, 0, b"\x89EMBACX"), CORRUPT),
        "bad-magic-short": (b"PK\x03\x04", CORRUPT),
        "truncated-magic": (good[:5], TRUNCATED),
        "truncated-header": (good[:50], TRUNCATED),
        "truncated-name": (good[: FIXED_HEADER_LEN + 4], TRUNCATED),
        "truncated-data": (good[:-1], TRUNCATED),
        "trailing-bytes": (good + b"\0", CORRUPT),
        "bad-version": (_edit(good, _VERSION, "<H", 2), CORRUPT),
        "bad-dtype": (_edit(good, _DTYPE, "<B", 4), CORRUPT),
        "bad-dtype-0": (_edit(good, _DTYPE, "<B", 0), CORRUPT),
        "bad-ndim-0": (_edit(good, _NDIM, "<B", 0), CORRUPT),
        "bad-ndim-5": (_edit(good, _NDIM, "<B", 5), CORRUPT),
        "bad-name-len-0": (_edit(good, _NAME_LEN, "<H", 0), CORRUPT),
        "bad-name-len-129": (_edit(good, _NAME_LEN, "<H", 129), CORRUPT),
        "nonzero-reserved-14": (_edit(good, _RES14, "<H", 1), CORRUPT),
        "nonzero-reserved-20": (_edit(good, _RES20, "<I", 1), CORRUPT),
        "bad-header-len": (_edit(good, _HEADER_LEN, "<I", 256), CORRUPT),
        "bad-header-len-unaligned": (
            _edit(good, _HEADER_LEN, "<I", FIXED_HEADER_LEN + 22),
            CORRUPT,
        ),
        "zero-dim": (_edit(good, _SHAPE + 8, "<Q", 0), CORRUPT),
        "unused-shape-slot": (_edit(good, _SHAPE + 16, "<Q", 1), CORRUPT),
        "shape-mismatch": (_edit(good, _SHAPE, "<Q", 2), CORRUPT),  # 2x5 header, 3x5 data
        "bad-name": (_put(good, FIXED_HEADER_LEN, b"model layers"), CORRUPT),
        "bad-name-non-ascii": (_put(good, FIXED_HEADER_LEN, "mödel".encode()), CORRUPT),
        "bad-name-nul": (_put(good, FIXED_HEADER_LEN + 3, b"\0"), CORRUPT),
        "nonzero-padding": (_put(good, start - 1, b"\x01"), CORRUPT),
        "checksum": (_flip(good, len(good) - 1), CORRUPT),
        "checksum-first-data-byte": (_flip(good, start), CORRUPT),
        "checksum-seq": (_edit(good, _SEQ, "<Q", 8, reseal=False), CORRUPT),
        "checksum-zeroed": (_put_raw(good, CHECKSUM_OFFSET, bytes(CHECKSUM_LEN)), CORRUPT),
        "nan": (_with_value(float("nan")), CORRUPT),
        "inf": (_with_value(float("inf")), CORRUPT),
        "neg-inf-f16": (_with_value(float("-inf"), "<f2"), CORRUPT),
        "nan-f64": (_with_value(float("nan"), "<f8"), CORRUPT),
        "oversized": (
            encode_activation(SESSION, 0, "x", _array("<f4", ((VECTOR_MAX_BYTES - 128) // 4 + 1,))),
            OVERSIZED,
        ),
        # A 48-byte-data header that claims 2**40 x 2**40 elements: refused from the header,
        # before the (short) data is looked at.
        "oversized-claim": (_oversized_claim(good), OVERSIZED),
    }
    return vectors


def _flip(data: bytes, offset: int) -> bytes:
    """One bit flipped at ``offset``, checksum left as it was."""
    buf = bytearray(data)
    buf[offset] ^= 0x01
    return bytes(buf)


def _put_raw(data: bytes, offset: int, raw: bytes) -> bytes:
    buf = bytearray(data)
    buf[offset : offset + len(raw)] = raw
    return bytes(buf)


def _oversized_claim(good: bytes) -> bytes:
    buf = bytearray(good)
    struct.pack_into("<QQ", buf, _SHAPE, 2**40, 2**40)
    return _reseal(buf)


def main() -> int:
    from embassy.errors import ActivationError
    from embassy.metering.activation import parse_activation

    failed = 0
    for name, (data, code) in activation_vectors().items():
        try:
            parse_activation(data, max_bytes=VECTOR_MAX_BYTES)
            got, message = None, "ok"
        except ActivationError as exc:
            got, message = exc.code, exc.message
        mark = "ok  " if got == code else "FAIL"
        failed += got != code
        print(f"{mark} {name:28} {len(data):5} B  {message}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
