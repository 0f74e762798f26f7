"""Meter formula v2 (embassy-centroid-window-v2): an independent recomputation, calibration,
dilution, errors, digests, and the pinned vectors of tests/vectors/metering/.

``metering_vectors()`` also makes those vectors for scripts/gen_vectors.py.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import random
import struct
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from embassy.errors import ActivationCorruptError
from embassy.metering.formula_v2 import (
    FORMULA_V2,
    STRIDE,
    WINDOW,
    CentroidModel,
    Sample,
    fit,
    pool_windows,
    score_v2,
)
from embassy.metering.instruction import Polarity
from embassy.metering.score import pool

POS, NEG = Polarity.POSITIVE, Polarity.NEGATIVE
VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "metering"
F32 = npt.NDArray[np.float32]


# -- an independent recomputation: plain Python floats and loops, nothing shared -----------


def ref_windows(tokens: list[list[float]]) -> list[list[float]]:
    """Row 0 and the window means of one (T, d) sequence, as float32 values."""
    t, d = len(tokens), len(tokens[0])

    def f32(x: float) -> float:
        return float(struct.unpack("<f", struct.pack("<f", x))[0])

    def mean(rows: list[list[float]]) -> list[float]:
        out = []
        for j in range(d):
            acc = 0.0
            for r in rows:
                acc += r[j]
            out.append(f32(acc / len(rows)))
        return out

    rows = [mean(tokens)]
    if t > WINDOW:
        starts = list(range(0, t - WINDOW + 1, STRIDE))
        if starts[-1] + WINDOW < t:
            starts.append(t - WINDOW)
        rows += [mean(tokens[s : s + WINDOW]) for s in starts]
    return rows


def _unit(v: list[float]) -> list[float]:
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def _model(pos: dict[str, list[list[float]]], center: list[float]) -> dict[str, list[float]]:
    cents = {}
    for cap, rows in pos.items():
        acc = [0.0] * len(center)
        for r in rows:
            h = _unit([a - b for a, b in zip(_unit(r), center, strict=True)])
            acc = [a + b for a, b in zip(acc, h, strict=True)]
        cents[cap] = _unit(acc)
    return cents


def _raw(x: list[float], center: list[float], c: list[float]) -> float | None:
    if not any(x):
        return None
    z = [a - b for a, b in zip(_unit(x), center, strict=True)]
    if not any(z):
        return None
    return _dot(_unit(z), c)


def reference(
    samples: list[tuple[str, str, list[list[float]]]], rows: list[list[float]]
) -> tuple[dict[str, int], dict[str, int]]:
    """(calibration, deltas) of formula v2 as the module docstring states it."""
    pos: dict[str, list[list[float]]] = {}
    negs = [s[2] for s in samples if s[1] == "negative"]
    for cap, polarity, sample_rows in samples:
        if polarity == "positive":
            pos.setdefault(cap, []).append(sample_rows[0])
    d = len(samples[0][2][0])
    total = [0.0] * d
    for n in negs:
        total = [a + b for a, b in zip(total, _unit(n[0]), strict=True)]
    center = [x / len(negs) for x in total] if negs else [0.0] * d
    cents = _model(pos, center)
    calibration = dict.fromkeys(cents, 0)
    for n in negs:
        if len(negs) > 1:
            u = _unit(n[0])
            loo = [(a - b) / (len(negs) - 1) for a, b in zip(total, u, strict=True)]
        else:
            loo = [0.0] * d
        loo_cents = _model(pos, loo)
        for cap, c in loo_cents.items():
            for x in n:
                r = _raw(x, loo, c)
                if r is not None:
                    calibration[cap] = max(calibration[cap], math.ceil(r * 1_000_000))
    deltas = {}
    for cap, c in cents.items():
        best = 0.0
        for x in rows:
            r = _raw(x, center, c)
            if r is not None:
                best = max(best, r * 1_000_000 - calibration[cap])
        deltas[cap] = round(best)  # Python's round is half-to-even
    return calibration, deltas


# -- inputs -----------------------------------------------------------------------------


def det_floats(seed: str, n: int) -> list[float]:
    """n floats in [-1, 1) from SHA-256 of the seed: the same on every machine and numpy."""
    out: list[float] = []
    counter = 0
    while len(out) < n:
        block = hashlib.sha256(f"{seed}/{counter}".encode()).digest()
        out += [v / 2**31 - 1.0 for v in struct.unpack("<8I", block)]
        counter += 1
    return out[:n]


def det_tokens(seed: str, t: int, d: int, direction: list[float], weight: float) -> F32:
    """t x d float32 token rows: a shared offset, a ``direction`` and noise."""
    noise = np.array(det_floats(seed, t * d), dtype=np.float64).reshape(t, d)
    base = np.array(det_floats("common", d)) * 2.0  # the anisotropy every row shares
    return (base + weight * np.array(direction) + noise).astype(np.float32)


def _axis(d: int, i: int, scale: float = 3.0) -> list[float]:
    v = [0.0] * d
    v[i] = scale
    return v


def structured(d: int = 16, t: int = 20) -> list[Sample]:
    """Two capabilities along their own axes, negatives with no direction of their own."""
    samples = []
    for i in range(4):
        samples.append(
            Sample("alpha", POS, pool_windows(det_tokens(f"a{i}", t, d, _axis(d, 0), 1)))
        )
        samples.append(Sample("beta", POS, pool_windows(det_tokens(f"b{i}", t, d, _axis(d, 1), 1))))
    for i in range(6):
        cap = ("alpha", "beta")[i % 2]
        samples.append(Sample(cap, NEG, pool_windows(det_tokens(f"n{i}", t, d, [0.0] * d, 0))))
    return samples


def _plain(samples: list[Sample]) -> list[tuple[str, str, list[list[float]]]]:
    return [
        (s.capability, s.polarity.value, s.windows.astype(np.float64).tolist()) for s in samples
    ]


def _rng_samples(seed: int, d: int) -> list[Sample]:
    rng = np.random.default_rng(seed)
    out = []
    for cap in ("a", "b", "c"):
        for _ in range(int(rng.integers(1, 4))):
            tokens = rng.normal(size=(int(rng.integers(1, 30)), d)).astype(np.float32)
            out.append(
                Sample(cap, POS, pool_windows(tokens + rng.normal(size=d).astype(np.float32)))
            )
    for _ in range(int(rng.integers(1, 5))):
        tokens = rng.normal(size=(int(rng.integers(1, 30)), d)).astype(np.float32)
        out.append(Sample("a", NEG, pool_windows(tokens)))
    return out


# -- pooling ----------------------------------------------------------------------------


@pytest.mark.parametrize("t", [1, WINDOW, WINDOW + 1, 16, 21, 40])
def test_pool_windows_row0_is_v1_pool_and_windows_are_the_stated_means(t: int) -> None:
    tokens = det_tokens(f"pool{t}", t, 12, [0.0] * 12, 0)
    rows = pool_windows(tokens)
    assert rows.dtype == np.float32
    assert np.array_equal(rows[0], pool(tokens))
    assert rows.tolist() == ref_windows(tokens.astype(np.float64).tolist())
    expected = 1 if t <= WINDOW else len(ref_windows(tokens.tolist()))
    assert rows.shape == (expected, 12)


def test_pool_windows_of_a_batch_windows_each_sequence_and_1d_is_one_row() -> None:
    batch = np.stack([det_tokens(f"s{i}", 17, 8, [0.0] * 8, 0) for i in range(2)])
    rows = pool_windows(batch)
    assert np.array_equal(rows[0], pool(batch))
    per = [ref_windows(s.tolist())[1:] for s in batch.astype(np.float64)]
    assert rows[1:].tolist() == per[0] + per[1]
    vector = det_tokens("one", 1, 8, [0.0] * 8, 0)[0]
    assert pool_windows(vector).tolist() == [vector.tolist()]


def _windows_one_by_one(array: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    """The docstring's definition, one window at a time (no strided sums)."""
    row0 = pool(array)
    if array.ndim == 1 or array.shape[-2] <= WINDOW:
        return row0[None, :]
    d, t = array.shape[-1], array.shape[-2]
    starts = list(range(0, t - WINDOW + 1, STRIDE))
    if starts[-1] + WINDOW < t:
        starts.append(t - WINDOW)
    rows = [row0[None, :]]
    for seq in array.reshape(-1, t, d):
        wide = seq.astype(np.float64)
        sums = np.stack([wide[s : s + WINDOW].sum(axis=0) for s in starts])
        rows.append((sums / WINDOW).astype(np.float32))
    return np.concatenate(rows)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
