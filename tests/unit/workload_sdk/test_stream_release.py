"""The fast streaming AEAD, from the attacker's side: no unauthenticated plaintext ever
reaches the caller, memory stays O(chunk) however long the stream, and the read-ahead
thread never outlives a call (tests/unit/payload/test_stream.py pins the format itself).
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
import tracemalloc
from collections.abc import Iterator
from typing import Any, BinaryIO, cast

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import workload_sdk.stream as stream_module
from workload_sdk.stream import (
    StreamError,
    decrypt_bytes,
    decrypt_stream,
    decrypt_stream_to,
    encrypt_bytes,
    encrypt_stream,
    read_header,
)

KEY = bytes(range(32))
PID = bytes(range(100, 116))
CS = 1024
RECORD = CS + 16
READER = "embassy-stream-read"


@pytest.fixture(params=["read-ahead", "in-line", "cipher"])
def batches(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Four records a batch, read ahead on the helper thread or on the caller's; cipher:
    read ahead, through Cipher(AES, GCM).update_into, the way cryptography 38 runs."""
    monkeypatch.setattr(stream_module, "_BATCH_BYTES", 4 * RECORD)
    overlap = request.param != "in-line"
    monkeypatch.setattr(stream_module, "_can_overlap", lambda: overlap)
    if request.param == "cipher":
        monkeypatch.setattr(stream_module, "_AEAD_INTO", False)
    return str(request.param)


