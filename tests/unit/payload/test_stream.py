"""The streaming AEAD of docs/protocol.md §1: round trips, every tamper case, bounded memory."""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import threading
import tracemalloc

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

import workload_sdk.stream as stream_module
from workload_sdk.stream import (
    MAGIC,
    StreamError,
    StreamHeader,
    decrypt_bytes,
    decrypt_stream,
    decrypt_stream_to,
    encrypt_bytes,
    encrypt_stream,
    read_header,
)


@pytest.fixture(autouse=True, params=["default", "read-ahead", "in-line", "cipher"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test in each way the module can run, so batch edges fall everywhere.

    read-ahead: a batch is one record (or chunk), read by the helper thread; in-line:
    three per batch, read on the caller's thread; cipher: without AESGCM's encrypt_into /
    decrypt_into, as with the workload's cryptography 38, two per batch, read ahead.
    """
    name: str = request.param
    if name == "read-ahead":
        monkeypatch.setattr(stream_module, "_BATCH_BYTES", 1)
        monkeypatch.setattr(stream_module, "_can_overlap", lambda: True)
    elif name == "in-line":
        monkeypatch.setattr(stream_module, "_BATCH_BYTES", 3 * (1024 + 16))
        monkeypatch.setattr(stream_module, "_can_overlap", lambda: False)
    elif name == "cipher":
        monkeypatch.setattr(stream_module, "_BATCH_BYTES", 2 * (1024 + 16))
        monkeypatch.setattr(stream_module, "_can_overlap", lambda: True)
        monkeypatch.setattr(stream_module, "_AEAD_INTO", False)
    return name


KEY = bytes(range(32))
PID = bytes(range(100, 116))
PREFIX = bytes.fromhex("0102030405060708")[:7]
CS = 1024
TAG = 16


def _enc(data: bytes, *, chunk_size: int = CS) -> bytes:
    return encrypt_bytes(KEY, PID, data, chunk_size=chunk_size, nonce_prefix=PREFIX)


def _split(stream: bytes, chunk_size: int = CS) -> tuple[bytes, list[bytes]]:
    (hlen,) = struct.unpack(">I", stream[8:12])
    head, body = stream[: 12 + hlen], stream[12 + hlen :]
    rec = chunk_size + TAG
    return head, [body[i : i + rec] for i in range(0, len(body), rec)]


def _fails(stream: bytes, reason: str, match: str, key: bytes = KEY) -> StreamError:
    with pytest.raises(StreamError, match=match) as info:
        decrypt_bytes(key, stream)
    assert info.value.reason == reason
    return info.value


def _reference(data: bytes, chunks: list[bytes] | None = None, *, chunk_size: int = CS) -> bytes:
    """An independent implementation of §1 straight from the spec text."""
    header = (
        f'{{"alg":"AES-256-GCM-STREAM","chunk_size":{chunk_size},'
        f'"nonce_prefix":"{PREFIX.hex()}","payload_id":"{PID.hex()}","v":1}}'
    ).encode()
    prefix = MAGIC + len(header).to_bytes(4, "big") + header
    aad = hashlib.sha256(prefix).digest()
    key = HKDF(hashes.SHA256(), 32, None, b"embassy-stream-v1" + PID).derive(KEY)
    if chunks is None:
        chunks = [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)] or [b""]
    out = [prefix]
    for i, chunk in enumerate(chunks):
        last = b"\x01" if i == len(chunks) - 1 else b"\x00"
        out.append(AESGCM(key).encrypt(PREFIX + i.to_bytes(4, "big") + last, chunk, aad))
    return b"".join(out)


# --- round trips ---------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, CS - 1, CS, CS + 1, 2 * CS, 7 * CS + 5, 50_000])
def test_round_trip(size: int) -> None:
    data = os.urandom(size)
    stream = _enc(data)
    assert decrypt_bytes(KEY, stream) == data
    assert decrypt_bytes(KEY, stream, expected_payload_id=PID) == data


@pytest.mark.parametrize(
    ("size", "chunks"), [(0, 1), (1, 1), (CS, 1), (CS + 1, 2), (3 * CS, 3), (3 * CS + 1, 4)]
)
def test_chunk_count_and_layout(size: int, chunks: int) -> None:
    _, records = _split(_enc(bytes(size)))
    assert len(records) == chunks
    assert all(len(r) == CS + TAG for r in records[:-1])
    assert len(records[-1]) == (size - (chunks - 1) * CS) + TAG


@pytest.mark.parametrize("size", [0, 1, CS, CS + 1, 5 * CS + 77])
def test_matches_an_independent_implementation_of_the_spec(size: int) -> None:
    data = os.urandom(size)
    assert _enc(data) == _reference(data)


def test_header_bytes_are_pinned() -> None:
    head, _ = _split(_enc(b""))
    assert head == (
        b"EMBSTRM1\x00\x00\x00\x84"
        b'{"alg":"AES-256-GCM-STREAM","chunk_size":1024,"nonce_prefix":"01020304050607",'
        b'"payload_id":"6465666768696a6b6c6d6e6f70717273","v":1}'
    )


def test_accepts_an_empty_last_chunk_after_full_chunks() -> None:
    # The spec allows 0..chunk_size bytes in the last chunk; our encoder never makes this
    # shape for an exact multiple, but a decoder must accept it.
    data = os.urandom(2 * CS)
    stream = _reference(data, [data[:CS], data[CS:], b""])
    assert decrypt_bytes(KEY, stream) == data


def test_default_chunk_size_and_random_nonce_prefix() -> None:
    a = encrypt_bytes(KEY, PID, b"x" * 70_000)
    b = encrypt_bytes(KEY, PID, b"x" * 70_000)
    ha, hb = read_header(io.BytesIO(a)), read_header(io.BytesIO(b))
    assert ha.chunk_size == 65536
    assert ha.nonce_prefix != hb.nonce_prefix
    assert a != b
    assert decrypt_bytes(KEY, a) == decrypt_bytes(KEY, b) == b"x" * 70_000


def test_read_header_leaves_the_source_at_chunk_zero() -> None:
    stream = _enc(b"hello")
    src = io.BytesIO(stream)
    header = read_header(src)
    assert header == StreamHeader(PID, CS, PREFIX, header.raw)
    assert src.tell() == len(header.prefix) == 12 + len(header.raw)
    assert header.aad == hashlib.sha256(stream[: src.tell()]).digest()


def test_return_values_count_bytes() -> None:
    out = io.BytesIO()
    data = os.urandom(3000)
    written = encrypt_stream(KEY, PID, io.BytesIO(data), out, chunk_size=CS)
    assert written == len(out.getvalue())
    sink = io.BytesIO()
    assert decrypt_stream_to(KEY, io.BytesIO(out.getvalue()), sink) == 3000
    assert sink.getvalue() == data


class _Trickle(io.RawIOBase):
    """A source that returns at most 7 bytes per read, like a slow pipe."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        chunk = self._data.read(min(7, len(b)))
        b[: len(chunk)] = chunk
        return len(chunk)


def test_short_reads_are_handled_both_ways() -> None:
    data = os.urandom(3 * CS + 10)
    out = io.BytesIO()
    encrypt_stream(KEY, PID, _Trickle(data), out, chunk_size=CS)  # type: ignore[arg-type]
    got = b"".join(decrypt_stream(KEY, _Trickle(out.getvalue())))  # type: ignore[arg-type]
    assert got == data


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"key": b"short"}, "input key must be 32 bytes"),
        ({"payload_id": b"x"}, "payload_id must be 16 bytes"),
        ({"chunk_size": 1023}, "chunk_size"),
        ({"chunk_size": 16 * 1024 * 1024 + 1}, "chunk_size"),
        ({"nonce_prefix": b"\x00" * 8}, "nonce_prefix must be 7 bytes"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"key": KEY, "payload_id": PID, "data": b"x", "chunk_size": CS}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        encrypt_bytes(**args)  # type: ignore[arg-type]


