"""The streaming AEAD of the sealed input (docs/protocol.md, section 1).

::

    "EMBSTRM1" || u32be(header_len) || header (canonical JSON) || chunk_0 || ... || chunk_n

    header   = {"alg":"AES-256-GCM-STREAM","chunk_size":N,"nonce_prefix":"<hex 7 B>",
                "payload_id":"<hex 16 B>","v":1}
    key      = HKDF-SHA256(input_key, salt=None, info=b"embassy-stream-v1" || payload_id)
    chunk_i  = AES-256-GCM(key, nonce_prefix || u32be(i) || last, plaintext_i,
                           aad=SHA-256(magic || u32be(header_len) || header))

Every chunk but the last holds exactly ``chunk_size`` plaintext bytes; the last (``last`` =
0x01) holds 0..chunk_size. Truncation, reordering, duplication, a changed header and trailing
data all fail. Memory is O(chunk_size) both ways, whatever the input size.

This module runs inside the workload container (Debian bookworm: python3-cryptography 38),
so it uses only the standard library, AESGCM and HKDF. It must not import ``embassy``.

Plaintext that :func:`decrypt_stream` yields has been authenticated chunk by chunk, but a
truncated stream is only detected at the end: treat the output as untrusted until the
iterator is exhausted without a :class:`StreamError`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MAGIC = b"EMBSTRM1"
ALG = "AES-256-GCM-STREAM"
VERSION = 1
KEY_INFO = b"embassy-stream-v1"
DEFAULT_CHUNK_SIZE = 65536
MIN_CHUNK_SIZE = 1024
MAX_CHUNK_SIZE = 16 * 1024 * 1024
MAX_HEADER_LEN = 4096
KEY_LEN = 32
PAYLOAD_ID_LEN = 16
NONCE_PREFIX_LEN = 7
TAG_LEN = 16
MAX_CHUNKS = 2**32
_FIXED_LEN = len(MAGIC) + 4  # magic || u32be(header_len)

_HEADER_FIELDS = frozenset({"v", "alg", "chunk_size", "nonce_prefix", "payload_id"})
# How far around a failing chunk's index to look for the index it really has, to tell a
# reordered or duplicated chunk from a corrupt one (error path only). Each candidate costs
# two trial decryptions of the chunk, so the window shrinks for big chunks: at most about
# 2 x 2 x _REORDER_BUDGET bytes of AES-GCM per failing stream.
_REORDER_WINDOW = 16
_REORDER_BUDGET = 4 * 1024 * 1024


class StreamError(Exception):
    """The stream is not an authentic, complete stream for this key.

    ``reason`` is a stable, machine-readable word: ``bad-magic``, ``bad-header``,
    ``header-too-large``, ``wrong-payload``, ``truncated``, ``corrupt``, ``reordered``,
    ``duplicated``, ``trailing-data``, ``too-long``. ``chunk`` is the failing chunk's index, if any.
    """

    def __init__(self, reason: str, message: str, *, chunk: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.chunk = chunk


@dataclass(frozen=True)
class StreamHeader:
    """A parsed stream header. ``raw`` is the header's canonical JSON bytes as read."""

    payload_id: bytes
    chunk_size: int
    nonce_prefix: bytes
    raw: bytes

    @property
    def prefix(self) -> bytes:
        """Everything before the first chunk: magic || u32be(len(raw)) || raw."""
        return MAGIC + struct.pack(">I", len(self.raw)) + self.raw

    @property
    def aad(self) -> bytes:
        """The associated data of every chunk: SHA-256 of :attr:`prefix`."""
        return hashlib.sha256(self.prefix).digest()


def stream_key(input_key: bytes, payload_id: bytes) -> bytes:
    """The AES-256 key of the stream for ``payload_id``, derived from the input key."""
    _check_len(input_key, KEY_LEN, "input key")
    _check_len(payload_id, PAYLOAD_ID_LEN, "payload_id")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=KEY_INFO + payload_id)
    return hkdf.derive(input_key)