@pytest.mark.parametrize(
    "shape", [(384,), (8, 16), (9, 16), (13, 8), (128, 32), (130, 8), (3, 21, 8), (2, 2, 17, 4)]
)
def test_pool_windows_strided_sums_are_the_window_by_window_ones_bit_for_bit(
    shape: tuple[int, ...], dtype: type[np.floating[Any]]
) -> None:
    rng = np.random.default_rng(sum(shape))
    array = (rng.standard_normal(shape) * rng.uniform(0.01, 1000)).astype(dtype)
    reference = _windows_one_by_one(array)
    fast = pool_windows(array)
    assert fast.dtype == reference.dtype
    assert fast.shape == reference.shape
    assert fast.tobytes() == reference.tobytes()
    # Not contiguous (a transposed view): the same bits.
    assert pool_windows(np.asfortranarray(array)).tobytes() == reference.tobytes()


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((0, 4), dtype=np.float32), "holds no vector"),
        (np.array([[1.0, np.nan]], dtype=np.float32), "non-finite"),
        (np.array([["a", "b"]]), "not a real number type"),
        (np.full((12, 2), 1e39), "float32 range"),
    ],
)
def test_pool_windows_refuses_what_pool_refuses(array: npt.NDArray[Any], message: str) -> None:
    with pytest.raises(ActivationCorruptError, match=message):
        pool_windows(array)


