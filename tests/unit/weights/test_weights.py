"""Encrypted model files: round trips through ``embassy weights`` and the workload's loader,
the attacker's edits (each with its own error), and the loader's memory and failure modes."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import tracemalloc
import types
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from embassy.errors import (
    WeightsChunkTamperedError,
    WeightsFileError,
    WeightsHeaderTamperedError,
    WeightsTruncatedError,
    WeightsWrongKeyError,
    WeightsWrongModelError,
    WireFormatError,
)
from embassy.weights.encrypt import encrypt_file, encrypt_stream, read_safetensors_header
from embassy.weights.format import embassy_error, inspect, parse_header
from tests.unit.weights.weights_vectors import safetensors_bytes
from workload_sdk import weights as sdk
from workload_sdk.weights import WeightsError, load_encrypted

ROOT = Path(__file__).resolve().parents[3]
KEY = bytes(range(32))
NAMES = {np.dtype("float32"): "F32", np.dtype("float16"): "F16", np.dtype("int64"): "I64"}
NAMES |= {np.dtype("uint8"): "U8", np.dtype("int8"): "I8", np.dtype("bool"): "BOOL"}
NAMES |= {np.dtype("float64"): "F64", np.dtype("int32"): "I32", np.dtype("uint64"): "U64"}
NAMES |= {np.dtype("complex64"): "C64", np.dtype("int16"): "I16", np.dtype("uint32"): "U32"}


def _write_model(
    path: Path, arrays: dict[str, npt.NDArray[Any]], metadata: dict[str, str] | None = None
) -> Path:
    dtypes = {name: NAMES[a.dtype] for name, a in arrays.items()}
    path.write_bytes(safetensors_bytes(arrays, dtypes, metadata or {}))
    return path


def _encrypt(
    tmp_path: Path, arrays: dict[str, npt.NDArray[Any]], *, chunk_size: int = 1024, **kw: Any
) -> Path:
    src = _write_model(tmp_path / "model.safetensors", arrays)
    out = tmp_path / "model.emw"
    encrypt_file(src, out, KEY, model_id="m", key_id="k", chunk_size=chunk_size, **kw)
    return out


def _load(path: Path, **kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"model_id": "m", "key_id": "k"} | kw
    return load_encrypted(path, args.pop("key", KEY), **args)


def _zoo() -> dict[str, npt.NDArray[Any]]:
    rng = np.random.default_rng(7)
    return {
        "f32": rng.standard_normal((33, 17)).astype(np.float32),
        "f16": rng.standard_normal((5, 4, 3)).astype(np.float16),
        "scalar": np.array(2.5, dtype=np.float64),
        "empty": np.zeros((0,), dtype=np.float32),
        "empty2d": np.zeros((3, 0), dtype=np.int64),
        "many": rng.integers(0, 256, 10_000, dtype=np.uint8),  # ten 1 KiB chunks
        "exact": rng.integers(-100, 100, 1024, dtype=np.int8),  # exactly one chunk
        "odd": rng.integers(0, 2**60, 131, dtype=np.uint64),  # 1048 bytes: 1024 + 24
        "tiny": np.array([True, False]),
        "c": (rng.standard_normal(9) + 1j).astype(np.complex64),
        "i16": np.arange(-7, 8, dtype=np.int16),
        "u32": np.arange(13, dtype=np.uint32),
        "i32": np.arange(1000, dtype=np.int32).reshape(10, 10, 10),
    }


@pytest.mark.parametrize("hide_names", [False, True])
@pytest.mark.parametrize("threads", [1, 2, 5])
def test_round_trip(tmp_path: Path, hide_names: bool, threads: int) -> None:
    arrays = _zoo()
    path = _encrypt(tmp_path, arrays, hide_names=hide_names)
    loaded = _load(path, threads=threads)
    assert list(loaded) == list(arrays)  # in the file's order
    for name, array in arrays.items():
        assert loaded[name].dtype == array.dtype, name
        assert loaded[name].shape == array.shape, name
        assert np.array_equal(loaded[name], array), name
        assert loaded[name].flags.c_contiguous
        assert loaded[name].flags.writeable


def test_empty_model_and_only_empty_tensors(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    assert _load(_encrypt(tmp_path / "a", {})) == {}
    only = {"e": np.zeros((0, 5), np.float32)}
    loaded = _load(_encrypt(tmp_path, only, hide_names=True))
    assert loaded["e"].shape == (0, 5)


def test_the_ciphertext_shows_no_weights_and_hidden_names_show_no_names(tmp_path: Path) -> None:
    marker = np.frombuffer(b"SECRET-WEIGHTS!!" * 256, dtype=np.uint8).copy()
    path = _encrypt(tmp_path, {"layer.secret_name": marker}, hide_names=True)
    data = path.read_bytes()
    assert b"SECRET-WEIGHTS" not in data
    assert b"secret_name" not in data
    assert "tensors" not in inspect(path)
    clear = _encrypt(tmp_path, {"layer.secret_name": marker})
    assert inspect(clear)["tensors"] == [
        {"dtype": "U8", "name": "layer.secret_name", "shape": [4096]}
    ]


def test_safetensors_package_files_are_read(tmp_path: Path) -> None:
    numpy_io = pytest.importorskip("safetensors.numpy")
    arrays = _zoo()
    src = tmp_path / "pkg.safetensors"
    numpy_io.save_file(arrays, str(src), metadata={"format": "np"})
    out = tmp_path / "pkg.emw"
    header = encrypt_file(src, out, KEY, model_id="m", key_id="k", chunk_size=4096)
    assert header.table is not None
    assert dict(header.table.metadata) == {"format": "np"}
    loaded = _load(out)
    for name, array in arrays.items():
        assert np.array_equal(loaded[name], array), name


# -- the attacker's edits ------------------------------------------------------------------


def _chunks(path: Path) -> list[sdk.Chunk]:
    fd = __import__("os").open(path, 0)
    try:
        header = sdk.read_header(fd)
    finally:
        __import__("os").close(fd)
    assert header.table is not None
    return sdk.layout(header.table, header.chunk_size, header.data_position)


def _edit(path: Path, at: int, value: bytes) -> None:
    data = bytearray(path.read_bytes())
    data[at : at + len(value)] = value
    path.write_bytes(bytes(data))


def _code(path: Path, **kw: Any) -> WeightsError:
    with pytest.raises(WeightsError) as caught:
        _load(path, **kw)
    return caught.value


def test_each_chunk_changed_names_itself(tmp_path: Path) -> None:
    path = _encrypt(tmp_path, _zoo())
    good = path.read_bytes()
    for chunk in _chunks(path):
        for at in (chunk.position, chunk.position + chunk.length):  # ciphertext, then tag
            path.write_bytes(good)
            _edit(path, at, bytes([good[at] ^ 0x80]))
            error = _code(path, threads=3)
            assert error.code == "weights-chunk-tampered"
            assert error.chunk == chunk.index
            assert f"chunk {chunk.index} (tensor {chunk.tensor} " in error.message
            assert f"offset {chunk.offset})" in error.message


def test_the_lowest_failing_chunk_is_reported_whatever_the_threads(tmp_path: Path) -> None:
    path = _encrypt(tmp_path, {"big": np.zeros(64 * 1024, np.uint8)})
    chunks = _chunks(path)
    data = path.read_bytes()
    for index in (40, 7, 55):
        at = chunks[index].position + 3
        # Flip the byte: writing a constant would change nothing when it is already there.
        _edit(path, at, bytes([data[at] ^ 0xFF]))
    for _ in range(10):
        assert _code(path, threads=4).chunk == 7


def test_a_chunk_moved_to_its_neighbours_place_fails(tmp_path: Path) -> None:
    path = _encrypt(tmp_path, {"a": np.arange(1024, dtype=np.uint8), "b": np.ones(1024, np.uint8)})
    first, second = _chunks(path)
    data = bytearray(path.read_bytes())
    a = bytes(data[first.position : first.position + 1040])
    data[first.position : first.position + 1040] = data[second.position : second.position + 1040]
    data[second.position : second.position + 1040] = a
    path.write_bytes(bytes(data))
    assert _code(path).chunk == 0


def test_a_file_of_another_model_is_refused(tmp_path: Path) -> None:
    path = _encrypt(tmp_path, _zoo())
    assert _code(path, model_id="other").code == "weights-wrong-model"
    assert _code(path, key_id="k2").code == "weights-wrong-key"
    assert _code(path, key=bytes(32)).code == "weights-wrong-key"
    assert _code(path, key=b"short").code == "weights-wrong-key"


def test_every_truncation_is_refused(tmp_path: Path) -> None:
    path = _encrypt(tmp_path, {"a": np.arange(3000, dtype=np.uint8)}, hide_names=True)
    good = path.read_bytes()
    for size in [0, 8, 15, 16, 40, len(good) - 1, len(good) - 17, *range(60, len(good), 97)]:
        path.write_bytes(good[:size])
        assert _code(path).code == "weights-truncated", size


def test_embassy_errors_match_the_sdk_codes(tmp_path: Path) -> None:
    classes = {
        "weights-malformed": WeightsFileError,
        "weights-truncated": WeightsTruncatedError,
        "weights-wrong-model": WeightsWrongModelError,
        "weights-wrong-key": WeightsWrongKeyError,
        "weights-header-tampered": WeightsHeaderTamperedError,
        "weights-chunk-tampered": WeightsChunkTamperedError,
    }
    for code, cls in classes.items():
        error = embassy_error(WeightsError(code, "why"))
        assert type(error) is cls
        assert error.code == code
        assert error.message == "why"
        assert isinstance(error, WireFormatError)
    path = _encrypt(tmp_path, _zoo())
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(WeightsTruncatedError):
        inspect(path)


def _header_bytes(**change: Any) -> bytes:
    keys = sdk.derive_keys(KEY, bytes(32), "m", "k")
    header: dict[str, Any] = {
        "chunk_size": 4096,
        "cipher": "AES-256-GCM",
        "key_commitment": keys.commitment.hex(),
        "key_id": "k",
        "model_id": "m",
        "salt": bytes(32).hex(),
        "table": {"metadata": {}, "tensors": [{"dtype": "F32", "name": "x", "shape": [2]}]},
    }
    header.update(change)
    return sdk.encode_prefix_and_header({k: v for k, v in header.items() if v is not None})


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"chunk_size": 4097}, "chunk_size"),
        ({"chunk_size": 512}, "chunk_size"),
        ({"chunk_size": True}, "chunk_size"),
        ({"cipher": "AES-128-GCM"}, "cipher"),
        ({"model_id": ""}, "model_id"),
        ({"model_id": "a b"}, "model_id"),
        ({"key_id": "x" * 200}, "key_id"),
        ({"salt": "00"}, "salt"),
        ({"key_commitment": "AB" * 32}, "key_commitment"),
        ({"extra": 1}, "unknown ['extra']"),
        ({"table": None}, "missing ['table']"),
        ({"table": {"encrypted_size": 3}}, "encrypted_size"),
        ({"table": {"metadata": {"a": 1}, "tensors": []}}, "metadata"),
        (
            {"table": {"metadata": {}, "tensors": [{"dtype": "F33", "name": "x", "shape": []}]}},
            "dtype",
        ),
        (
            {"table": {"metadata": {}, "tensors": [{"dtype": "F32", "name": "", "shape": []}]}},
            "name",
        ),
        (
            {"table": {"metadata": {}, "tensors": [{"dtype": "F32", "name": "a\n", "shape": []}]}},
            "name",
        ),
        (
            {"table": {"metadata": {}, "tensors": [{"dtype": "F32", "name": "x", "shape": [-1]}]}},
            "shape",
        ),
        (
            {
                "table": {
                    "metadata": {},
                    "tensors": [{"dtype": "F32", "name": "x", "shape": [1] * 17}],
                }
            },
            "shape",
        ),
        (
            {
                "table": {
                    "metadata": {},
                    "tensors": [{"dtype": "F32", "name": "x", "shape": [2**30, 2**30]}],
                }
            },
            "bytes",
        ),
        (
            {"table": {"metadata": {}, "tensors": [{"dtype": "U8", "name": "x", "shape": []}] * 2}},
            "twice",
        ),
    ],
)
def test_the_header_is_parsed_strictly(change: dict[str, Any], field: str) -> None:
    with pytest.raises(WeightsFileError) as caught:
        parse_header(_header_bytes(**change))
    assert caught.value.code == "weights-malformed"
    assert field in caught.value.message


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b'{"a":1,"a":1}', "duplicate"),
        (b'{"a":1.5}', "not an integer"),
        (b'{"a":NaN}', "NaN"),
        (b"[1]", "not a JSON object"),
        (b'{"a":"\xff"}', "UTF-8"),
        (b'{"b":1,"a":2}', "canonical"),
    ],
)
def test_the_header_json_is_strict(body: bytes, why: str) -> None:
    raw = struct.pack("<8sII", sdk.MAGIC, 1, len(body)) + body
    with pytest.raises(WeightsFileError, match=why):
        parse_header(raw)


def test_header_len_is_bounded() -> None:
    with pytest.raises(WeightsFileError, match="header_len"):
        parse_header(struct.pack("<8sII", sdk.MAGIC, 1, sdk.MAX_HEADER_LEN + 1))


# -- the strict safetensors reader -----------------------------------------------------------


def _st(header: dict[str, Any], data: bytes = b"", pad: bytes = b"") -> bytes:
    text = json.dumps(header).encode() + pad
    return struct.pack("<Q", len(text)) + text + data


@pytest.mark.parametrize(
    ("blob", "why"),
    [
        (b"\x01\x00", "8-byte"),
        (struct.pack("<Q", 1 << 40), "out of bounds"),
        (_st({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 3), "need 4"),
        (_st({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 5), "need 4"),
        (_st({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4), "shape"),
        (_st({"a": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 1]}}, b"\0"), "dtype"),
        (_st({"a": {"dtype": "U8", "shape": [1.0], "data_offsets": [0, 1]}}, b"\0"), "integer"),
        (
            _st({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1], "x": 1}}, b"\0"),
            "exactly",
        ),
        (
            _st(
                {
                    "a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
                    "b": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]},
                },
                b"\0" * 3,
            ),
            "overlap",
        ),
        (
            _st(
                {
                    "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
                    "b": {"dtype": "U8", "shape": [1], "data_offsets": [2, 3]},
                },
                b"\0" * 3,
            ),
            "gap",
        ),
        (_st({"__metadata__": {"a": 1}}), "__metadata__"),
        (
            struct.pack("<Q", 21) + b'{"a":{},"a":{}}      ',
            "duplicate",
        ),
        (_st({"a": {"dtype": "U8", "shape": [1], "data_offsets": [-1, 0]}}), "non-negative"),
    ],
)
def test_the_safetensors_input_is_read_strictly(blob: bytes, why: str) -> None:
    with pytest.raises(WireFormatError, match=why) as caught:
        read_safetensors_header(io.BytesIO(blob), len(blob))
    assert caught.value.message.startswith("safetensors: ")


def test_safetensors_header_padding_and_order() -> None:
    blob = _st(
        {
            "second": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]},
            "first": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
        },
        b"abc",
        pad=b"   ",
    )
    table, start = read_safetensors_header(io.BytesIO(blob), len(blob))
    assert [t.name for t in table.tensors] == ["first", "second"]  # data order
    assert start == len(blob) - 3


def test_a_failed_encryption_leaves_no_file(tmp_path: Path) -> None:
    src = tmp_path / "bad.safetensors"
    src.write_bytes(_st({"a": {"dtype": "U8", "shape": [9], "data_offsets": [0, 9]}}, b"x"))
    with pytest.raises(WireFormatError):
        encrypt_file(src, tmp_path / "out.emw", KEY, model_id="m", key_id="k")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]


def test_encrypt_stream_is_deterministic_only_with_a_fixed_salt() -> None:
    blob = safetensors_bytes({"a": np.arange(5000, dtype=np.uint8)}, {"a": "U8"}, {})

    def run(salt: bytes | None) -> bytes:
        out = io.BytesIO()
        encrypt_stream(io.BytesIO(blob), len(blob), out, KEY, model_id="m", key_id="k", salt=salt)
        return out.getvalue()

    assert run(bytes(32)) == run(bytes(32))
    assert run(None) != run(None)


# -- the loader's memory, failure and key handling --------------------------------------------


def test_extra_memory_is_bounded_by_the_chunks_not_the_model(tmp_path: Path) -> None:
    """A 64 MiB model in 1 MiB chunks: the loader allocates the arrays and a read buffer per
    thread more (at most a chunk), never the file or a tensor's ciphertext."""
    rng = np.random.default_rng(1)
    arrays = {f"layer{i}": rng.integers(0, 255, 8 << 20, dtype=np.uint8) for i in range(8)}
    path = _encrypt(tmp_path, arrays, chunk_size=1 << 20)
    del arrays
    threads = 2
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        loaded = _load(path, threads=threads)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    model = sum(a.nbytes for a in loaded.values())
    assert model == 64 << 20
    extra = peak - model
    assert extra < threads * (1 << 20), f"{extra / 2**20:.1f} MiB beyond the arrays"


