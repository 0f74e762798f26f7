"""A job's result, encrypted in its container under the result key (docs/protocol.md §14).

The embassy hands the job a fresh 32-byte result key that it has already wrapped to the
user's reply key (HPKE, done by the embassy: this side needs none). The job encrypts its
output with :func:`encrypt_result` into the stream format of :mod:`workload_sdk.stream`,
under a stream id derived from the key itself::

    stream_id = HMAC-SHA256(result_key, b"embassy-job-result-stream-v1")[:16]

so the user's side can tell a ciphertext made under another job's key (``wrong-payload``)
from one that was tampered with. The key is fresh per job, so the stream key
HKDF(result_key, "embassy-stream-v1" || stream_id) is never reused.

Like the stream module, this runs inside the workload container (Debian bookworm:
python3-cryptography 38): standard library and :mod:`workload_sdk.stream` only. It must not
import ``embassy``.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import BinaryIO, cast

from workload_sdk.stream import DEFAULT_CHUNK_SIZE, KEY_LEN, PAYLOAD_ID_LEN, encrypt_stream

RESULT_STREAM_LABEL = b"embassy-job-result-stream-v1"


def result_stream_id(key: bytes) -> bytes:
    """The 16-byte stream id of the result encrypted under ``key`` (a keyed hash of it)."""
    if not isinstance(key, bytes | bytearray) or len(key) != KEY_LEN:
        raise ValueError(f"result key must be {KEY_LEN} bytes")
    return hmac.digest(bytes(key), RESULT_STREAM_LABEL, "sha256")[:PAYLOAD_ID_LEN]


@dataclass(frozen=True)
class EncryptedResult:
    """What :func:`encrypt_result` wrote: its size and SHA-256 (hex), the job's commitment."""

    size: int
    sha256: str


class _HashingWriter:
    """Pass writes through to ``dst``, hashing exactly what was written."""

    def __init__(self, dst: BinaryIO) -> None:
        self.dst = dst
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        n = self.dst.write(data)
        written = len(data) if n is None else n
        self.hash.update(memoryview(data)[:written])
        self.size += written
        return written


def encrypt_result(
    key: bytes, src: BinaryIO, dst: BinaryIO, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> EncryptedResult:
    """Encrypt all of ``src`` to ``dst`` under the result key; O(chunk) memory.

    Returns the ciphertext's size and SHA-256 (what the job commits to the embassy).
    """
    out = _HashingWriter(dst)
    stream_id = result_stream_id(key)
    encrypt_stream(bytes(key), stream_id, src, cast(BinaryIO, out), chunk_size=chunk_size)
    return EncryptedResult(out.size, out.hash.hexdigest())