def test_a_window_beyond_float32_is_refused_even_if_the_whole_mean_is_not() -> None:
    tokens = np.zeros((16, 2))
    tokens[:8] = 3e38 * 8
    tokens[8:] = -3e38 * 8  # the whole mean is 0; the first window's is 2.4e39
    with pytest.raises(ActivationCorruptError, match="float32 range"):
        pool_windows(tokens)


# -- the formula --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_score_equals_an_independent_float64_recomputation_random(seed: int) -> None:
    samples = _rng_samples(seed, 10)
    model = fit(samples)
    rng = np.random.default_rng(1000 + seed)
    rows = pool_windows(rng.normal(size=(25, 10)).astype(np.float32) + samples[0].windows[0])
    calibration, deltas = reference(_plain(samples), rows.astype(np.float64).tolist())
    assert model.calibration() == calibration
    assert score_v2(model, rows) == deltas


def test_score_equals_an_independent_float64_recomputation_structured() -> None:
    samples = structured()
    model = fit(samples)
    plain = _plain(samples)
    for i, target in enumerate([_axis(16, 0), _axis(16, 1), [0.0] * 16]):
        rows = pool_windows(det_tokens(f"q{i}", 24, 16, target, 1))
        calibration, deltas = reference(plain, rows.astype(np.float64).tolist())
        assert model.calibration() == calibration
        assert score_v2(model, rows) == deltas
    assert model.capabilities == ("alpha", "beta")
    assert all(0 < t < 1_000_000 for t in model.calibration().values())


def test_the_fit_does_not_depend_on_the_order_of_samples() -> None:
    samples = structured()
    rows = pool_windows(det_tokens("order", 24, 16, _axis(16, 0), 1))
    model = fit(samples)
    for seed in range(5):
        shuffled = list(samples)
        random.Random(seed).shuffle(shuffled)
        again = fit(shuffled)
        assert again.digest == model.digest
        assert again.calibration() == model.calibration()
        assert np.array_equal(again.centroids, model.centroids)
        assert score_v2(again, rows) == score_v2(model, rows)


