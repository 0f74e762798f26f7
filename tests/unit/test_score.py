"""The scoring formula, against hand-computed cases and a naive per-signature reference."""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from embassy.errors import ActivationCorruptError
from embassy.metering.score import (
    FORMULA,
    MICRO,
    Polarity,
    SignatureSet,
    pool,
    score,
    score_many,
)

POS = Polarity.POSITIVE
NEG = Polarity.NEGATIVE
Row = tuple[str, Polarity, npt.NDArray[Any]]


def v(*xs: float) -> npt.NDArray[np.float64]:
    return np.array(xs, dtype=np.float64)


def reference(rows: Sequence[Row], pooled: Sequence[float]) -> dict[str, int]:
    """The module docstring's formula, one signature at a time, in float64 Python."""
    pooled = [float(np.float32(x)) for x in pooled]
    norm = math.sqrt(sum(x * x for x in pooled))
    pos: dict[str, float] = {}
    neg: dict[str, float] = {}
    for capability, polarity, vector in rows:
        vec = [float(np.float32(x)) for x in vector]  # signatures are stored as float32
        vnorm = math.sqrt(sum(x * x for x in vec))
        cos = 0.0 if norm == 0 else sum(a * b for a, b in zip(pooled, vec, strict=True))
        cos = cos / (norm * vnorm) if norm else 0.0
        into = pos if polarity is POS else neg
        into[capability] = max(into.get(capability, -math.inf), cos)
    out = {}
    for capability, p in pos.items():
        s = 0.0 if norm == 0 else max(0.0, p - max(0.0, neg.get(capability, 0.0)))
        out[capability] = round(s * MICRO)
    return out


def test_the_formula_is_named() -> None:
    assert FORMULA == "embassy-cosine-margin-v1"


def test_hand_computed_two_dimensional_cases() -> None:
    sigs = SignatureSet.build(
        [
            ("east", POS, v(1, 0)),
            ("north", POS, v(0, 1)),
            ("north", POS, v(0, 5)),  # same direction: the max, not a sum
            ("diag", POS, v(1, 1)),
        ]
    )
    assert score(sigs, v(3, 0)) == {"diag": 707107, "east": 1_000_000, "north": 0}
    assert score(sigs, v(0, 2)) == {"diag": 707107, "east": 0, "north": 1_000_000}
    # Pointing away from every signature: cosines are negative, the score floors at 0.
    assert score(sigs, v(-1, -1)) == {"diag": 0, "east": 0, "north": 0}
    # cos 60° = 0.5 exactly.
    assert score(sigs, v(1, math.sqrt(3)))["east"] == 500_000


def test_negatives_lower_the_score_and_never_raise_it() -> None:
    plain = SignatureSet.build([("c", POS, v(1, 0))])
    with_neg = SignatureSet.build([("c", POS, v(1, 0)), ("c", NEG, v(1, 1))])
    opposite_neg = SignatureSet.build([("c", POS, v(1, 0)), ("c", NEG, v(-1, -1))])
    u = v(1, 0)
    assert score(plain, u) == {"c": 1_000_000}
    # 1 - cos 45° = 0.29289...
    assert score(with_neg, u) == {"c": 292893}
    # A negative pointing away (cos < 0) is clamped to 0: it does not add to the score.
    assert score(opposite_neg, u) == {"c": 1_000_000}
    # A negative closer than every positive: 0, never below.
    assert score(with_neg, v(0, 1)) == {"c": 0}


def test_negatives_of_another_capability_do_not_matter() -> None:
    sigs = SignatureSet.build([("a", POS, v(1, 0)), ("b", POS, v(0, 1)), ("b", NEG, v(1, 0))])
    assert score(sigs, v(1, 0)) == {"a": 1_000_000, "b": 0}


def test_a_capability_with_no_positive_signature_is_absent() -> None:
    sigs = SignatureSet.build([("a", POS, v(1, 0)), ("only-neg", NEG, v(1, 0))])
    assert score(sigs, v(1, 0)) == {"a": 1_000_000}
    none = SignatureSet.build([("only-neg", NEG, v(1, 0))])
    assert none.capabilities == ()
    assert score(none, v(1, 0)) == {}


def test_the_zero_vector_scores_zero_everywhere() -> None:
    sigs = SignatureSet.build([("a", POS, v(1, 0)), ("b", POS, v(-1, 0)), ("b", NEG, v(0, 1))])
    assert score(sigs, v(0, 0)) == {"a": 0, "b": 0}
    assert pool(np.zeros((4, 2), dtype=np.float32)).tolist() == [0.0, 0.0]