@pytest.fixture(params=["read-ahead", "in-line"])
def into_batches(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The batch modes that go through ``AESGCM.decrypt_into`` (not the Cipher path)."""
    monkeypatch.setattr(stream_module, "_BATCH_BYTES", 4 * RECORD)
    overlap = request.param != "in-line"
    monkeypatch.setattr(stream_module, "_can_overlap", lambda: overlap)
    return str(request.param)


def _readers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == READER]


@pytest.fixture(autouse=True)
def no_reader_left() -> Iterator[None]:
    assert not _readers()
    yield
    assert not _readers(), "a read-ahead thread outlived its call"


def _stream(size: int) -> tuple[bytes, bytes, int]:
    """Plaintext, its stream, and where its first record starts."""
    data = os.urandom(size)
    stream = encrypt_bytes(KEY, PID, data, chunk_size=CS)
    return data, stream, len(read_header(io.BytesIO(stream)).prefix)


def _flip(stream: bytes, start: int, chunk: int, offset: int = 100) -> bytes:
    at = start + chunk * RECORD + offset
    return stream[:at] + bytes([stream[at] ^ 0x01]) + stream[at + 1 :]


class _Peeking:
    """A destination that keeps a copy of every write and looks at the whole buffer each
    write is a view of: what a careless or hostile consumer could see."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.buffers: list[Any] = []
        self.seen: list[bytes] = []  # each write's whole backing buffer, at write time

    def write(self, data: bytes | memoryview) -> int:
        self.written += data
        if isinstance(data, memoryview):
            self.buffers.append(data.obj)
            self.seen.append(bytes(data.obj))
        return len(data)


# --- no unauthenticated plaintext --------------------------------------------------------

# 23 chunks, read as batches [0] (one record), [1-4], [5-8], [9-12], ... [21-22]: the
# failing chunk is first in its batch (0, 5), inside it (3, 10, 11), last of it (4, 8), or
# the stream's final, short one (22).
SIZE = 22 * CS + 300


@pytest.mark.parametrize("chunk", [0, 3, 4, 5, 8, 10, 11, 22])
def test_a_forged_chunk_reaches_no_caller(batches: str, chunk: int) -> None:
    data, stream, start = _stream(SIZE)
    forged = _flip(stream, start, chunk)
    # What the forged chunk decrypts to (CTR: the real plaintext with one byte flipped):
    # the bytes an attacker would want released.
    fake = bytearray(data[chunk * CS : (chunk + 1) * CS])
    fake[100] ^= 0x01

    sink = _Peeking()
    with pytest.raises(StreamError, match=f"corrupt chunk {chunk}"):
        decrypt_stream_to(KEY, io.BytesIO(forged), cast(BinaryIO, sink))
    assert bytes(sink.written) == data[: chunk * CS]  # exactly the authentic prefix
    assert not any(bytes(fake) in whole for whole in sink.seen)
    for buf in sink.buffers:  # the plaintext buffer is wiped once the call is over
        assert not any(buf)

    got: list[bytes] = []
    with pytest.raises(StreamError, match=f"corrupt chunk {chunk}"):
        got.extend(decrypt_stream(KEY, io.BytesIO(forged)))
    assert b"".join(got) == data[: chunk * CS]
    assert all(len(c) == CS for c in got)


class _LeakyAESGCM:
    """AESGCM whose decrypt_into leaves its output in the buffer when the tag fails, as
    OpenSSL's EVP interface does (it decrypts, then checks): the module must wipe it."""

    MARK = b"UNAUTHENTICATED!" * 64

    def __init__(self, key: bytes) -> None:
        self._real = AESGCM(key)
        self.buffers: list[Any] = []

    def encrypt(self, nonce: bytes, data: bytes, aad: bytes | None) -> bytes:
        return self._real.encrypt(nonce, data, aad)

    def decrypt(self, nonce: bytes, data: bytes, aad: bytes | None) -> bytes:
        return self._real.decrypt(nonce, data, aad)

    def decrypt_into(self, nonce: bytes, data: Any, aad: bytes | None, buf: memoryview) -> int:
        self.buffers.append(buf.obj)
        try:
            return self._real.decrypt_into(nonce, data, aad, buf)
        except InvalidTag:
            buf[:] = (self.MARK * (len(buf) // len(self.MARK) + 1))[: len(buf)]
            raise


@pytest.mark.parametrize("chunk", [0, 3, 5, 11, 22])
def test_output_left_by_a_failing_tag_is_zeroed_before_anything_is_released(
    into_batches: str, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The project's cryptography (>= 49) has decrypt_into; the Cipher path (cryptography 38,
    # in the workload image) is covered by the other tests' "cipher" mode.
    assert stream_module._AEAD_INTO
    made: list[_LeakyAESGCM] = []

    def leaky(key: bytes) -> _LeakyAESGCM:
        made.append(_LeakyAESGCM(key))
        return made[-1]

    data, stream, start = _stream(SIZE)
    monkeypatch.setattr(stream_module, "AESGCM", leaky)
    sink = _Peeking()
    with pytest.raises(StreamError, match=f"corrupt chunk {chunk}"):
        decrypt_stream_to(KEY, io.BytesIO(_flip(stream, start, chunk)), cast(BinaryIO, sink))
    assert bytes(sink.written) == data[: chunk * CS]
    mark = _LeakyAESGCM.MARK[:64]
    assert not any(mark in whole for whole in sink.seen), "the forgery was visible on write"
    buffers = [b for aead in made for b in aead.buffers]
    assert buffers
    for buf in buffers:
        assert not any(buf)


def test_truncation_releases_only_whole_authentic_chunks(batches: str) -> None:
    data, stream, start = _stream(SIZE)
    for cut in (start + 5 * RECORD, start + 8 * RECORD, start + 9 * RECORD + 40):
        sink = _Peeking()
        with pytest.raises(StreamError) as info:
            decrypt_stream_to(KEY, io.BytesIO(stream[:cut]), cast(BinaryIO, sink))
        assert info.value.reason in {"truncated", "corrupt"}
        whole, part = divmod(cut - start, RECORD)
        # Cut at a record's end, that record fails as "not the last"; cut inside one, that
        # one fails. Nothing of the failing record is released, all before it is.
        assert bytes(sink.written) == data[: (whole - (0 if part else 1)) * CS]


# --- memory ----------------------------------------------------------------------------


class _Generated(io.RawIOBase):
    """``size`` pseudo-random bytes made on the fly from a 1 MiB block; hashed as read."""

    def __init__(self, size: int) -> None:
        self._left = size
        self._block = hashlib.sha256(b"block").digest() * (32 * 1024 - 1)
        self._pos = 0
        self.sha = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = min(len(b), self._left, len(self._block) - self._pos)
        b[:n] = self._block[self._pos : self._pos + n]
        self.sha.update(memoryview(b)[:n])
        self._pos = (self._pos + n) % len(self._block)
        self._left -= n
        return n


class _Hashing:
    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.count = 0

    def write(self, data: bytes | memoryview) -> int:
        self.sha.update(data)
        self.count += len(data)
        return len(data)


def _round_trip_peak(size: int, chunk_size: int) -> int:
    """Encrypt ``size`` bytes into a pipe on a thread, decrypt them on this one: the peak
    traced allocation of both directions together."""
    src = _Generated(size)
    sink = _Hashing()
    rfd, wfd = os.pipe()
    errors: list[BaseException] = []

    def produce() -> None:
        try:
            with open(wfd, "wb") as w:
                encrypt_stream(KEY, PID, cast(BinaryIO, src), w, chunk_size=chunk_size)
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    tracemalloc.start()
    try:
        writer = threading.Thread(target=produce)
        writer.start()
        with open(rfd, "rb") as r:
            n = decrypt_stream_to(KEY, r, cast(BinaryIO, sink), expected_payload_id=PID)
        writer.join()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not errors
    assert n == sink.count == size
    assert sink.sha.digest() == src.sha.digest()
    return peak


@pytest.mark.parametrize("overlap", [True, False])
def test_memory_does_not_grow_with_the_stream(
    overlap: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stream_module, "_can_overlap", lambda: overlap)
    small = _round_trip_peak(8 * 1024 * 1024, 65536)
    large = _round_trip_peak(512 * 1024 * 1024 + 12_345, 65536)
    # Each direction: a few batch buffers (_READ_AHEAD of _BATCH_BYTES) and one output
    # buffer; nothing that depends on how much flows through.
    bound = 2 * (stream_module._READ_AHEAD + 2) * stream_module._BATCH_BYTES
    assert large < bound, f"peak {large} bytes for 512 MiB"
    assert large < small + 256 * 1024, f"peak {small} bytes for 8 MiB, {large} for 512 MiB"


def test_memory_follows_the_chunk_size() -> None:
    chunk = 4 * 1024 * 1024  # more than a batch: a batch is one chunk
    peak = _round_trip_peak(64 * 1024 * 1024, chunk)
    # Each direction: the first unit, the read-ahead buffers, the output, and (with
    # cryptography 38) the bytes the AEAD takes and gives: a fixed number of chunks.
    assert peak < 2 * (stream_module._READ_AHEAD + 5) * (chunk + 16), peak


def test_decrypt_bytes_of_a_small_stream_allocates_little() -> None:
    _, stream, _ = _stream(3 * CS)
    tracemalloc.start()
    try:
        decrypt_bytes(KEY, stream)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * len(stream) + 16 * 1024


# --- the read-ahead thread -------------------------------------------------------------


class _WatchingSink(_Hashing):
    def __init__(self) -> None:
        super().__init__()
        self.readers_seen = 0

    def write(self, data: bytes | memoryview) -> int:
        self.readers_seen = max(self.readers_seen, len(_readers()))
        return super().write(data)


def test_large_streams_read_ahead_on_one_helper_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(stream_module, "_can_overlap", lambda: True)
    data = os.urandom(4 * 1024 * 1024)
    stream = encrypt_bytes(KEY, PID, data)
    sink = _WatchingSink()
    assert decrypt_stream_to(KEY, io.BytesIO(stream), cast(BinaryIO, sink)) == len(data)
    assert sink.readers_seen == 1
    assert sink.sha.digest() == hashlib.sha256(data).digest()


def test_small_streams_start_no_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stream_module, "_can_overlap", lambda: True)
    data = os.urandom(200 * 1024)  # one unit, then one batch: both read in line
    sink = _WatchingSink()
    decrypt_stream_to(KEY, io.BytesIO(encrypt_bytes(KEY, PID, data)), cast(BinaryIO, sink))
    assert sink.readers_seen == 0


class _Failing(io.RawIOBase):
    """A source whose reads fail with EIO once ``good`` bytes have been read."""

    def __init__(self, data: bytes, good: int, result: str = "raise") -> None:
        self._data = io.BytesIO(data[:good])
        self._result = result

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int | None:
        n = self._data.readinto(b)
        if n:
            return n
        if self._result == "none":
            return None
        raise OSError(5, "Input/output error")


@pytest.mark.parametrize("result", ["raise", "none"])
def test_a_failing_source_surfaces_on_the_caller_and_stops_the_reader(
    batches: str, result: str
) -> None:
    _, stream, _ = _stream(SIZE)
    sink = _Peeking()
    match = "Input/output error" if result == "raise" else "non-blocking"
    with pytest.raises(OSError, match=match):
        decrypt_stream_to(
            KEY, cast(BinaryIO, _Failing(stream, len(stream) // 2, result)), cast(BinaryIO, sink)
        )
    with pytest.raises(OSError, match=match):
        encrypt_stream(
            KEY, PID, cast(BinaryIO, _Failing(os.urandom(SIZE), SIZE // 2, result)), io.BytesIO()
        )


def test_an_abandoned_generator_stops_its_reader(batches: str) -> None:
    data, stream, _ = _stream(SIZE)
    chunks = decrypt_stream(KEY, io.BytesIO(stream))
    assert next(chunks) == data[:CS]
    chunks.close()  # what dropping it does, too


class _ReadOnly:
    """A source with ``read`` and nothing else."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def read(self, n: int = -1) -> bytes:
        return self._data.read(min(n, 999))  # short reads, too


def test_a_source_without_readinto(batches: str) -> None:
    data, stream, _ = _stream(SIZE)
    out = io.BytesIO()
    encrypt_stream(KEY, PID, cast(BinaryIO, _ReadOnly(data)), out, chunk_size=CS)
    assert decrypt_bytes(KEY, out.getvalue()) == data
    sink = io.BytesIO()
    decrypt_stream_to(KEY, cast(BinaryIO, _ReadOnly(stream)), sink)
    assert sink.getvalue() == data