# --- tampering -----------------------------------------------------------------------

DATA = bytes(range(256)) * 22 + b"tail"  # 5,636 bytes: chunks 0..4 full, chunk 5 short


def _records() -> tuple[bytes, list[bytes]]:
    head, records = _split(_enc(DATA))
    assert len(records) == 6
    return head, records


def test_flip_a_byte_in_a_middle_chunk() -> None:
    head, r = _records()
    r[2] = r[2][:100] + bytes([r[2][100] ^ 1]) + r[2][101:]
    err = _fails(head + b"".join(r), "corrupt", r"^corrupt chunk 2: authentication failed")
    assert err.chunk == 2


def test_flip_a_byte_in_the_tag_of_the_last_chunk() -> None:
    head, r = _records()
    r[5] = r[5][:-1] + bytes([r[5][-1] ^ 0x80])
    _fails(head + b"".join(r), "corrupt", r"^corrupt chunk 5 \(the final one\)")


def test_chunks_before_a_corrupt_one_are_yielded_verified_and_then_it_stops() -> None:
    head, r = _records()
    r[3] = bytes(len(r[3]))
    got: list[bytes] = []
    with pytest.raises(StreamError, match="corrupt chunk 3"):
        got.extend(decrypt_stream(KEY, io.BytesIO(head + b"".join(r))))
    assert b"".join(got) == DATA[: 3 * CS]