def test_pool_means_every_axis_but_the_last() -> None:
    acts = np.arange(24, dtype=np.float16).reshape(2, 3, 4)
    pooled = pool(acts)
    assert pooled.dtype == np.float32
    assert pooled.shape == (4,)
    assert pooled.tolist() == acts.astype(np.float64).reshape(6, 4).mean(axis=0).tolist()
    one = np.array([1.5, -2.0], dtype=np.float64)
    assert pool(one).tolist() == [1.5, -2.0]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_pool_refuses_non_finite_activations(bad: float) -> None:
    acts = np.ones((3, 4), dtype=np.float32)
    acts[1, 2] = bad
    with pytest.raises(ActivationCorruptError, match="non-finite"):
        pool(acts)


@pytest.mark.parametrize(
    "acts", [np.zeros((0, 4)), np.float32(1.0) * np.ones(()), np.array(["a", "b"])]
)
def test_pool_refuses_what_holds_no_vector(acts: npt.NDArray[Any]) -> None:
    with pytest.raises(ActivationCorruptError):
        pool(acts)


def test_scale_invariance() -> None:
    rng = np.random.default_rng(7)
    rows: list[Row] = [
        (f"c{i % 5}", POS if i % 3 else NEG, rng.standard_normal(16)) for i in range(40)
    ]
    sigs = SignatureSet.build(rows)
    for _ in range(50):
        acts = rng.standard_normal((6, 16)).astype(np.float32)
        base = score(sigs, pool(acts))
        # Powers of two scale float32 exactly: identical integers.
        assert score(sigs, pool(acts * 1024)) == base
        assert score(sigs, pool(acts / 8)) == base
        # x10 rounds each float32 once (~6e-8 relative): at most one micro-unit apart.
        ten = score(sigs, pool(acts * 10))
        assert all(abs(ten[c] - base[c]) <= 1 for c in base)


def test_signature_order_does_not_change_scores() -> None:
    rng = np.random.default_rng(11)
    rows: list[Row] = [
        (f"c{i % 7}", POS if i % 4 else NEG, rng.standard_normal(32)) for i in range(70)
    ]
    shuffled = list(rows)
    random.Random(3).shuffle(shuffled)
    a, b = SignatureSet.build(rows), SignatureSet.build(shuffled)
    for _ in range(20):
        u = rng.standard_normal(32)
        assert score(a, u) == score(b, u)


def test_score_many_equals_a_loop_of_score() -> None:
    rng = np.random.default_rng(5)
    rows: list[Row] = [
        (f"c{i % 4}", POS if i % 2 else NEG, rng.standard_normal(24)) for i in range(30)
    ]
    sigs = SignatureSet.build(rows)
    many = rng.standard_normal((9, 24)).astype(np.float32)
    many[4] = 0.0  # a zero row among them scores 0, the others are unaffected
    assert score_many(sigs, many) == [score(sigs, row) for row in many]
    assert score_many(sigs, many[:0]) == []


def test_dimension_mismatch_is_a_precise_value_error() -> None:
    sigs = SignatureSet.build([("a", POS, v(1, 0, 0))])
    with pytest.raises(ValueError, match=r"shape \(1, 2\) do not match signatures of dimension 3"):
        score(sigs, v(1, 0))
    with pytest.raises(ValueError, match="1-D"):
        score(sigs, np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"shape \(2, 4\)"):
        score_many(sigs, np.ones((2, 4)))


def test_build_refuses_bad_signatures() -> None:
    with pytest.raises(ValueError, match="no signatures"):
        SignatureSet.build([])
    with pytest.raises(ValueError, match="several shapes"):
        SignatureSet.build([("a", POS, v(1, 0)), ("a", POS, v(1, 0, 0))])
    with pytest.raises(ValueError, match="all zero"):
        SignatureSet.build([("a", POS, v(0, 0))])
    with pytest.raises(ValueError, match="non-finite"):
        SignatureSet.build([("a", POS, v(math.nan, 0))])


def test_the_matrix_is_one_contiguous_read_only_float32_block() -> None:
    sigs = SignatureSet.build([("b", NEG, v(0, 2)), ("a", POS, v(3, 4)), ("b", POS, v(1, 0))])
    assert sigs.matrix.dtype == np.float32
    assert sigs.matrix.flags.c_contiguous
    assert not sigs.matrix.flags.writeable
    assert sigs.size == 3
    assert sigs.matrix.tolist() == [[0.6000000238418579, 0.800000011920929], [1, 0], [0, 1]]
    assert sigs.capabilities == ("a", "b")


