"""Activation files: the SDK's writer, the embassy's strict reader, and the format between.

The writer's output goes through the embassy's ``read_activation_file`` (round trip, every
dtype and rank); one file is built by hand from the documented offsets and compared byte for
byte; every hostile file of ``scripts/activation_vectors.py`` gets its own error class;
files that are not regular files are refused before a byte is read; random mutations raise
only ``ActivationError``; and the PyTorch hooks run on a duck-typed fake, without torch.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import random
import socket
import struct
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from embassy.errors import (
    ActivationCorruptError,
    ActivationError,
    ActivationForeignError,
    ActivationOversizedError,
    ActivationTruncatedError,
)
from embassy.metering import activation as reader
from embassy.metering.activation import Activation, parse_activation, read_activation_file
from workload_sdk import activations as sdk
from workload_sdk.activations import (
    ActivationWriteError,
    ActivationWriter,
    capture_layers,
    encode_activation,
    file_name,
    header_len_for,
    pack_header,
)
from workload_sdk.torch_hooks import record_layers

ROOT = Path(__file__).resolve().parents[2]
SESSION = bytes(range(16))
LIMIT = 1 << 20
SHAPES = [(5,), (3, 4), (2, 3, 4), (2, 1, 3, 2)]
DTYPES = ["<f4", "<f2", "<f8"]


def _load_vectors() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "activation_vectors", ROOT / "scripts" / "activation_vectors.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("activation_vectors", module)
    spec.loader.exec_module(module)
    return module


VECTORS = _load_vectors()
ERROR_CLASSES: dict[str, type[ActivationError]] = {
    cls.code: cls
    for cls in (ActivationCorruptError, ActivationTruncatedError, ActivationOversizedError)
}


def _array(dtype: str, shape: tuple[int, ...]) -> npt.NDArray[Any]:
    values = (np.arange(int(np.prod(shape)), dtype="<f8") % 4096) * 0.25 - 1  # float16-safe
    return values.astype(dtype).reshape(shape)


def _listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture
def writer(tmp_path: Path) -> ActivationWriter:
    return ActivationWriter(tmp_path, SESSION)


# ---------------------------------------------------------------------------------------
# Round trip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s)}d")
def test_round_trip_through_the_embassy_reader(
    writer: ActivationWriter, dtype: str, shape: tuple[int, ...]
) -> None:
    array = _array(dtype, shape)
    path = writer.write("model.layers.0/mlp:out-1_x", array)

    assert path == writer.directory / f"{SESSION.hex()}-000000000000.act"
    assert _listing(writer.directory) == [path.name]  # no temp file left over
    act = read_activation_file(path, max_bytes=LIMIT)
    assert act.session == SESSION
    assert act.seq == 0
    assert act.tensor == "model.layers.0/mlp:out-1_x"
    assert act.dtype == dtype
    assert act.shape == shape
    assert act.data.dtype == np.dtype(dtype)
    assert np.array_equal(act.data, array)
    assert act.sha256 == path.read_bytes()[80:112]
    assert not act.data.flags.writeable
    assert (path.stat().st_mode & 0o777) == 0o600


def test_seq_counts_up_and_names_sort_in_order(writer: ActivationWriter) -> None:
    paths = [writer.write(f"layer{i}", _array("<f4", (2, 2))) for i in range(12)]

    assert writer.count == 12
    assert [read_activation_file(p, max_bytes=LIMIT).seq for p in paths] == list(range(12))
    assert _listing(writer.directory) == [p.name for p in paths]
    assert paths[11].name == file_name(SESSION, 11) == f"{SESSION.hex()}-000000000011.act"


def test_byte_order_layout_and_width_are_converted_in_the_one_copy(
    writer: ActivationWriter,
) -> None:
    base = _array("<f8", (3, 4))
    cases = {
        "big-endian": (base.astype(">f4"), "<f4"),
        "transposed": (base.astype("<f4").T, "<f4"),
        "strided": (base[:, ::2].astype("<f2"), "<f2"),
        "big-f8": (base.astype(">f8"), "<f8"),
    }
    for name, (array, dtype) in cases.items():
        act = read_activation_file(writer.write(name, array), max_bytes=LIMIT)
        assert act.dtype == dtype, name
        assert act.shape == array.shape, name
        assert np.array_equal(act.data, array), name


BIG_CASES: dict[str, Callable[[], npt.NDArray[Any]]] = {
    "f32-2d": lambda: _array("<f4", (1200, 1100)),
    "f32-1d": lambda: _array("<f4", (1_500_001,)),
    "f16-leading-1": lambda: _array("<f2", (1, 1, 3000, 1000)),
    "f64-transposed": lambda: _array("<f8", (700, 900)).T,
    "f32-big-endian-strided": lambda: _array(">f4", (3, 1000, 2400))[:, ::2, :],
    "f32-tall-narrow": lambda: _array("<f4", (1_200_000, 3)),
}


@pytest.mark.parametrize("case", sorted(BIG_CASES))
def test_large_arrays_are_copied_and_hashed_in_blocks_correctly(
    writer: ActivationWriter, case: str
) -> None:
    """Over 4 MiB the copy and the hash run in blocks on two threads: same bytes, in order."""
    array = BIG_CASES[case]()
    assert array.nbytes >= 4 << 20
    path = writer.write("big", array)
    data = path.read_bytes()
    dtype = "<" + array.dtype.str[1:]
    header = pack_header(SESSION, 0, "big", dtype, array.shape)
    body = np.ascontiguousarray(array, dtype=dtype).tobytes()
    checksum = hashlib.sha256(header + body).digest()
    assert data == header[:80] + checksum + header[112:] + body
    act = read_activation_file(path, max_bytes=64 << 20)
    assert np.array_equal(act.data, array)


def test_a_failure_midway_through_the_blocks_closes_the_mapping_and_cleans_up(
    writer: ActivationWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = sdk._copied_blocks

    def failing(dst: npt.NDArray[Any], src: npt.NDArray[Any]) -> Any:
        for i, block in enumerate(real(dst, src)):
            if i == 3:
                raise KeyError("midway")
            yield block

    monkeypatch.setattr(sdk, "_copied_blocks", failing)
    with pytest.raises(KeyError, match="midway"):  # the error itself, not a BufferError
        writer.write("big", _array("<f4", (2048, 1024)))
    assert _listing(writer.directory) == []
    assert writer.count == 0


def test_writer_and_encode_write_the_same_bytes(writer: ActivationWriter) -> None:
    array = _array("<f2", (3, 5, 2))
    path = writer.write("same", array)
    assert path.read_bytes() == encode_activation(SESSION, 0, "same", array)


def test_a_non_finite_value_is_written_and_the_embassy_refuses_it(
    writer: ActivationWriter,
) -> None:
    array = _array("<f4", (2, 3))
    array[1, 1] = np.inf
    path = writer.write("inf", array)
    with pytest.raises(ActivationCorruptError, match=r"non-finite value inf at index \(1, 1\)"):
        read_activation_file(path, max_bytes=LIMIT)


# ---------------------------------------------------------------------------------------
# The documented layout, pinned


def test_bytes_match_the_documented_layout(writer: ActivationWriter) -> None:
    """One file built by hand from the offsets in the module docstring, not from the SDK."""
    data = np.array([[1.0, -2.0, 0.5]], dtype="<f4").tobytes()
    name = b"blk.1"
    header = b"".join(
        [
            b"\x89EMBACT\n",  # 0 magic
            struct.pack("<H", 1),  # 8 version
            struct.pack("<B", 1),  # 10 dtype float32
            struct.pack("<B", 2),  # 11 ndim
            struct.pack("<H", len(name)),  # 12 name_len
            b"\0\0",  # 14 reserved
            struct.pack("<I", 128),  # 16 header_len: 112 + 5 -> 128
            b"\0" * 4,  # 20 reserved
            SESSION,  # 24 session
            struct.pack("<Q", 0),  # 40 seq
            struct.pack("<4Q", 1, 3, 0, 0),  # 48 shape
            b"\0" * 32,  # 80 checksum, zero while hashed
            name,  # 112 name
            b"\0" * (128 - 112 - len(name)),  # padding
        ]
    )
    assert len(header) == 128
    digest = hashlib.sha256(header + data).digest()
    expected = header[:80] + digest + header[112:] + data

    path = writer.write("blk.1", np.array([[1.0, -2.0, 0.5]], dtype="<f4"))

    assert path.read_bytes() == expected
    assert pack_header(SESSION, 0, "blk.1", "<f4", (1, 3)) == header


@pytest.mark.parametrize(
    ("name_len", "header_len"), [(1, 128), (16, 128), (17, 192), (80, 192), (81, 256), (128, 256)]
)
def test_header_len_rounds_up_to_64(name_len: int, header_len: int) -> None:
    assert header_len_for(name_len) == header_len
    assert header_len_for("n" * name_len) == header_len


# ---------------------------------------------------------------------------------------
# What the writer refuses, and what it leaves behind


BAD_WRITES: dict[str, tuple[Any, Any, str]] = {
    "empty-name": ("", _array("<f4", (2,)), "bad-name"),
    "long-name": ("n" * 129, _array("<f4", (2,)), "bad-name"),
    "space": ("a b", _array("<f4", (2,)), "bad-name"),
    "non-ascii": ("mödel", _array("<f4", (2,)), "bad-name"),
    "newline": ("a\n", _array("<f4", (2,)), "bad-name"),
    "surrogate": ("a\udc80", _array("<f4", (2,)), "bad-name"),
    "not-str": (b"layer", _array("<f4", (2,)), "bad-name"),
    "ndim-0": ("x", np.ones((), dtype="<f4"), "bad-shape"),
    "ndim-5": ("x", np.ones((1, 1, 1, 1, 2), dtype="<f4"), "bad-shape"),
    "zero-dim": ("x", np.ones((3, 0), dtype="<f4"), "bad-shape"),
    "int": ("x", np.arange(4), "bad-dtype"),
    "bool": ("x", np.ones(4, dtype=bool), "bad-dtype"),
    "complex": ("x", np.ones(4, dtype=np.complex64), "bad-dtype"),
    "object": ("x", np.array([1.0, None]), "bad-dtype"),
    "list": ("x", [1.0, 2.0], "bad-array"),
}
if np.dtype(np.longdouble).itemsize not in (2, 4, 8):
    BAD_WRITES["longdouble"] = ("x", np.ones(4, dtype=np.longdouble), "bad-dtype")


@pytest.mark.parametrize("case", sorted(BAD_WRITES))
def test_writer_refuses_what_the_format_cannot_carry(writer: ActivationWriter, case: str) -> None:
    name, array, reason = BAD_WRITES[case]
    with pytest.raises(ActivationWriteError) as info:
        writer.write(name, array)
    assert info.value.reason == reason
    assert isinstance(info.value, ValueError)
    assert writer.count == 0
    assert _listing(writer.directory) == []


def test_writer_refuses_a_bad_session(tmp_path: Path) -> None:
    with pytest.raises(ActivationWriteError, match="16 bytes"):
        ActivationWriter(tmp_path, b"short")


@pytest.mark.parametrize("where", ["hash", "rename"])
def test_a_failed_write_leaves_no_file_and_does_not_advance_seq(
    writer: ActivationWriter, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    class Boom(Exception):
        pass

    def boom(*_args: Any) -> Any:
        raise Boom

    if where == "hash":  # inside the mapping, with the array view alive
        monkeypatch.setattr(hashlib, "sha256", boom)
    else:
        monkeypatch.setattr(os, "rename", boom)
    with pytest.raises(Boom):
        writer.write("x", _array("<f4", (64, 64)))
    assert _listing(writer.directory) == []
    assert writer.count == 0

    monkeypatch.undo()
    path = writer.write("x", _array("<f4", (2,)))
    assert read_activation_file(path, max_bytes=LIMIT).seq == 0


def test_writer_never_reuses_or_follows_a_planted_temp_name(
    writer: ActivationWriter, tmp_path: Path
) -> None:
    target = tmp_path / "victim"
    target.write_bytes(b"keep")
    planted = tmp_path / f".{SESSION.hex()}-0.tmp"
    planted.symlink_to(target)

    with pytest.raises(FileExistsError):
        writer.write("x", _array("<f4", (2,)))
    assert target.read_bytes() == b"keep"
    assert planted.is_symlink()  # not ours: left alone
    assert writer.count == 0


def test_concurrent_writes_get_distinct_seqs_in_order(writer: ActivationWriter) -> None:
    def work() -> None:
        for _ in range(10):
            writer.write("t", _array("<f4", (8,)))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert writer.count == 40
    names = _listing(writer.directory)
    assert names == [file_name(SESSION, i) for i in range(40)]


# ---------------------------------------------------------------------------------------
# The strict parser: every hostile vector gets its own error class


def test_vectors_are_deterministic() -> None:
    assert VECTORS.activation_vectors() == VECTORS.activation_vectors()


@pytest.mark.parametrize("name", sorted(VECTORS.activation_vectors()))
def test_each_vector_gets_its_verdict(name: str) -> None:
    data, code = VECTORS.activation_vectors()[name]
    if code is None:
        act = parse_activation(data, max_bytes=VECTORS.VECTOR_MAX_BYTES)
        assert act.session == VECTORS.SESSION
        return
    with pytest.raises(ActivationError) as info:
        parse_activation(data, max_bytes=VECTORS.VECTOR_MAX_BYTES)
    assert type(info.value) is ERROR_CLASSES[code]
    assert info.value.code == code
    assert info.value.message.startswith("activation: ")


def test_vectors_cover_every_check() -> None:
    names = set(VECTORS.activation_vectors())
    for required in (
        "good-f32-2d",
        "bad-magic",
        "bad-version",
        "bad-dtype",
        "bad-ndim-0",
        "bad-ndim-5",
        "nonzero-reserved-14",
        "nonzero-reserved-20",
        "bad-header-len",
        "bad-name",
        "nonzero-padding",
        "unused-shape-slot",
        "zero-dim",
        "truncated-header",
        "truncated-data",
        "trailing-bytes",
        "checksum",
        "nan",
        "inf",
        "oversized",
        "oversized-claim",
    ):
        assert required in names


@pytest.mark.parametrize(
    ("vector", "message"),
    [
        ("bad-header-len", "activation: header_len 256 but name of 22 bytes needs 192"),
        ("checksum", "activation: checksum mismatch"),
        ("unused-shape-slot", "activation: unused shape slot 2 is 1, not 0 (ndim 2)"),
        ("zero-dim", "activation: dimension 1 of shape (3, 0) is 0"),
        ("trailing-bytes", "activation: trailing data: 1 bytes after the end of the data"),
        ("truncated-data", "activation: 251 bytes, but header and data of shape (3, 5) need 252"),
        ("nan", "activation: non-finite value nan at index (1, 2)"),
    ],
)
def test_messages_name_the_field_and_the_values(vector: str, message: str) -> None:
    data, _ = VECTORS.activation_vectors()[vector]
    with pytest.raises(ActivationError) as info:
        parse_activation(data, max_bytes=VECTORS.VECTOR_MAX_BYTES)
    assert info.value.message == message


def test_oversized_is_decided_before_the_data_is_looked_at() -> None:
    good, _ = VECTORS.activation_vectors()["good-f32-2d"]
    # Exactly at the limit parses; one byte less of limit refuses on size alone.
    assert parse_activation(good, max_bytes=len(good)).shape == (3, 5)
    with pytest.raises(ActivationOversizedError):
        parse_activation(good, max_bytes=len(good) - 1)
    # Four dims of 2**64 - 1 claimed by a short file: oversized, not truncated, and fast.
    buf = bytearray(good)
    struct.pack_into("<B", buf, 11, 4)
    struct.pack_into("<4Q", buf, 48, *[2**64 - 1] * 4)
    with pytest.raises(ActivationOversizedError, match="header claims shape"):
        parse_activation(bytes(buf), max_bytes=LIMIT)


def test_parsed_data_is_a_read_only_view_and_activations_compare_by_checksum() -> None:
    good, _ = VECTORS.activation_vectors()["good-f32-2d"]
    one = parse_activation(good, max_bytes=LIMIT)
    two = parse_activation(bytearray(good), max_bytes=LIMIT)
    assert one == two
    assert hash(one) == hash(two)
    for act in (one, two):
        assert not act.data.flags.writeable
        with pytest.raises(ValueError, match="WRITEABLE"):
            act.data.flags.writeable = True
    assert "data=" not in repr(one)


# ---------------------------------------------------------------------------------------
# Random mutations: nothing but ActivationError, ever


def _seal(buf: bytearray) -> bytes:
    buf[80:112] = bytes(32)
    buf[80:112] = hashlib.sha256(buf).digest()
    return bytes(buf)


def _mutate(rng: random.Random, good: bytes) -> bytes:
    buf = bytearray(good)
    kind = rng.randrange(7)
    if kind == 0:  # flip bytes anywhere
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
    elif kind == 1:  # truncate
        del buf[rng.randrange(len(buf)) :]
    elif kind == 2:  # extend
        buf += rng.randbytes(rng.randint(1, 300))
    elif kind == 3:  # a header field set to an edge value, checksum recomputed
        offset, fmt = rng.choice(
            [(8, "<H"), (10, "<B"), (11, "<B"), (12, "<H"), (14, "<H"), (16, "<I"), (20, "<I")]
            + [(40, "<Q")]
            + [(48 + 8 * i, "<Q") for i in range(4)]
        )
        bits = struct.calcsize(fmt) * 8
        value = rng.choice([0, 1, 2, 3, 4, 5, 63, 64, 128, 129, 192, 2 ** (bits - 1)])
        value = rng.choice([value, 2**bits - 1, rng.getrandbits(bits)])
        struct.pack_into(fmt, buf, offset, value % 2**bits)
        return _seal(buf)
    elif kind == 4:  # bytes in name, padding or data changed, checksum recomputed
        for _ in range(rng.randint(1, 3)):
            buf[rng.randrange(112, len(buf))] = rng.randrange(256)
        return _seal(buf)
    elif kind == 5:  # pure noise behind a valid magic
        return good[:8] + rng.randbytes(rng.randint(0, 400))
    else:  # pure noise
        return rng.randbytes(rng.randint(0, 400))
    return bytes(buf)


def test_random_mutations_raise_only_activation_errors() -> None:
    rng = random.Random(20260601)
    goods = [d for d, code in VECTORS.activation_vectors().values() if code is None]
    seen: dict[str, int] = {}
    for _ in range(6000):
        data = _mutate(rng, rng.choice(goods))
        try:
            act = parse_activation(data, max_bytes=VECTORS.VECTOR_MAX_BYTES)
        except ActivationError as exc:
            seen[exc.code] = seen.get(exc.code, 0) + 1
        else:  # a mutation that still parses must be a fully valid file
            assert act.data.size == int(np.prod(act.shape))
            assert np.isfinite(act.data).all()
            seen["ok"] = seen.get("ok", 0) + 1
    # The fuzz reaches every verdict, so it exercises the checks and not just the magic.
    assert set(seen) >= {
        "activation-corrupt",
        "activation-truncated",
        "activation-oversized",
        "ok",
    }


# ---------------------------------------------------------------------------------------
# read_activation_file: only a regular file with one link, and never more than the limit


@pytest.fixture
def good_file(writer: ActivationWriter) -> Path:
    return writer.write("x", _array("<f4", (4, 4)))


def test_a_symlink_is_refused_even_to_a_good_file(good_file: Path) -> None:
    link = good_file.with_name("link.act")
    link.symlink_to(good_file)
    with pytest.raises(ActivationForeignError, match="not a regular file"):
        read_activation_file(link, max_bytes=LIMIT)


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.act"
    os.mkfifo(fifo)
    with pytest.raises(ActivationForeignError, match="not a regular file"):
        read_activation_file(fifo, max_bytes=LIMIT)


def test_a_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "dir.act").mkdir()
    with pytest.raises(ActivationForeignError, match="not a regular file"):
        read_activation_file(tmp_path / "dir.act", max_bytes=LIMIT)


def test_a_socket_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.act"
    if len(str(path)) > 100:
        pytest.skip("temporary path too long for a Unix socket")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        with pytest.raises(ActivationForeignError, match="not a regular file"):
            read_activation_file(path, max_bytes=LIMIT)


def test_a_hard_link_is_refused_under_either_name(good_file: Path) -> None:
    other = good_file.with_name("other.act")
    os.link(good_file, other)
    for path in (good_file, other):
        with pytest.raises(ActivationForeignError, match="2 links"):
            read_activation_file(path, max_bytes=LIMIT)


def test_an_oversized_file_is_refused_from_its_size_without_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    huge = tmp_path / "huge.act"
    with huge.open("wb") as f:
        f.truncate(1 << 40)  # sparse: a TiB that is never read

    def no_read(*_args: Any) -> int:
        raise AssertionError("read despite the size")

    monkeypatch.setattr(os, "readv", no_read)
    with pytest.raises(ActivationOversizedError, match=f"{1 << 40} bytes"):
        read_activation_file(huge, max_bytes=LIMIT)


def test_the_reader_stops_at_the_limit_when_a_file_grows_after_fstat(tmp_path: Path) -> None:
    path = tmp_path / "grow"
    path.write_bytes(bytes(range(200)))
    fd = os.open(path, os.O_RDONLY)
    try:
        # fstat said 2 bytes; the file has 200: read on, but not past limit.
        assert reader._read_bounded(fd, 2, 150) == bytes(range(150))
        os.lseek(fd, 0, os.SEEK_SET)
        assert reader._read_bounded(fd, 2, 1000) == bytes(range(200))
        os.lseek(fd, 0, os.SEEK_SET)
        assert reader._read_bounded(fd, 500, 1000) == bytes(range(200))
    finally:
        os.close(fd)


def test_read_activation_file_parses_a_good_file(good_file: Path) -> None:
    act = read_activation_file(good_file, max_bytes=LIMIT)
    assert isinstance(act, Activation)
    assert act.shape == (4, 4)
    size = good_file.stat().st_size
    assert read_activation_file(good_file, max_bytes=size).shape == (4, 4)
    with pytest.raises(ActivationOversizedError):
        read_activation_file(good_file, max_bytes=size - 1)


# ---------------------------------------------------------------------------------------
# Capturing layers: the numpy callback and the (duck-typed) PyTorch hooks


def test_capture_layers_writes_only_the_named_layers(writer: ActivationWriter) -> None:
    callback = capture_layers(writer, ["b", "d"])
    for layer in "abcd":
        callback(layer, _array("<f4", (2,)))
    assert writer.count == 2
    tensors = [
        read_activation_file(p, max_bytes=LIMIT).tensor for p in sorted(writer.directory.iterdir())
    ]
    assert tensors == ["b", "d"]


def test_capture_layers_checks_names_up_front(writer: ActivationWriter) -> None:
    with pytest.raises(ActivationWriteError, match="tensor name"):
        capture_layers(writer, ["ok", "not ok"])


class FakeTensor:
    """The four tensor methods the hook calls, recorded."""

    def __init__(self, array: npt.NDArray[Any]) -> None:
        self.array = array
        self.calls: list[str] = []

    def detach(self) -> FakeTensor:
        self.calls.append("detach")
        return self

    def to(self, device: str) -> FakeTensor:
        self.calls.append(f"to:{device}")
        return self

    def float(self) -> FakeTensor:
        self.calls.append("float")
        self.array = self.array.astype(np.float32)
        return self

    def numpy(self) -> npt.NDArray[Any]:
        self.calls.append("numpy")
        return self.array


class FakeHandle:
    def __init__(self, module: FakeModule, hook: Callable[[Any, Any, Any], Any]) -> None:
        self.module = module
        self.hook = hook

    def remove(self) -> None:
        self.module.hooks.remove(self.hook)


class FakeModule:
    def __init__(self, output: Any) -> None:
        self.output = output
        self.hooks: list[Callable[[Any, Any, Any], Any]] = []

    def register_forward_hook(self, hook: Callable[[Any, Any, Any], Any]) -> FakeHandle:
        self.hooks.append(hook)
        return FakeHandle(self, hook)

    def __call__(self, *inputs: Any) -> Any:
        for hook in list(self.hooks):
            assert hook(self, inputs, self.output) is None  # the output is left alone
        return self.output


class FakeModel:
    def __init__(self, modules: dict[str, FakeModule]) -> None:
        self.modules = modules

    def get_submodule(self, target: str) -> FakeModule:
        try:
            return self.modules[target]
        except KeyError:
            raise AttributeError(f"no submodule {target}") from None

    def forward(self) -> None:
        for module in self.modules.values():
            module()


def test_record_layers_hooks_writes_and_unhooks(writer: ActivationWriter) -> None:
    plain = FakeTensor(_array("<f8", (2, 3)))
    first = FakeTensor(_array("<f2", (1, 4, 2)))
    model = FakeModel(
        {
            "embed": FakeModule(FakeTensor(_array("<f4", (3,)))),
            "layers.0": FakeModule(plain),
            "layers.1": FakeModule((first, "cache")),
        }
    )
    with record_layers(model, ["layers.0", "layers.1", "layers.0"], writer):
        assert [len(m.hooks) for m in model.modules.values()] == [0, 1, 1]
        model.forward()
        model.forward()
    assert [len(m.hooks) for m in model.modules.values()] == [0, 0, 0]
    model.forward()  # unhooked: nothing more written

    assert writer.count == 4
    acts = [read_activation_file(p, max_bytes=LIMIT) for p in sorted(writer.directory.iterdir())]
    assert [a.tensor for a in acts] == ["layers.0", "layers.1", "layers.0", "layers.1"]
    assert all(a.dtype == "<f4" for a in acts)
    assert np.array_equal(acts[0].data, plain.array)
    assert np.array_equal(acts[1].data, first.array)
    assert plain.calls[:4] == ["detach", "to:cpu", "float", "numpy"]


def test_record_layers_unhooks_on_error_and_checks_names_first(writer: ActivationWriter) -> None:
    model = FakeModel({"a": FakeModule(FakeTensor(_array("<f4", (2,))))})
    with pytest.raises(RuntimeError, match="inside"), record_layers(model, ["a"], writer):
        raise RuntimeError("inside")
    assert model.modules["a"].hooks == []

    with (
        pytest.raises(AttributeError, match="missing"),
        record_layers(model, ["a", "missing"], writer),
    ):
        pass
    with pytest.raises(ActivationWriteError), record_layers(model, ["a", "bad name"], writer):
        pass
    assert model.modules["a"].hooks == []
    assert writer.count == 0


def test_the_sdk_does_not_import_embassy_or_torch() -> None:
    for module in (sdk, sys.modules["workload_sdk.torch_hooks"]):
        source = Path(str(module.__file__)).read_text()
        assert "import embassy" not in source
        assert "from embassy" not in source
        assert "import torch" not in source