def test_drop_the_last_chunk() -> None:
    head, r = _records()
    _fails(
        head + b"".join(r[:-1]),
        "truncated",
        r"^truncated stream: input ends after chunk 4, which is not the last chunk$",
    )


def test_drop_all_chunks() -> None:
    head, _ = _records()
    _fails(head, "truncated", r"^truncated stream: no chunk follows the header$")


def test_cut_inside_the_last_chunk() -> None:
    head, r = _records()
    _fails(head + b"".join(r)[:-5], "corrupt", r"corrupt chunk 5 \(the final one\).*cut short")


def test_cut_leaving_less_than_a_tag() -> None:
    head, r = _records()
    _fails(head + b"".join(r[:5]) + r[5][:10], "truncated", r"chunk 5 has 10 bytes")


def test_drop_a_middle_chunk() -> None:
    head, r = _records()
    del r[2]
    _fails(head + b"".join(r), "reordered", r"^reordered chunk 2: chunk 3 is in its place")


def test_swap_two_chunks() -> None:
    head, r = _records()
    r[1], r[3] = r[3], r[1]
    _fails(head + b"".join(r), "reordered", r"^reordered chunk 1: chunk 3 is in its place")


def test_duplicate_a_chunk() -> None:
    head, r = _records()
    r.insert(2, r[1])
    _fails(
        head + b"".join(r), "duplicated", r"^duplicated chunk: chunk 1 appears again at position 2"
    )


def test_move_the_last_chunk_forward() -> None:
    head, r = _records()
    # A short last chunk in the middle: the next full record read straddles it.
    r[1], r[5] = r[5], r[1]
    _fails(head + b"".join(r), "corrupt", "corrupt chunk 1")


def _with_header(stream: bytes, **changes: object) -> bytes:
    (hlen,) = struct.unpack(">I", stream[8:12])
    obj = json.loads(stream[12 : 12 + hlen])
    obj.update(changes)
    header = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return MAGIC + struct.pack(">I", len(header)) + header + stream[12 + hlen :]


def test_change_the_header_payload_id() -> None:
    stream = _with_header(_enc(DATA), payload_id=bytes(16).hex())
    _fails(stream, "corrupt", r"^corrupt chunk 0")