def test_vectorised_equals_the_naive_reference_on_random_sets() -> None:
    # hypothesis is not installed here: a seeded sweep over sizes, dims and group shapes.
    rng = np.random.default_rng(20261122)
    for case in range(200):
        dim = int(rng.integers(1, 12))
        n = int(rng.integers(1, 40))
        n_caps = int(rng.integers(1, 6))
        rows: list[Row] = []
        for _ in range(n):
            vector = rng.standard_normal(dim) * float(rng.choice([1e-3, 1.0, 1e3]))
            if not np.any(vector):
                vector[0] = 1.0
            polarity = POS if rng.random() < 0.6 else NEG
            rows.append((f"cap{int(rng.integers(n_caps))}", polarity, vector))
        sigs = SignatureSet.build(rows)
        k = int(rng.integers(1, 5))
        pooled = rng.standard_normal((k, dim)).astype(np.float32)
        if case % 10 == 0:
            pooled[0] = 0.0
        got = score_many(sigs, pooled)
        for i in range(k):
            want = reference(rows, [float(x) for x in pooled[i]])
            assert got[i] == want, (case, i, got[i], want)
            assert got[i] == score(sigs, pooled[i])


def test_ten_thousand_signatures_in_one_product() -> None:
    rng = np.random.default_rng(1)
    rows: list[Row] = [
        (f"cap{i % 20}", POS if i % 3 else NEG, rng.standard_normal(384)) for i in range(10_000)
    ]
    sigs = SignatureSet.build(rows)
    assert sigs.matrix.shape == (10_000, 384)
    assert len(sigs.starts) == 40  # 20 capabilities x 2 polarities
    u = rng.standard_normal(384)
    # The reference's cosines in float64 numpy (the pure-Python loop takes seconds here).
    vectors = np.stack([r[2] for r in rows]).astype(np.float32).astype(np.float64)
    u64 = u.astype(np.float32).astype(np.float64)
    cos = vectors @ u64 / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(u64))
    best: dict[tuple[str, Polarity], float] = {}
    for (capability, polarity, _), c in zip(rows, cos.tolist(), strict=True):
        best[capability, polarity] = max(best.get((capability, polarity), -1.0), c)
    want = {
        cap: round(max(0.0, best[cap, POS] - max(0.0, best.get((cap, NEG), 0.0))) * MICRO)
        for cap, polarity in best
        if polarity is POS
    }
    assert score(sigs, u) == want
    assert any(want.values())


def test_near_ties_within_a_group_are_settled_in_float64() -> None:
    # Many rows a float32 cosine cannot tell apart: the float64 recheck picks the true max,
    # whichever row float32 happened to rank first.
    rng = np.random.default_rng(99)
    base = rng.standard_normal(64)
    rows: list[Row] = [("c", POS, base + rng.standard_normal(64) * 1e-6) for _ in range(50)] + [
        ("c", NEG, -base + rng.standard_normal(64) * 1e-6) for _ in range(5)
    ]
    sigs = SignatureSet.build(rows)
    for _ in range(20):
        u = base + rng.standard_normal(64) * 1e-3
        want = reference(rows, [float(x) for x in u])
        assert score(sigs, u) == want
        assert score_many(sigs, np.stack([u, u * 0.5]))[0] == want


def test_non_finite_pooled_vectors_are_refused() -> None:
    sigs = SignatureSet.build([("a", POS, v(1, 0))])
    for bad in (v(math.nan, 0), v(math.inf, 0), v(1e300, 0)):  # 1e300 overflows float32
        with pytest.raises(ValueError, match="non-finite"):
            score(sigs, bad)


def test_rows_must_use_this_polarity_type() -> None:
    class Other(enum.Enum):
        POSITIVE = "positive"

    with pytest.raises(TypeError, match="Polarity"):
        SignatureSet.build([("a", Other.POSITIVE, v(1, 0))])  # type: ignore[list-item]


def test_pool_refuses_values_beyond_float32() -> None:
    with pytest.raises(ActivationCorruptError, match="float32 range"):
        pool(np.array([1e300, 1.0]))
    with pytest.raises(ActivationCorruptError, match="float32 range"):
        pool(np.full((2, 2), 1e300))
