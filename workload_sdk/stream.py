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
data all fail. Memory is O(chunk_size) both ways, whatever the input size: a fixed number of
buffers of ``max(chunk_size, _BATCH_BYTES)`` or so.

This module runs inside the workload container (Debian bookworm: python3-cryptography 38),
so it uses only the standard library and cryptography APIs that 38 has (AESGCM, Cipher with
GCM, HKDF), and AESGCM's ``encrypt_into``/``decrypt_into`` where they exist (>= 45, the
host's). It must not import ``embassy``.

Speed: AES-GCM with AES-NI runs at several GB/s, so what a chunk costs besides it decides
the stream's speed. Both directions read the input with ``readinto`` into a few reused
buffers of whole records, batched (``_BATCH_BYTES``), seal or open each record into one
reused output buffer and write a batch at once: no allocation or copy per chunk. A stream
longer than two batches is read ahead on a helper thread when there are two CPUs
(``readinto`` and OpenSSL release the GIL), so reading overlaps the AEAD; the thread ends
before the call returns or raises (or when a :func:`decrypt_stream` iterator is closed).

Plaintext that :func:`decrypt_stream` yields has been authenticated chunk by chunk, but a
truncated stream is only detected at the end: treat the output as untrusted until the
iterator is exhausted without a :class:`StreamError`. AES-GCM writes a chunk's plaintext
before it checks the tag; a chunk whose tag fails has its output zeroed before anything
else happens, and the output buffer is zeroed when the stream is done with, so only
authenticated plaintext ever reaches the caller (``tests/unit/workload_sdk/
test_stream_release.py`` checks it from a hostile destination's side).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import queue
import struct
import threading
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, cast

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
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
# cryptography >= 45 (the host's) seals and opens into a caller's buffer with AESGCM; 38
# (the workload's) AESGCM takes and gives only bytes, so there a Cipher(AES, GCM) context
# a chunk does it with update_into, which wants SLACK bytes of room beyond the data.
_AEAD_INTO = hasattr(AESGCM, "encrypt_into") and hasattr(AESGCM, "decrypt_into")
SLACK = 15
_NONCE_TAIL = struct.Struct(">IB")  # u32be(index) || last


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
# AES-256-GCM into a buffer


class _Gcm:
    """AES-256-GCM under one stream key, sealing and opening into a caller's buffer.

    One call a chunk with cryptography >= 45 (``encrypt_into``/``decrypt_into``, the GIL
    released); a ``Cipher(AES, GCM)`` context a chunk with 38. Either way nothing is
    allocated per chunk but the context, and the plaintext lands where it is used.
    """

    def __init__(self, key: bytes) -> None:
        self.aead = AESGCM(key)
        self._aes = algorithms.AES(key)

    def seal_into(self, nonce: bytes, plain: memoryview, aad: bytes, out: memoryview) -> int:
        """Write ``ciphertext || tag`` at the start of ``out`` (room: len + TAG_LEN + SLACK)."""
        n = len(plain)
        if _AEAD_INTO:
            self.aead.encrypt_into(nonce, plain, aad, out[: n + TAG_LEN])
        else:
            enc = Cipher(self._aes, modes.GCM(nonce)).encryptor()
            enc.authenticate_additional_data(aad)
            enc.update_into(plain, out[: n + SLACK])
            enc.finalize()
            out[n : n + TAG_LEN] = enc.tag
        return n + TAG_LEN

    def open_into(self, nonce: bytes, record: memoryview, aad: bytes, out: memoryview) -> int:
        """Write the plaintext of ``record`` (at least a tag long) at the start of ``out``
        (room: len - TAG_LEN + SLACK) and return its length, or raise InvalidTag.

        Both ways write before they check the tag: on InvalidTag, what was written is
        zeroed before the exception leaves.
        """
        n = len(record) - TAG_LEN
        try:
            if _AEAD_INTO:
                self.aead.decrypt_into(nonce, record, aad, out[:n])
            else:
                dec = Cipher(self._aes, modes.GCM(nonce)).decryptor()
                dec.authenticate_additional_data(aad)
                dec.update_into(record[:n], out[: n + SLACK])
                dec.finalize_with_tag(bytes(record[n:]))
        except InvalidTag:
            out[: n + SLACK] = bytes(n + SLACK)
            raise
        return n


# ---------------------------------------------------------------------------------------
# Reading in whole units, ahead of the AEAD
#
# The AEAD itself runs at several GB/s (AES-NI), so what a chunk costs besides AES-GCM
# decides the stream's speed: allocations, copies, and reading the input. Both directions
# read the input with ``readinto`` into a few reused buffers of whole units (records or
# plaintext chunks), batched to amortise the hand-offs, and, when the stream is more than
# one batch and there is a second CPU, on a helper thread: ``readinto`` and OpenSSL both
# release the GIL, so reading the next batch overlaps the AEAD on this one. Memory is a
# fixed number of buffers of ``max(unit, _BATCH_BYTES)``-ish bytes, whatever the input size.

_BATCH_BYTES = 1024 * 1024  # bytes of whole units read per batch (at least one unit)
_READ_AHEAD = 3  # buffers the helper thread cycles through (two when reading in line)


def _can_overlap() -> bool:
    """Whether a helper thread can read while this one runs the AEAD: two CPUs or more."""
    try:
        return len(os.sched_getaffinity(0)) > 1
    except (AttributeError, OSError):  # not Linux
        return (os.cpu_count() or 1) > 1


def _fill(src: BinaryIO, view: memoryview, stop: threading.Event | None = None) -> int:
    """Read into all of ``view`` unless the input ends first; return the bytes read."""
    readinto = getattr(src, "readinto", None)
    got = 0
    size = len(view)
    while got < size:
        if readinto is not None:
            n = readinto(view[got:])
        else:  # a reader without readinto: one copy
            data = src.read(size - got)
            n = None if data is None else len(data)
            if n:
                view[got : got + n] = data
        if n is None:  # a non-blocking raw stream with nothing ready
            raise OSError("source is non-blocking and returned no data")
        if not n:
            break
        got += n
        if stop is not None and stop.is_set():
            break
    return got


class _Units:
    """``src`` in batches of whole ``unit``-byte pieces (see :meth:`__iter__`).

    The first batch is one unit and the second a whole batch, both read on the caller's
    thread: a small stream costs one small buffer, a mid-sized one two, and neither a
    thread. From the third batch on, if there is a CPU for it, a helper thread reads ahead
    into ``_READ_AHEAD`` reused buffers, one batch at a time, in order.
    """

    def __init__(self, src: BinaryIO | memoryview, unit: int) -> None:
        # A memoryview is the input itself, held in memory: its batches are slices of it.
        self._data = src if isinstance(src, memoryview) else None
        self._src = cast(BinaryIO, None) if isinstance(src, memoryview) else src
        self._unit = unit
        self._batch = max(1, _BATCH_BYTES // unit) * unit
        self._free: queue.SimpleQueue[bytearray | None] = queue.SimpleQueue()
        self._full: queue.SimpleQueue[tuple[bytearray, int] | BaseException] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._spare: list[bytearray] = []  # read in line: the batch buffers not in use
        self._small: bytearray | None = None  # the first, one-unit buffer: not reused

    # -- batches --

    def _first(self) -> tuple[bytearray, int]:
        buf = self._small = bytearray(self._unit)
        return buf, _fill(self._src, memoryview(buf))

    def _next(self) -> tuple[bytearray, int]:
        if self._thread is not None:
            item = self._full.get()
            if isinstance(item, BaseException):
                raise item
            return item
        buf = self._spare.pop() if self._spare else bytearray(self._batch)
        n = _fill(self._src, memoryview(buf))
        if n == len(buf) and _can_overlap():  # more to come: read it ahead from now on
            for _ in range(_READ_AHEAD - 1):  # this buffer joins them once released
                self._free.put(bytearray(self._batch))
            self._thread = threading.Thread(
                target=self._read_ahead, name="embassy-stream-read", daemon=True
            )
            self._thread.start()
        return buf, n

    def _read_ahead(self) -> None:
        try:
            while True:
                buf = self._free.get()
                if buf is None or self._stop.is_set():
                    return
                n = _fill(self._src, memoryview(buf), self._stop)
                if self._stop.is_set():
                    return
                self._full.put((buf, n))
                if n < len(buf):
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            self._full.put(exc)

    def _release(self, buf: bytearray) -> None:
        if buf is self._small:
            self._small = None
            return
        if self._thread is not None:
            self._free.put(buf)
        else:
            self._spare.append(buf)

    def close(self) -> None:
        """Stop the helper thread, if any: it ends after the read it may be inside."""
        if self._thread is not None:
            self._stop.set()
            self._free.put(None)
            self._thread.join()
            self._thread = None

    # -- iteration --

    def __iter__(self) -> Iterator[tuple[memoryview, int]]:
        """Runs of units ``(view, following)``: whole units but for the input's last one.

        ``view`` is valid until the next run is asked for; ``following`` is the length of
        the unit after the run, 0 when the input ends with it. Reading ahead that far is
        what tells the last unit. An empty input has no run.
        """
        unit = self._unit
        if self._data is not None:
            data = self._data
            for off in range(0, len(data), self._batch):
                end = off + self._batch
                yield data[off:end], len(data[end : end + unit])
            return
        buf, n = self._first()
        while n:
            view = memoryview(buf)[:n]
            if n < len(buf):  # the input ends in this batch
                yield view, 0
                return
            # Only the batch's last unit waits for the next batch to be read: the others go
            # now, while the helper thread reads on.
            tail = n - unit
            if tail:
                yield view[:tail], unit
            nxt, m = self._next()
            yield view[tail:], min(m, unit)
            self._release(buf)
            buf, n = nxt, m


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
    return _encrypt(key, payload_id, src, dst, chunk_size=chunk_size, nonce_prefix=nonce_prefix)


def _encrypt(
    key: bytes,
    payload_id: bytes,
    src: BinaryIO | memoryview,
    dst: BinaryIO,
    *,
    chunk_size: int,
    nonce_prefix: bytes | None,
) -> int:
    if nonce_prefix is None:
        nonce_prefix = os.urandom(NONCE_PREFIX_LEN)
    header = encode_header(payload_id, chunk_size, nonce_prefix)
    parsed = StreamHeader(bytes(payload_id), chunk_size, bytes(nonce_prefix), header)
    gcm = _Gcm(stream_key(key, payload_id))
    aad = parsed.aad
    prefix = bytes(nonce_prefix)
    pack = _NONCE_TAIL.pack
    written = _write_all(dst, parsed.prefix)
    units = _Units(src, chunk_size)
    # A batch's records are sealed into one buffer (sized to the first, one-chunk batch,
    # then to a whole one) and written at once.
    out: memoryview | None = None
    index = 0
    try:
        # A chunk is the last one iff nothing follows it (``following`` reads ahead); an
        # empty input is one empty last chunk.
        for batch, following in units:
            size = len(batch)
            need = -(-size // chunk_size) * (chunk_size + TAG_LEN) + SLACK
            if out is None or len(out) < need:
                out = memoryview(bytearray(need))
            done = 0
            for pos in range(0, size, chunk_size):
                end = pos + chunk_size
                more = min(size - end, chunk_size) if end < size else following
                if index >= MAX_CHUNKS:
                    raise StreamError("too-long", f"input needs more than {MAX_CHUNKS} chunks")
                done += gcm.seal_into(
                    prefix + pack(index, not more), batch[pos:end], aad, out[done:]
                )
                index += 1
            written += _write_all(dst, out[:done])
        if index == 0:
            written += _write_all(dst, gcm.aead.encrypt(_nonce(prefix, 0, True), b"", aad))
    finally:
        units.close()
    return written


def _write_all(dst: BinaryIO, data: bytes | memoryview) -> int:
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
    _encrypt(
        key, payload_id, memoryview(data), out, chunk_size=chunk_size, nonce_prefix=nonce_prefix
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
        self.gcm = _Gcm(stream_key(key, header.payload_id))
        self.aead = self.gcm.aead
        self.header = header
        self.aad = header.aad
        self.record_size = header.chunk_size + TAG_LEN
        self.index = 0  # of the next chunk
        # Chunks are opened into this one buffer, sized to the first batch (one record),
        # then to a whole one; zeroed when replaced and when the stream is done with.
        self._out: memoryview | None = None

    def _buffer(self, size: int) -> memoryview:
        need = size + SLACK
        if self._out is None or len(self._out) < need:
            self.wipe()
            self._out = memoryview(bytearray(need))
        return self._out

    def wipe(self) -> None:
        """Zero the plaintext buffer."""
        if self._out is not None:
            self._out[:] = bytes(len(self._out))

    def open_batch(
        self, batch: memoryview, following: int, *, per_chunk: bool
    ) -> Iterator[memoryview]:
        """The plaintext of ``batch``'s records, the next ones in the stream.

        Views of the buffer: one a chunk, or one for the whole batch. ``following`` is how
        many bytes follow the batch (0: the stream's last record is its last). On a failing
        record, the plaintext of the authentic ones before it is yielded, then the
        :class:`StreamError` raised; the failing one's output is zeroed before either.
        """
        size = len(batch)
        rs = self.record_size
        out = self._buffer(min(size, rs) if per_chunk else size)
        gcm, aad, prefix = self.gcm, self.aad, self.header.nonce_prefix
        pack = _NONCE_TAIL.pack
        index = self.index
        done = 0  # plaintext bytes in out, all authentic
        for pos in range(0, size, rs):
            end = pos + rs
            more = min(size - end, rs) if end < size else following
            if index >= MAX_CHUNKS:
                raise StreamError("too-long", f"stream has more than {MAX_CHUNKS} chunks")
            record = batch[pos:end]
            n = -1  # less than a tag: fail() says so
            if len(record) >= TAG_LEN:
                try:
                    n = gcm.open_into(prefix + pack(index, not more), record, aad, out[done:])
                except InvalidTag:
                    n = -1
            if n < 0:
                self.index = index
                if done:  # the chunks before this one authenticated: theirs to have
                    yield out[:done]
                raise self.fail(index, not more, bytes(record), more)
            index += 1
            if per_chunk:
                self.index = index
                yield out[:n]  # done stays 0: the next chunk reuses the start
            else:
                done += n
        self.index = index
        if done:
            yield out[:done]

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


def _plaintexts(
    key: bytes,
    src: BinaryIO | memoryview,
    expected_payload_id: bytes | None,
    *,
    per_chunk: bool = False,
) -> Generator[memoryview, None, None]:
    """Plaintext once it authenticated: chunk by chunk, or a batch of chunks at a time.

    A memoryview is of a reused buffer, valid until the next item is asked for.

    ``src`` is a reader, or the whole stream in memory. Nothing that failed its tag leaves
    here: a failing chunk's output is zeroed before the error is raised, and the output
    buffer is zeroed when the stream is done with.
    """
    if isinstance(src, memoryview):
        header = read_header(io.BytesIO(src))
        src = src[len(header.prefix) :]
    else:
        header = read_header(src)
    if expected_payload_id is not None and header.payload_id != expected_payload_id:
        raise StreamError(
            "wrong-payload",
            f"stream is for payload {header.payload_id.hex()}, expected "
            f"{bytes(expected_payload_id).hex()}",
        )
    dec = _Decryptor(key, header)
    units = _Units(src, dec.record_size)
    try:
        for batch, following in units:
            yield from dec.open_batch(batch, following, per_chunk=per_chunk)
        if dec.index == 0:
            raise StreamError("truncated", "truncated stream: no chunk follows the header", chunk=0)
    finally:
        units.close()
        dec.wipe()


def decrypt_stream(
    key: bytes, src: BinaryIO, *, expected_payload_id: bytes | None = None
) -> Iterator[bytes]:
    """Yield the plaintext chunks of ``src``, each authenticated before it is yielded.

    Raises :class:`StreamError` (at the first failing point; truncation only at the end).
    """
    plaintexts = _plaintexts(key, src, expected_payload_id, per_chunk=True)
    try:
        for plain in plaintexts:
            yield bytes(plain)
    finally:  # also when the caller stops early: the read-ahead thread ends here
        plaintexts.close()


def decrypt_stream_to(
    key: bytes, src: BinaryIO, dst: BinaryIO, *, expected_payload_id: bytes | None = None
) -> int:
    """Decrypt ``src`` into ``dst``; return the plaintext bytes written.

    Each chunk is written once it authenticated, as a view of a reused buffer (``dst``
    must not keep it). On :class:`StreamError`, ``dst`` holds a prefix of authentic
    chunks: discard it.
    """
    total = 0
    plaintexts = _plaintexts(key, src, expected_payload_id)
    try:
        for plain in plaintexts:
            total += _write_all(dst, plain)
    finally:
        plaintexts.close()
    return total


def decrypt_bytes(key: bytes, data: bytes, *, expected_payload_id: bytes | None = None) -> bytes:
    """:func:`decrypt_stream` for a stream held in memory."""
    out = io.BytesIO()
    plaintexts = _plaintexts(key, memoryview(data), expected_payload_id)
    try:
        for plain in plaintexts:
            out.write(plain)
    finally:
        plaintexts.close()
    return out.getvalue()