def encode_header(payload_id: bytes, chunk_size: int, nonce_prefix: bytes) -> bytes:
    """The header's canonical JSON bytes."""
    _check_len(payload_id, PAYLOAD_ID_LEN, "payload_id")
    _check_len(nonce_prefix, NONCE_PREFIX_LEN, "nonce_prefix")
    if isinstance(chunk_size, bool) or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(
            f"chunk_size must be an int in [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}], got {chunk_size!r}"
        )
    return _canonical(
        {
            "v": VERSION,
            "alg": ALG,
            "chunk_size": chunk_size,
            "nonce_prefix": nonce_prefix.hex(),
            "payload_id": payload_id.hex(),
        }
    )


def _canonical(value: dict[str, Any]) -> bytes:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _check_len(value: bytes, size: int, what: str) -> None:
    if not isinstance(value, bytes | bytearray) or len(value) != size:
        raise ValueError(f"{what} must be {size} bytes")


def _nonce(prefix: bytes, index: int, last: bool) -> bytes:
    return prefix + struct.pack(">IB", index, 1 if last else 0)


def _read(src: BinaryIO, size: int) -> bytes:
    """Read ``size`` bytes, fewer only at end of input; never more than ``size`` in memory.

    Plain ``bytes`` throughout: cryptography 38's AESGCM accepts nothing else.
    """
    data = src.read(size)
    if data is None:  # a non-blocking raw stream with nothing ready
        raise OSError("source is non-blocking and returned no data")
    if len(data) == size or not data:
        return bytes(data)
    parts = [data]
    got = len(data)
    while got < size:
        more = src.read(size - got)
        if more is None:
            raise OSError("source is non-blocking and returned no data")
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


# ---------------------------------------------------------------------------------------
# Encryption


def encrypt_stream(
    key: bytes,
    payload_id: bytes,
    src: BinaryIO,
    dst: BinaryIO,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    nonce_prefix: bytes | None = None,
) -> int:
    """Encrypt all of ``src`` to ``dst`` under input key ``key``; return the bytes written.

    ``nonce_prefix`` is random unless given (give it only for test vectors: the stream key
    is already unique per payload_id, but a fixed prefix must never be reused with one key).
    """
    if nonce_prefix is None:
        nonce_prefix = os.urandom(NONCE_PREFIX_LEN)
    header = encode_header(payload_id, chunk_size, nonce_prefix)
    parsed = StreamHeader(bytes(payload_id), chunk_size, bytes(nonce_prefix), header)
    aead = AESGCM(stream_key(key, payload_id))
    aad = parsed.aad
    written = _write_all(dst, parsed.prefix)

    cur = _read(src, chunk_size)
    index = 0
    while True:
        # A chunk is the last one iff nothing follows it; a full chunk needs a look ahead.
        nxt = _read(src, chunk_size) if len(cur) == chunk_size else b""
        last = not nxt
        if index >= MAX_CHUNKS:
            raise StreamError("too-long", f"input needs more than {MAX_CHUNKS} chunks")
        ct = aead.encrypt(_nonce(nonce_prefix, index, last), cur, aad)
        written += _write_all(dst, ct)
        if last:
            return written
        index += 1
        cur = nxt


def _write_all(dst: BinaryIO, data: bytes) -> int:
    """Write all of ``data``: loop on a short write (a raw stream); None counts as all."""
    n = dst.write(data)
    if n is not None and n < len(data):
        view = memoryview(data)[n:]
        while view:
            n = dst.write(view)
            if not n:
                raise OSError("destination accepted no data")
            view = view[n:]
    return len(data)


def encrypt_bytes(
    key: bytes,
    payload_id: bytes,
    data: bytes,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    nonce_prefix: bytes | None = None,
) -> bytes:
    """:func:`encrypt_stream` for data held in memory."""
    out = io.BytesIO()
    encrypt_stream(
        key, payload_id, io.BytesIO(data), out, chunk_size=chunk_size, nonce_prefix=nonce_prefix
    )
    return out.getvalue()


# ---------------------------------------------------------------------------------------
# Decryption


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for k, v in pairs:
        if k in obj:
            raise StreamError("bad-header", f"bad header: duplicate key {k!r}")
        obj[k] = v
    return obj


