"""``embassy weights encrypt``: a safetensors file in, an encrypted model file out.

Streaming: the safetensors file is read and the encrypted file written one chunk at a time,
so memory is O(chunk_size) whatever the model's size. The safetensors file is read strictly
here (no ``safetensors`` package at run time): an 8-byte little-endian header length (at
most 100 MB, as safetensors itself allows), a JSON header with no duplicate keys and no
floats, ``__metadata__`` mapping strings to strings, every tensor with a known dtype, a
shape of integers and ``data_offsets`` that tile the data exactly (contiguous from 0, each
``end - begin`` its shape's size), and no byte after the last tensor.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from embassy.daemon.atomic import fsync_dir, write_all
from embassy.errors import ConfigError, StorageError, WireFormatError
from embassy.weights.format import build_header
from workload_sdk import weights as sdk
from workload_sdk.weights import DEFAULT_CHUNK_SIZE, TensorInfo, TensorTable

MAX_SAFETENSORS_HEADER = 100_000_000
_TENSOR_FIELDS = frozenset({"dtype", "shape", "data_offsets"})


def _bad(message: str) -> WireFormatError:
    return WireFormatError(f"safetensors: {message}")


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _bad(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_float(text: str) -> Any:
    raise _bad(f"a number that is not an integer ({text})")


def _uint(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _bad(f"{what}: not a non-negative integer: {value!r}")
    return value


def _tensor(name: str, spec: Any) -> tuple[int, int, TensorInfo]:
    if not isinstance(spec, dict) or set(spec) != _TENSOR_FIELDS:
        raise _bad(f"{name!r}: needs exactly {sorted(_TENSOR_FIELDS)}")
    if spec["dtype"] not in sdk.DTYPES:
        raise _bad(f"{name!r}.dtype: {spec['dtype']!r} is not one of {sorted(sdk.DTYPES)}")
    shape = spec["shape"]
    offsets = spec["data_offsets"]
    if not isinstance(shape, list) or not isinstance(offsets, list) or len(offsets) != 2:
        raise _bad(f"{name!r}: shape must be a list, data_offsets [begin, end]")
    info = TensorInfo(name, spec["dtype"], tuple(_uint(d, f"{name!r}.shape") for d in shape))
    begin, end = (_uint(o, f"{name!r}.data_offsets") for o in offsets)
    if end - begin != info.nbytes:
        raise _bad(f"{name!r}: data_offsets span {end - begin} bytes, shape needs {info.nbytes}")
    return begin, end, info


def read_safetensors_header(src: BinaryIO, size: int) -> tuple[TensorTable, int]:
    """The tensor table (in data order) and where the data starts, of a safetensors file of
    ``size`` bytes. Raises :class:`WireFormatError` naming what is wrong."""
    prefix = src.read(8)
    if len(prefix) != 8:
        raise _bad("shorter than its 8-byte header length")
    (header_len,) = struct.unpack("<Q", prefix)
    if not 2 <= header_len <= MAX_SAFETENSORS_HEADER or 8 + header_len > size:
        raise _bad(f"header length {header_len} out of bounds (file of {size} bytes)")
    raw = src.read(header_len)
    try:
        obj = json.loads(
            raw.decode("utf-8").rstrip(" "),  # safetensors pads the header with spaces
            object_pairs_hook=_pairs,
            parse_float=_no_float,
            parse_constant=_no_float,
        )
    except UnicodeDecodeError:
        raise _bad("header: not UTF-8") from None
    except ValueError as exc:
        if isinstance(exc, WireFormatError):
            raise
        raise _bad(f"header: not JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise _bad("header: not a JSON object")
    metadata = obj.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _bad("__metadata__: must map strings to strings")
    entries = [_tensor(name, spec) for name, spec in obj.items()]
    entries.sort(key=lambda e: (e[0], e[1]))
    position = 0
    for begin, end, info in entries:
        if begin != position:
            raise _bad(f"{info.name!r}: data at {begin}, expected {position} (gap or overlap)")
        position = end
    data_start = 8 + header_len
    if data_start + position != size:
        raise _bad(f"the data is {size - data_start} bytes, the tensors need {position}")
    table = TensorTable(tuple(e[2] for e in entries), tuple(sorted(metadata.items())))
    try:
        sdk.parse_table(table.to_json(), "safetensors header")  # the encrypted file's limits
    except sdk.WeightsError as exc:
        raise _bad(exc.message) from None
    return table, data_start


class Sink(Protocol):
    def write(self, data: bytes, /) -> int: ...


def encrypt_stream(
    src: BinaryIO,
    size: int,
    out: Sink,
    key: bytes | bytearray,
    *,
    model_id: str,
    key_id: str,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    hide_names: bool = False,
    salt: bytes | None = None,
) -> sdk.Header:
    """Encrypt the safetensors file ``src`` (``size`` bytes) into ``out``, chunk by chunk.

    ``salt`` is random unless given (the test vectors fix it: never reuse one)."""
    table, data_start = read_safetensors_header(src, size)
    salt = os.urandom(sdk.SALT_LEN) if salt is None else salt
    if len(salt) != sdk.SALT_LEN:
        raise ConfigError(f"salt: {sdk.SALT_LEN} bytes")
    if len(key) != sdk.KEY_LEN:
        raise ConfigError(f"the key must be {sdk.KEY_LEN} bytes, not {len(key)}")
    keys = sdk.derive_keys(key, salt, model_id, key_id)
    table_plain = sdk.canonical(table.to_json())
    header = build_header(
        model_id=model_id,
        key_id=key_id,
        chunk_size=chunk_size,
        salt=salt,
        keys=keys,
        table=table,
        encrypted_table_size=len(table_plain) + sdk.TAG_LEN if hide_names else None,
    )
    raw = sdk.encode_prefix_and_header(header)
    parsed = sdk.parse_header(raw)
    aead = AESGCM(keys.enc)
    out.write(raw)
    out.write(sdk.header_mac(keys.mac, raw))
    if hide_names:
        out.write(aead.encrypt(sdk.TABLE_NONCE, table_plain, sdk.table_aad(parsed.digest)))
    src.seek(data_start)
    for chunk in sdk.layout(table, chunk_size, parsed.data_position):
        plain = src.read(chunk.length)
        if len(plain) != chunk.length:
            raise _bad(f"the file ended in tensor {table.tensors[chunk.tensor].name!r}")
        aad = sdk.data_aad(parsed.digest, chunk)
        out.write(aead.encrypt(sdk.data_nonce(chunk.index), plain, aad))
    return parsed


def encrypt_file(
    src: Path,
    dst: Path,
    key: bytes | bytearray,
    *,
    model_id: str,
    key_id: str,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    hide_names: bool = False,
    wrap_source: Callable[[BinaryIO], BinaryIO] | None = None,
) -> sdk.Header:
    """Encrypt ``src`` into ``dst`` through a temporary file renamed into place when complete
    and fsync'd, so ``dst`` is never a partial file. ``wrap_source``, if given, wraps the
    opened source (the command line counts progress through it)."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    try:
        with open(src, "rb") as source:
            size = os.fstat(source.fileno()).st_size
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            with os.fdopen(fd, "wb", buffering=0) as raw_out:
                out = _Writer(raw_out.fileno())
                header = encrypt_stream(
                    source if wrap_source is None else wrap_source(source),
                    size,
                    out,
                    key,
                    model_id=model_id,
                    key_id=key_id,
                    chunk_size=chunk_size,
                    hide_names=hide_names,
                )
                os.fsync(raw_out.fileno())
        os.replace(tmp, dst)
        fsync_dir(dst.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise StorageError(f"{exc.filename or dst}: {exc.strerror}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return header


class _Writer:
    """The one method :func:`encrypt_stream` needs of its output: every byte written."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def write(self, data: bytes) -> int:
        write_all(self._fd, data)
        return len(data)