def test_on_failure_every_array_is_zeroed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = {"a": np.full(5000, 7, np.uint8), "b": np.full(3000, 9, np.uint8)}
    path = _encrypt(tmp_path, arrays)
    last = _chunks(path)[-1]
    first = path.read_bytes()[last.position]
    _edit(path, last.position, bytes([first ^ 0x01]))
    made: list[npt.NDArray[Any]] = []
    real_empty = np.empty

    def spy(*args: Any, **kwargs: Any) -> Any:
        made.append(real_empty(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(np, "empty", spy)
    assert _code(path, threads=2).code == "weights-chunk-tampered"
    assert len(made) == 2
    assert all(not a.any() for a in made)


def test_wipe_key(tmp_path: Path) -> None:
    path = _encrypt(tmp_path, {"a": np.arange(10, dtype=np.uint8)})
    key = bytearray(KEY)
    _load(path, key=key, wipe_key=True)
    assert key == bytearray(32)
    key = bytearray(KEY)
    _load(path, key=key)
    assert key == bytearray(KEY)  # only when asked
    key = bytearray(KEY)
    with pytest.raises(WeightsError):
        _load(path, key=key, model_id="other", wipe_key=True)
    assert key == bytearray(32)  # on failure too
    with pytest.raises(TypeError, match="bytearray"):
        _load(path, wipe_key=True)


def test_as_torch_views_the_arrays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch is not installed here: a stand-in records what the loader asks of it."""

    class Tensor:
        def __init__(self, array: Any, dtype: Any = None) -> None:
            self.array, self.dtype = array, dtype

        def view(self, dtype: Any) -> Tensor:
            return Tensor(self.array, dtype)

    fake = types.ModuleType("torch")
    fake.from_numpy = Tensor  # type: ignore[attr-defined]
    fake.bfloat16 = "torch.bfloat16"  # type: ignore[attr-defined]
    fake.float8_e4m3fn = "torch.float8_e4m3fn"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch", fake)
    src = tmp_path / "m.safetensors"
    src.write_bytes(
        safetensors_bytes(
            {
                "h": np.array([0x3F80], np.uint16),
                "f": np.ones(2, np.float32),
                "q": np.ones(1, np.uint8),
            },
            {"h": "BF16", "f": "F32", "q": "F8_E4M3"},
            {},
        )
    )
    encrypt_file(src, tmp_path / "m.emw", KEY, model_id="m", key_id="k")
    out = _load(tmp_path / "m.emw", as_torch=True)
    assert out["h"].dtype == "torch.bfloat16"
    assert out["h"].array.dtype == np.uint16
    assert out["q"].dtype == "torch.float8_e4m3fn"
    assert out["f"].dtype is None
    assert np.array_equal(out["f"].array, np.ones(2, np.float32))


def test_the_sdk_module_imports_nothing_from_embassy() -> None:
    code = (
        "import sys, workload_sdk.weights\n"
        "bad = sorted(m for m in sys.modules if m == 'embassy' or m.startswith('embassy.'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
    source = (ROOT / "workload_sdk" / "weights.py").read_text()
    assert "import embassy" not in source
    assert "from embassy" not in source