def test_change_the_header_nonce_prefix() -> None:
    stream = _with_header(_enc(DATA), nonce_prefix=bytes(7).hex())
    _fails(stream, "corrupt", r"^corrupt chunk 0")


def test_change_the_header_chunk_size() -> None:
    stream = _with_header(_enc(DATA), chunk_size=2048)
    _fails(stream, "corrupt", r"^corrupt chunk 0")


def test_expected_payload_id_refuses_another_payload() -> None:
    with pytest.raises(StreamError, match="stream is for payload 6465") as info:
        decrypt_bytes(KEY, _enc(DATA), expected_payload_id=bytes(16))
    assert info.value.reason == "wrong-payload"


def test_trailing_garbage_after_a_full_last_chunk() -> None:
    data = os.urandom(3 * CS)
    _fails(
        _enc(data) + b"garbage",
        "trailing-data",
        r"^trailing data: 7\+ bytes follow the last chunk \(chunk 2\)$",
    )


def test_trailing_garbage_after_a_short_last_chunk() -> None:
    # Without a length field, garbage after a short last chunk reads as part of it.
    _fails(_enc(DATA) + b"garbage", "corrupt", r"chunk 5 \(the final one\).*trailing data")


def test_trailing_stream_after_the_last_chunk() -> None:
    data = os.urandom(2 * CS)
    _, r = _split(_enc(data))
    _fails(_enc(data) + r[0], "trailing-data", r"^trailing data: 1040\+ bytes follow")


def test_wrong_key() -> None:
    _fails(_enc(DATA), "corrupt", r"^corrupt chunk 0", key=bytes(32))


# --- the header ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cut", "reason", "match"),
    [
        (0, "truncated", r"^truncated stream: empty input$"),
        (5, "truncated", r"^truncated header: input ends after 5 bytes$"),
        (8, "truncated", r"^truncated header: input ends after 8 bytes$"),
        (11, "truncated", r"^truncated header: input ends after 11 bytes$"),
        (12, "truncated", r"^truncated header: 0 of its 132 bytes"),
        (60, "truncated", r"^truncated header: 48 of its 132 bytes"),
    ],
)
def test_truncated_header(cut: int, reason: str, match: str) -> None:
    _fails(_enc(DATA)[:cut], reason, match)


def test_bad_magic() -> None:
    _fails(b"EMBSTRM2" + _enc(DATA)[8:], "bad-magic", "^bad magic")
    _fails(b"PK\x03\x04", "bad-magic", "^bad magic")


def test_header_too_large() -> None:
    _fails(
        MAGIC + struct.pack(">I", 4097) + b"{" * 4097,
        "header-too-large",
        r"^header too large: 4097 bytes \(cap 4096\)$",
    )
    _fails(MAGIC + b"\xff\xff\xff\xff", "header-too-large", "header too large")


def _raw_header(header: bytes) -> bytes:
    return MAGIC + struct.pack(">I", len(header)) + header


GOOD = {
    "alg": "AES-256-GCM-STREAM",
    "chunk_size": 1024,
    "nonce_prefix": PREFIX.hex(),
    "payload_id": PID.hex(),
    "v": 1,
}


