"""A strict, dependency-free reader for the .safetensors format, returning numpy arrays.

The workload container has numpy but not the ``safetensors`` package, and the format is
simple enough to read directly: an unsigned 64-bit little-endian header length N, N bytes
of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``,
then the data buffer, which the offsets index relative to its start.

The file is memory-mapped and each tensor is a read-only ``np.frombuffer`` view into the
map, so loading copies nothing (BF16, which numpy lacks, is the exception: it is widened
to float32). The weights come from a package the host installs; a malformed or hostile
file must fail loudly at load, never yield a tensor that aliases another or reads past
the end. So the reader checks, as the format's specification requires, that every entry
is well formed, that its byte length matches its dtype and shape, and that the entries
tile the data buffer exactly: in bounds, no overlap, no holes.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

# The reference implementation refuses headers above 100 MB; so does this one, before
# reading them.
MAX_HEADER_BYTES = 100_000_000

# Explicitly little-endian: the format stores every dtype little-endian.
_DTYPES: dict[str, np.dtype[Any]] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # raw bits; widened to float32 on load
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}


@dataclass(frozen=True)
class TensorInfo:
    """One header entry; ``begin``/``end`` are offsets into the data buffer."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int  # absolute file offset of the data buffer


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"safetensors: duplicate key {key!r} in header")
        out[key] = value
    return out


def _is_int(v: object) -> bool:
    # JSON true/false decode to bool, a subclass of int: not a size.
    return isinstance(v, int) and not isinstance(v, bool)


def _entry(name: str, raw: object, data_len: int) -> TensorInfo:
    where = f"safetensors: tensor {name!r}"
    if not isinstance(raw, dict) or set(raw) != {"dtype", "shape", "data_offsets"}:
        raise ValueError(f"{where}: entry must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = raw["dtype"], raw["shape"], raw["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise ValueError(f"{where}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise ValueError(f"{where}: shape must be a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) and o >= 0 for o in offsets)
    ):
        raise ValueError(f"{where}: data_offsets must be two non-negative integers")
    begin, end = offsets
    if begin > end:
        raise ValueError(f"{where}: data_offsets [{begin}, {end}] are reversed")
    if end > data_len:
        raise ValueError(
            f"{where}: data_offsets [{begin}, {end}] out of bounds "
            f"(data buffer is {data_len} bytes)"
        )
    expected = math.prod(shape) * _DTYPES[dtype].itemsize
    if end - begin != expected:
        raise ValueError(
            f"{where}: {end - begin} bytes, but {dtype} {shape} needs {expected} bytes"
        )
    return TensorInfo(name, dtype, tuple(shape), begin, end)


def parse_header(head: bytes, file_size: int) -> Header:
    """Validate the first bytes of a file of ``file_size`` bytes; ``head`` holds at least
    the length prefix and the whole header (extra bytes are ignored)."""
    if file_size < 8 or len(head) < 8:
        raise ValueError(f"safetensors: file of {file_size} bytes has no header length")
    (n,) = struct.unpack("<Q", head[:8])
    if n > MAX_HEADER_BYTES:
        raise ValueError(f"safetensors: header length {n} exceeds {MAX_HEADER_BYTES}")
    if 8 + n > file_size:
        raise ValueError(f"safetensors: header length {n} exceeds the file ({file_size} bytes)")
    if len(head) < 8 + n:
        raise ValueError("safetensors: header bytes not supplied")
    try:
        doc = json.loads(head[8 : 8 + n].decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"safetensors: header is not UTF-8 JSON: {exc}") from exc
    if not isinstance(doc, dict):
        # A bad file, not a caller's type error: ValueError like every other defect.
        raise ValueError("safetensors: header is not a JSON object")  # noqa: TRY004
    metadata = doc.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise ValueError("safetensors: __metadata__ must map strings to strings")
    data_len = file_size - 8 - n
    tensors = {name: _entry(name, raw, data_len) for name, raw in doc.items()}
    # The entries must tile the buffer: sorted by offset, each starts where the last ended.
    cursor = 0
    for t in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if t.begin < cursor:
            raise ValueError(f"safetensors: tensor {t.name!r} overlaps the previous tensor")
        if t.begin > cursor:
            raise ValueError(f"safetensors: unindexed bytes [{cursor}, {t.begin}) in data")
        cursor = t.end
    if cursor != data_len:
        raise ValueError(
            f"safetensors: unindexed bytes [{cursor}, {data_len}) at the end of the data"
        )
    return Header(tensors, metadata, 8 + n)


def _array(buf: mmap.mmap, header: Header, info: TensorInfo) -> npt.NDArray[Any]:
    dtype = _DTYPES[info.dtype]
    count = (info.end - info.begin) // dtype.itemsize
    if count == 0:
        flat: npt.NDArray[Any] = np.zeros(0, dtype=dtype)
    else:
        flat = np.frombuffer(buf, dtype=dtype, count=count, offset=header.data_start + info.begin)
    if info.dtype == "BF16":
        # bfloat16 is the top half of a float32: shift the bits into place.
        flat = (flat.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return flat.reshape(info.shape)


def load(path: Path | str) -> tuple[dict[str, npt.NDArray[Any]], dict[str, str]]:
    """Read every tensor of ``path`` as a read-only array (a view of a memory map), and the
    header's ``__metadata__``. Raises ValueError on a malformed file."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        f.seek(0)
        prefix = f.read(8)
        if len(prefix) == 8:
            (n,) = struct.unpack("<Q", prefix)
            # Read the header only once its length is known to be sane.
            if n <= MAX_HEADER_BYTES and 8 + n <= size:
                prefix += f.read(n)
        header = parse_header(prefix, size)  # so the file has at least 8 bytes to map
        # The map outlives the file object: each array holds a reference to it.
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    tensors = {name: _array(buf, header, info) for name, info in header.tensors.items()}
    return tensors, header.metadata