def test_the_right_capability_moves_and_the_other_does_not() -> None:
    model = fit(structured())
    deltas = score_v2(model, pool_windows(det_tokens("right", 24, 16, _axis(16, 1), 1)))
    assert deltas["beta"] > 100_000
    assert deltas["alpha"] == 0


def test_a_generic_input_like_the_negatives_moves_nothing() -> None:
    model = fit(structured())
    for i in range(10):
        rows = pool_windows(det_tokens(f"generic{i}", 24, 16, [0.0] * 16, 0))
        assert score_v2(model, rows) == {"alpha": 0, "beta": 0}


def test_each_written_negative_moves_nothing() -> None:
    samples = structured()
    model = fit(samples)
    for s in samples:
        if s.polarity is NEG:
            assert score_v2(model, s.windows) == {"alpha": 0, "beta": 0}


def test_without_negatives_there_is_no_calibration() -> None:
    model = fit([s for s in structured() if s.polarity is POS])
    assert model.calibration() == {"alpha": 0, "beta": 0}
    assert model.to_json()["capabilities"][0]["negatives"] == 0


def test_dilution_a_strong_positive_window_inside_noise_still_scores() -> None:
    model = fit(structured())
    noise = det_tokens("dilute", 64, 16, [0.0] * 16, 0)
    tokens = noise.copy()
    tokens[28:36] = det_tokens("hit", 8, 16, _axis(16, 0), 1)  # one whole window, 1/8 of all
    rows = pool_windows(tokens)
    deltas = score_v2(model, rows)
    assert deltas["alpha"] > 100_000
    assert deltas["beta"] == 0
    # Row 0 alone (one mean, as v1 pools) is diluted below the calibration.
    assert score_v2(model, rows[:1])["alpha"] < deltas["alpha"] // 10


def test_zero_rows_contribute_nothing() -> None:
    model = fit(structured())
    assert score_v2(model, np.zeros((3, 16), dtype=np.float32)) == {"alpha": 0, "beta": 0}
    hit = pool_windows(det_tokens("z", 24, 16, _axis(16, 0), 1))
    with_zero = np.concatenate([hit, np.zeros((1, 16), dtype=np.float32)])
    assert score_v2(model, with_zero) == score_v2(model, hit)


def test_to_json_is_integers_and_strings() -> None:
    model = fit(structured())
    doc = model.to_json()
    assert doc["formula"] == FORMULA_V2
    assert doc["digest"] == model.digest.hex()
    assert [c["capability"] for c in doc["capabilities"]] == ["alpha", "beta"]
    assert [c["positives"] for c in doc["capabilities"]] == [4, 4]
    assert {c["negatives"] for c in doc["capabilities"]} == {6}
    assert {c["capability"]: c["threshold"] for c in doc["capabilities"]} == model.calibration()
    json.dumps(doc, allow_nan=False)


# -- errors ----------------------------------------------------------------------------


def _neg(rows: F32) -> Sample:
    return Sample("alpha", NEG, rows)


@pytest.mark.parametrize(
    ("samples", "error", "message"),
    [
        ([], ValueError, "no samples"),
        ([_neg(np.ones((1, 4), dtype=np.float32))], ValueError, "no positive sample"),
        (
            [
                Sample("a", POS, np.ones((1, 4), dtype=np.float32)),
                _neg(np.ones((1, 5), np.float32)),
            ],
            ValueError,
            "dimension 5 differs from 4",
        ),
        ([Sample("a", POS, np.array([[1.0, np.nan]], np.float32))], ValueError, "non-finite"),
        ([Sample("a", POS, np.array([[1.0, 2.0], [0.0, 0.0]], np.float32))], ValueError, "zero"),
        ([Sample("a", POS, np.ones((1, 4)))], ValueError, "float32"),  # type: ignore[arg-type]
        ([Sample("a", POS, np.ones(4, np.float32))], ValueError, "m x d"),
        ([Sample("", POS, np.ones((1, 4), np.float32))], ValueError, "capability"),
        ([Sample("a", "positive", np.ones((1, 4), np.float32))], TypeError, "Polarity"),  # type: ignore[arg-type]
        (
            [Sample("a", POS, np.ones((1, 4), np.float32)), _neg(np.ones((1, 4), np.float32))],
            ValueError,
            "negatives' mean",
        ),
    ],
)
def test_fit_refuses_bad_samples(
    samples: list[Sample], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        fit(samples)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (np.ones((2, 15), np.float32), "do not match"),
        (np.ones(16, np.float32), "do not match"),
        (np.ones((0, 16), np.float32), "no rows"),
        (np.full((1, 16), np.nan, np.float32), "non-finite"),
        (np.full((1, 16), 1e300), "non-finite"),
    ],
)
def test_score_refuses_bad_rows(rows: npt.NDArray[Any], message: str) -> None:
    model = fit(structured())
    with pytest.raises(ValueError, match=message):
        score_v2(model, rows)


