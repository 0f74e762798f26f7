"""The encrypted model files pinned under tests/vectors/weights/ (``scripts/gen_vectors.py``).

One small deterministic model (fixed key and salt), encrypted with its tensor table in the
clear and hidden, and hostile variants of it. ``expected.json`` pins, for each file, how to
load it (key, model id, key id) and the verdict: the tensors' digests, or the error code
and a part of its message. ``tests/unit/test_vectors.py`` loads every file with the
workload's loader (``workload_sdk.weights.load_encrypted``) and checks the verdict. Every
file is a few KiB: chunks of 1024 bytes (the minimum), so a tensor spans three.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
from typing import Any

import numpy as np
import numpy.typing as npt

from embassy.weights.encrypt import encrypt_stream
from workload_sdk import weights as sdk

DIR = "weights"
KEY = bytes(range(100, 132))  # a test key: public, never use it for anything else
OTHER_KEY = bytes(range(200, 232))
SALT = hashlib.sha256(b"embassy weights vectors: salt").digest()
OTHER_SALT = hashlib.sha256(b"embassy weights vectors: another file's salt").digest()
MODEL_ID = "vectors/tiny-model@1"
KEY_ID = "vectors-key-1"
CHUNK_SIZE = sdk.MIN_CHUNK_SIZE
METADATA = {"format": "np", "note": "embassy test vector"}


def tensors() -> dict[str, npt.NDArray[Any]]:
    """The model: several dtypes and shapes, an empty tensor, one spanning two chunks."""
    embed = (np.arange(16 * 40, dtype=np.float32).reshape(16, 40) - 300.0) / 7.0
    return {
        "embed.weight": embed,  # 2560 bytes: three chunks
        "norm.bias": np.linspace(-1, 1, 48, dtype=np.float16),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "ids": np.array([3, -1, 2**40, 0, 7], dtype=np.int64),
        "scale": np.array(0x3F80, dtype=np.uint16),  # BF16 1.0, as raw bits
        "mask": np.array([True, False, True, True, False, False, True]),
    }


DTYPE_NAMES = {"embed.weight": "F32", "norm.bias": "F16", "empty": "F32", "ids": "I64"}
DTYPE_NAMES |= {"scale": "BF16", "mask": "BOOL"}


def safetensors_bytes(
    arrays: dict[str, npt.NDArray[Any]], dtypes: dict[str, str], metadata: dict[str, str]
) -> bytes:
    """A safetensors file, written here (the vectors must not depend on that package)."""
    header: dict[str, Any] = {"__metadata__": metadata}
    data = b""
    for name, array in arrays.items():
        raw = np.ascontiguousarray(array).tobytes()
        header[name] = {
            "dtype": dtypes[name],
            "shape": list(array.shape),
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def model_bytes() -> bytes:
    return safetensors_bytes(tensors(), DTYPE_NAMES, METADATA)


def encrypted(
    *, hide_names: bool = False, salt: bytes = SALT, key: bytes = KEY, model_id: str = MODEL_ID
) -> bytes:
    src = model_bytes()
    out = io.BytesIO()
    encrypt_stream(
        io.BytesIO(src),
        len(src),
        out,
        key,
        model_id=model_id,
        key_id=KEY_ID,
        chunk_size=CHUNK_SIZE,
        hide_names=hide_names,
        salt=salt,
    )
    return out.getvalue()


def _chunks(data: bytes) -> list[sdk.Chunk]:
    header = sdk.parse_header(data[: 16 + struct.unpack_from("<I", data, 12)[0]])
    assert header.table is not None
    return sdk.layout(header.table, header.chunk_size, header.data_position)


def _span(chunk: sdk.Chunk) -> slice:
    return slice(chunk.position, chunk.position + chunk.length + sdk.TAG_LEN)


def _flip(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0x01
    return bytes(out)


def _header_edit(data: bytes, old: bytes, new: bytes) -> bytes:
    """Replace ``old`` by ``new`` in the header, fixing header_len (the MAC is left as is)."""
    header_len = struct.unpack_from("<I", data, 12)[0]
    body = data[16 : 16 + header_len]
    assert body.count(old) == 1, old
    body = body.replace(old, new)
    return data[:12] + struct.pack("<I", len(body)) + body + data[16 + header_len :]


def _good_verdict() -> dict[str, Any]:
    return {
        name: {
            "dtype": DTYPE_NAMES[name],
            "shape": list(a.shape),
            "sha256": hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest(),
        }
        for name, a in tensors().items()
    }


def cases() -> dict[str, tuple[bytes, dict[str, Any], str, str]]:
    """name -> (file, how to load it, expected code or "ok", part of the message)."""
    good = encrypted()
    hidden = encrypted(hide_names=True)
    load = {"key": KEY.hex(), "model_id": MODEL_ID, "key_id": KEY_ID}
    chunks = _chunks(good)
    first, second = chunks[0], chunks[1]  # both of embed.weight, both full
    assert first.length == second.length == CHUNK_SIZE
    swapped = bytearray(good)
    swapped[_span(first)], swapped[_span(second)] = good[_span(second)], good[_span(first)]
    other = encrypted(salt=OTHER_SALT)
    foreign = bytearray(good)
    foreign[_span(second)] = other[_span(second)]
    hidden_table_at = len(hidden) - len(good) + chunks[0].position - 1  # in the table chunk
    chunk_msg = "chunk 1 (tensor 0 'embed.weight', offset 1024) does not authenticate"
    return {
        "good-weights": (good, load, "ok", ""),
        "good-weights-hidden-names": (hidden, load, "ok", ""),
        "bad-weights-chunk-byte-flipped": (
            _flip(good, second.position + 100),
            load,
            "weights-chunk-tampered",
            chunk_msg,
        ),
        "bad-weights-tag-byte-flipped": (
            _flip(good, chunks[-1].position + chunks[-1].length),
            load,
            "weights-chunk-tampered",
            f"chunk {chunks[-1].index} (tensor 5 'mask', offset 0)",
        ),
        "bad-weights-chunks-swapped": (
            bytes(swapped),
            load,
            "weights-chunk-tampered",
            "chunk 0 (tensor 0 'embed.weight', offset 0) does not authenticate",
        ),
        "bad-weights-chunk-from-other-file": (
            bytes(foreign),
            load,
            "weights-chunk-tampered",
            chunk_msg,
        ),
        "bad-weights-truncated": (
            good[: chunks[-1].position],
            load,
            "weights-truncated",
            f"the file has {chunks[-1].position} bytes",
        ),
        "bad-weights-truncated-in-header": (good[:40], load, "weights-truncated", "header"),
        "bad-weights-trailing-data": (good + b"\0", load, "weights-malformed", "1 bytes after"),
        "bad-weights-header-changed": (
            _header_edit(good, b'"note":"embassy test vector"', b'"note":"embassy test vectoR"'),
            load,
            "weights-header-tampered",
            "header_mac",
        ),
        "bad-weights-shape-changed": (
            _header_edit(good, b'"name":"ids","shape":[5]', b'"name":"ids","shape":[4]'),
            load,
            "weights-header-tampered",
            "header_mac",
        ),
        "bad-weights-header-noncanonical": (
            _header_edit(good, b'"cipher":', b'"cipher": '),
            load,
            "weights-malformed",
            "not canonical JSON",
        ),
        "bad-weights-magic": (b"\x89EMBWTX\n" + good[8:], load, "weights-malformed", "magic"),
        "bad-weights-version": (
            good[:8] + struct.pack("<I", 2) + good[12:],
            load,
            "weights-malformed",
            "version: 2",
        ),
        "bad-weights-table-chunk-flipped": (
            _flip(hidden, hidden_table_at),
            load,
            "weights-chunk-tampered",
            "tensor table",
        ),
        "bad-weights-wrong-key": (
            good,
            {**load, "key": OTHER_KEY.hex()},
            "weights-wrong-key",
            "key_commitment",
        ),
        "bad-weights-wrong-key-id": (
            good,
            {**load, "key_id": "vectors-key-2"},
            "weights-wrong-key",
            "key_id: the file is under 'vectors-key-1'",
        ),
        "bad-weights-wrong-model": (
            good,
            {**load, "model_id": "vectors/other-model@1"},
            "weights-wrong-model",
            "model_id: the file is for 'vectors/tiny-model@1'",
        ),
        "bad-weights-model-id-relabelled": (
            _header_edit(good, b'"vectors/tiny-model@1"', b'"vectors/tiny-model@2"'),
            {**load, "model_id": "vectors/tiny-model@2"},
            "weights-wrong-key",
            "key_commitment",
        ),
    }


def weights_vectors() -> dict[str, bytes]:
    """Every file of tests/vectors/weights/, by path relative to tests/vectors/."""
    out: dict[str, bytes] = {}
    expected: dict[str, Any] = {}
    for name, (data, load, code, message) in sorted(cases().items()):
        out[f"{DIR}/{name}.emw"] = data
        entry: dict[str, Any] = {"sha256": hashlib.sha256(data).hexdigest(), "load": load}
        if code == "ok":
            entry |= {"expect": "ok", "tensors": _good_verdict()}
        else:
            entry |= {"expect": code, "message": message}
        expected[name] = entry
    out[f"{DIR}/expected.json"] = sdk.canonical(expected) + b"\n"
    return out