def _json(obj: object, **kw: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), **kw).encode()  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("header", "match"),
    [
        (_json(GOOD).replace(b",", b", "), "not canonical JSON"),
        (json.dumps(GOOD).encode(), "not canonical JSON"),
        (
            json.dumps(dict(reversed(list(GOOD.items()))), separators=(",", ":")).encode(),
            "not canonical JSON",
        ),
        (_json(GOOD)[:-1] + b',"v":1}', "duplicate key 'v'"),
        (_json({**GOOD, "extra": 1}), r"unknown fields \['extra'\]"),
        (_json({k: v for k, v in GOOD.items() if k != "alg"}), r"missing fields \['alg'\]"),
        (_json({**GOOD, "v": 2}), "unsupported version 2"),
        (_json({**GOOD, "v": True}), "unsupported version True"),
        (_json({**GOOD, "v": 1.0}), "unsupported version 1.0"),
        (_json({**GOOD, "alg": "AES-128-GCM-STREAM"}), "unsupported alg"),
        (_json({**GOOD, "chunk_size": 1023}), "chunk_size must be an int"),
        (_json({**GOOD, "chunk_size": 16 * 1024 * 1024 + 1}), "chunk_size must be an int"),
        (_json({**GOOD, "chunk_size": True}), "chunk_size must be an int"),
        (_json({**GOOD, "chunk_size": "1024"}), "chunk_size must be an int"),
        (_json({**GOOD, "payload_id": PID.hex().upper()}), "payload_id must be lower-case"),
        (_json({**GOOD, "payload_id": PID.hex()[:-2]}), "payload_id must be 16 bytes"),
        (_json({**GOOD, "payload_id": "zz"}), "payload_id is not valid hex"),
        (_json({**GOOD, "nonce_prefix": 7}), "nonce_prefix must be a hex string"),
        (b"[1,2]", "not a JSON object"),
        (b'{"v":NaN}', "JSON constant NaN"),
        (b"\xff\xfe", "not UTF-8"),
        (b"{", "invalid JSON"),
        (b"", "invalid JSON"),
    ],
)
def test_strict_header(header: bytes, match: str) -> None:
    _fails(_raw_header(header) + b"x" * 32, "bad-header", f"^bad header: .*{match}")


def test_the_canonical_header_parses() -> None:
    header = read_header(io.BytesIO(_raw_header(_json(GOOD))))
    assert (header.payload_id, header.chunk_size, header.nonce_prefix) == (PID, CS, PREFIX)


# --- bounded memory ------------------------------------------------------------------

BIG = 256 * 1024 * 1024 + 12_345


class _Generated(io.RawIOBase):
    """``size`` pseudo-random bytes produced on the fly; only a 1 MiB block is held."""

    def __init__(self, size: int, block: bytes) -> None:
        self._left = size
        self._block = block
        self._pos = 0
        self.sha = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(len(b), self._left, len(self._block) - self._pos)
        b[:n] = self._block[self._pos : self._pos + n]
        self.sha.update(b[:n])
        self._pos = (self._pos + n) % len(self._block)
        self._left -= n
        return n


class _Sink:
    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.count = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.count += len(data)
        return len(data)


def test_memory_stays_bounded_on_a_256_mib_stream() -> None:
    block = os.urandom(1024 * 1024 - 3)  # not a multiple of the chunk size
    src = _Generated(BIG, block)
    sink = _Sink()
    rfd, wfd = os.pipe()
    errors: list[BaseException] = []

    def produce() -> None:
        try:
            with open(wfd, "wb") as w:
                encrypt_stream(KEY, PID, src, w)  # type: ignore[arg-type]
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    tracemalloc.start()
    try:
        writer = threading.Thread(target=produce)
        writer.start()
        with open(rfd, "rb") as r:
            n = decrypt_stream_to(KEY, r, sink, expected_payload_id=PID)  # type: ignore[arg-type]
        writer.join()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not errors
    assert n == sink.count == BIG
    assert sink.sha.digest() == src.sha.digest()
    # Both directions at once, each a few batch buffers and an output: far below 256 MiB.
    batch = max(stream_module._BATCH_BYTES, 65536 + 16)
    bound = 2 * (stream_module._READ_AHEAD + 2) * batch + 256 * 1024
    assert peak < bound, f"peak traced memory {peak} bytes"


def test_a_corrupt_stream_does_not_cost_more_memory() -> None:
    head, r = _records()
    r[4] = bytes(len(r[4]))
    stream = head + b"".join(r)
    tracemalloc.start()
    try:
        with pytest.raises(StreamError, match="corrupt chunk 4"):
            decrypt_bytes(KEY, stream)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < len(stream) + 64 * 1024