def _reject_constant(name: str) -> Any:
    raise StreamError("bad-header", f"bad header: JSON constant {name} is not allowed")


def _hex_field(obj: dict[str, Any], key: str, size: int) -> bytes:
    text = obj[key]
    if not isinstance(text, str):
        raise StreamError("bad-header", f"bad header: {key} must be a hex string")
    try:
        value = bytes.fromhex(text)
    except ValueError:
        raise StreamError("bad-header", f"bad header: {key} is not valid hex") from None
    if value.hex() != text:
        raise StreamError("bad-header", f"bad header: {key} must be lower-case hex")
    if len(value) != size:
        raise StreamError("bad-header", f"bad header: {key} must be {size} bytes, got {len(value)}")
    return value


def parse_header(raw: bytes) -> StreamHeader:
    """Strictly parse the header JSON bytes (canonical, exact fields, v 1, sane chunk_size)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise StreamError("bad-header", "bad header: not UTF-8") from None
    try:
        obj = json.loads(
            text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant
        )
    except json.JSONDecodeError as exc:
        raise StreamError("bad-header", f"bad header: invalid JSON: {exc.msg}") from None
    except RecursionError:
        raise StreamError("bad-header", "bad header: JSON nested too deeply") from None
    if not isinstance(obj, dict):
        raise StreamError("bad-header", "bad header: not a JSON object")
    if set(obj) != _HEADER_FIELDS:
        missing = sorted(_HEADER_FIELDS - set(obj))
        unknown = sorted(set(obj) - _HEADER_FIELDS)
        raise StreamError(
            "bad-header", f"bad header: missing fields {missing}, unknown fields {unknown}"
        )
    v = obj["v"]
    if isinstance(v, bool) or v != VERSION or not isinstance(v, int):
        raise StreamError("bad-header", f"bad header: unsupported version {v!r}")
    if obj["alg"] != ALG:
        raise StreamError("bad-header", f"bad header: unsupported alg {obj['alg']!r}")
    chunk_size = obj["chunk_size"]
    if (
        isinstance(chunk_size, bool)
        or not isinstance(chunk_size, int)
        or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE
    ):
        raise StreamError(
            "bad-header",
            f"bad header: chunk_size must be an int in [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}], "
            f"got {chunk_size!r}",
        )
    payload_id = _hex_field(obj, "payload_id", PAYLOAD_ID_LEN)
    nonce_prefix = _hex_field(obj, "nonce_prefix", NONCE_PREFIX_LEN)
    if _canonical(obj) != raw:
        raise StreamError("bad-header", "bad header: not canonical JSON")
    return StreamHeader(payload_id, chunk_size, nonce_prefix, bytes(raw))


def read_header(src: BinaryIO) -> StreamHeader:
    """Read and strictly parse the magic, length and header; leave ``src`` at chunk 0."""
    fixed = _read(src, _FIXED_LEN)
    got = len(fixed)
    if got == 0:
        raise StreamError("truncated", "truncated stream: empty input")
    if fixed[: min(got, len(MAGIC))] != MAGIC[: min(got, len(MAGIC))]:
        raise StreamError("bad-magic", "bad magic: not an EMBSTRM1 stream")
    if got < _FIXED_LEN:
        raise StreamError("truncated", f"truncated header: input ends after {got} bytes")
    (length,) = struct.unpack(">I", fixed[len(MAGIC) :])
    if length > MAX_HEADER_LEN:
        raise StreamError(
            "header-too-large", f"header too large: {length} bytes (cap {MAX_HEADER_LEN})"
        )
    raw = _read(src, length)
    got = len(raw)
    if got < length:
        raise StreamError(
            "truncated", f"truncated header: {got} of its {length} bytes before end of input"
        )
    return parse_header(raw)


class _Decryptor:
    def __init__(self, key: bytes, header: StreamHeader) -> None:
        self.aead = AESGCM(stream_key(key, header.payload_id))
        self.header = header
        self.aad = header.aad

    def open(self, index: int, last: bool, record: bytes) -> bytes | None:
        if len(record) < TAG_LEN:
            return None
        try:
            return self.aead.decrypt(
                _nonce(self.header.nonce_prefix, index, last), record, self.aad
            )
        except InvalidTag:
            return None

    def _misplaced(self, index: int, record: bytes) -> StreamError | None:
        """A chunk that authenticates at another index nearby: reordered or duplicated."""
        window = max(1, min(_REORDER_WINDOW, _REORDER_BUDGET // self.header.chunk_size))
        lo = max(0, index - window)
        hi = min(MAX_CHUNKS - 1, index + window)
        for other in range(lo, hi + 1):
            if other == index:
                continue
            if any(self.open(other, flag, record) is not None for flag in (False, True)):
                if other < index:
                    return StreamError(
                        "duplicated",
                        f"duplicated chunk: chunk {other} appears again at position {index}",
                        chunk=index,
                    )
                return StreamError(
                    "reordered",
                    f"reordered chunk {index}: chunk {other} is in its place "
                    "(chunks are missing or out of order)",
                    chunk=index,
                )
        return None

    def fail(self, index: int, last: bool, record: bytes, more: int) -> StreamError:
        """Say precisely why ``record`` (chunk ``index``) fails; error path only."""
        if len(record) < TAG_LEN:
            return StreamError(
                "truncated",
                f"truncated stream: chunk {index} has {len(record)} bytes, less than a tag",
                chunk=index,
            )
        if self.open(index, not last, record) is not None:
            if last:
                return StreamError(
                    "truncated",
                    f"truncated stream: input ends after chunk {index}, "
                    "which is not the last chunk",
                    chunk=index,
                )
            return StreamError(
                "trailing-data",
                f"trailing data: {more}+ bytes follow the last chunk (chunk {index})",
                chunk=index,
            )
        misplaced = self._misplaced(index, record)
        if misplaced is not None:
            return misplaced
        if last:
            return StreamError(
                "corrupt",
                f"corrupt chunk {index} (the final one): authentication failed; it is "
                "tampered, cut short, from another stream or key, or has trailing data",
                chunk=index,
            )
        return StreamError(
            "corrupt",
            f"corrupt chunk {index}: authentication failed (tampered, wrong key, or from "
            "another stream)",
            chunk=index,
        )


def decrypt_stream(
    key: bytes, src: BinaryIO, *, expected_payload_id: bytes | None = None
) -> Iterator[bytes]:
    """Yield the plaintext chunks of ``src``, each authenticated before it is yielded.

    Raises :class:`StreamError` (at the first failing point; truncation only at the end).
    """
    header = read_header(src)
    if expected_payload_id is not None and header.payload_id != expected_payload_id:
        raise StreamError(
            "wrong-payload",
            f"stream is for payload {header.payload_id.hex()}, expected "
            f"{bytes(expected_payload_id).hex()}",
        )
    dec = _Decryptor(key, header)
    record_size = header.chunk_size + TAG_LEN
    cur = _read(src, record_size)
    if not cur:
        raise StreamError("truncated", "truncated stream: no chunk follows the header", chunk=0)
    index = 0
    while True:
        nxt = _read(src, record_size) if len(cur) == record_size else b""
        last = not nxt
        if index >= MAX_CHUNKS:
            raise StreamError("too-long", f"stream has more than {MAX_CHUNKS} chunks")
        plain = dec.open(index, last, cur)
        if plain is None:
            raise dec.fail(index, last, cur, len(nxt))
        yield plain
        if last:
            return
        index += 1
        cur = nxt


def decrypt_stream_to(
    key: bytes, src: BinaryIO, dst: BinaryIO, *, expected_payload_id: bytes | None = None
) -> int:
    """Decrypt ``src`` into ``dst``; return the plaintext bytes written.

    On :class:`StreamError`, ``dst`` holds a prefix of authentic chunks: discard it.
    """
    total = 0
    for chunk in decrypt_stream(key, src, expected_payload_id=expected_payload_id):
        total += _write_all(dst, chunk)
    return total


def decrypt_bytes(key: bytes, data: bytes, *, expected_payload_id: bytes | None = None) -> bytes:
    """:func:`decrypt_stream` for a stream held in memory."""
    return b"".join(decrypt_stream(key, io.BytesIO(data), expected_payload_id=expected_payload_id))