# -- digests -----------------------------------------------------------------------------


def test_the_digest_changes_when_any_sample_changes() -> None:
    samples = structured()
    digests = {fit(samples).digest}
    for i, s in enumerate(samples):
        for row in (0, s.windows.shape[0] - 1):
            changed = s.windows.copy()
            changed[row, 3] = np.nextafter(changed[row, 3], np.float32(np.inf))
            variant = [*samples[:i], Sample(s.capability, s.polarity, changed), *samples[i + 1 :]]
            digests.add(fit(variant).digest)
    renamed = [
        Sample("gamma" if s.capability == "beta" else s.capability, s.polarity, s.windows)
        for s in samples
    ]
    digests.add(fit(renamed).digest)
    flipped = [*samples[:-1], Sample(samples[-1].capability, POS, samples[-1].windows)]
    digests.add(fit(flipped).digest)
    assert len(digests) == 2 * len(samples) + 3


def test_the_model_is_read_only() -> None:
    model = fit(structured())
    assert isinstance(model, CentroidModel)
    with pytest.raises(ValueError, match="read-only"):
        model.centroids[0, 0] = 1.0


# -- vectors ------------------------------------------------------------------------------


def _b64(rows: F32) -> str:
    return base64.b64encode(np.ascontiguousarray(rows, dtype="<f4").tobytes()).decode()


def _sample_json(s: Sample) -> dict[str, Any]:
    return {
        "capability": s.capability,
        "polarity": s.polarity.value,
        "shape": list(s.windows.shape),
        "rows_f32le_b64": _b64(s.windows),
    }


def _array_json(a: F32) -> dict[str, Any]:
    return {"shape": list(a.shape), "f32le_b64": _b64(a)}


def _load_array(doc: dict[str, Any]) -> F32:
    data = base64.b64decode(doc["f32le_b64"])
    return np.frombuffer(data, dtype="<f4").reshape(doc["shape"]).astype(np.float32)


def _load_samples(docs: list[dict[str, Any]]) -> list[Sample]:
    return [
        Sample(
            d["capability"],
            Polarity(d["polarity"]),
            _load_array({"shape": d["shape"], "f32le_b64": d["rows_f32le_b64"]}),
        )
        for d in docs
    ]


def _vector(description: str, inputs: dict[str, Any], expect: dict[str, Any]) -> bytes:
    doc = {"description": description, "kind": "metering-v2", "input": inputs, "expect": expect}
    return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"


def metering_vectors() -> dict[str, bytes]:
    """Every file under tests/vectors/metering/, by path relative to tests/vectors/."""
    samples = structured(d=8, t=12)
    good = det_tokens("vector-activation", 20, 8, _axis(8, 0), 1)
    model = fit(samples)
    out = {
        "metering/good-v2.json": _vector(
            f"formula {FORMULA_V2}: fit the samples (rows as pool_windows returned), then "
            "pool_windows(activation) and score_v2 it",
            {"samples": [_sample_json(s) for s in samples], "activation": _array_json(good)},
            {
                "digest": model.digest.hex(),
                "calibration": model.calibration(),
                "windows_sha256": hashlib.sha256(_b64(pool_windows(good)).encode()).hexdigest(),
                "deltas": score_v2(model, pool_windows(good)),
                "model": model.to_json(),
            },
        )
    }
    ones = np.ones((1, 8), np.float32)
    nan_rows = samples[0].windows.copy()
    nan_rows[1, 2] = np.nan
    zero_rows = samples[0].windows.copy()
    zero_rows[-1] = 0.0
    nan_act = good.copy()
    nan_act[3, 3] = np.inf
    bad: dict[str, tuple[str, list[Sample], F32, dict[str, str]]] = {
        "no-samples": (
            "no samples at all",
            [],
            good,
            {"error": "ValueError", "message": "no samples"},
        ),
        "no-positive": (
            "only negative samples: no capability to meter",
            [s for s in samples if s.polarity is NEG],
            good,
            {"error": "ValueError", "message": "no positive sample"},
        ),
        "dimension-mismatch": (
            "a sample of another dimension",
            [*samples, Sample("alpha", NEG, np.ones((1, 9), np.float32))],
            good,
            {"error": "ValueError", "message": "differs from 8"},
        ),
        "sample-nan": (
            "a NaN in a sample's window row",
            [Sample("alpha", POS, nan_rows), *samples[1:]],
            good,
            {"error": "ValueError", "message": "non-finite"},
        ),
        "sample-zero-row": (
            "an all-zero row in a sample",
            [Sample("alpha", POS, zero_rows), *samples[1:]],
            good,
            {"error": "ValueError", "message": "all-zero row"},
        ),
        "positive-is-centre": (
            "the only positive equals the only negative: no direction left after centring",
            [Sample("alpha", POS, ones), Sample("beta", NEG, ones)],
            good,
            {"error": "ValueError", "message": "negatives' mean"},
        ),
        "activation-infinite": (
            "an infinite value in the activation",
            samples,
            nan_act,
            {"error": "activation-corrupt", "message": "non-finite"},
        ),
        "activation-dimension": (
            "an activation of another width than the model",
            samples,
            good[:, :7].copy(),
            {"error": "ValueError", "message": "do not match"},
        ),
    }
    for name, (description, inputs, activation, expect) in bad.items():
        out[f"metering/bad-v2-{name}.json"] = _vector(
            description,
            {"samples": [_sample_json(s) for s in inputs], "activation": _array_json(activation)},
            expect,
        )
    return out


def _run_vector(doc: dict[str, Any]) -> dict[str, Any]:
    samples = _load_samples(doc["input"]["samples"])
    try:
        model = fit(samples)
        rows = pool_windows(_load_array(doc["input"]["activation"]))
        deltas = score_v2(model, rows)
    except ActivationCorruptError as e:
        return {"error": e.code, "message": str(e)}
    except ValueError as e:
        return {"error": "ValueError", "message": str(e)}
    return {
        "digest": model.digest.hex(),
        "calibration": model.calibration(),
        "windows_sha256": hashlib.sha256(_b64(rows).encode()).hexdigest(),
        "deltas": deltas,
        "model": model.to_json(),
    }


def _vector_files() -> list[Path]:
    return sorted(VECTORS.glob("*.json"))


def test_the_vectors_are_there() -> None:
    names = {p.name for p in _vector_files()}
    assert "good-v2.json" in names
    assert len([n for n in names if n.startswith("bad-v2-")]) >= 6


@pytest.mark.parametrize("path", _vector_files(), ids=lambda p: p.stem)
def test_vector(path: Path) -> None:
    doc = json.loads(path.read_text())
    got = _run_vector(doc)
    expect = doc["expect"]
    if "error" in expect:
        assert got.get("error") == expect["error"], got
        assert expect["message"] in got["message"]
        return
    assert got == expect
    # And the independent recomputation agrees with the pinned figures.
    samples = _load_samples(doc["input"]["samples"])
    rows = pool_windows(_load_array(doc["input"]["activation"]))
    calibration, deltas = reference(_plain(samples), rows.astype(np.float64).tolist())
    assert calibration == expect["calibration"]
    assert deltas == expect["deltas"]
    assert any(v > 0 for v in deltas.values())
