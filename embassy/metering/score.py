"""Scoring an activation against neural signatures: the one formula every meter uses.

Pure numpy: no I/O, no clock. The formula is versioned by :data:`FORMULA`, which every meter
statement names, so an authority holding its own signatures and the activation can recompute
a meter delta.

Formula ``embassy-cosine-margin-v1``. An activation ``A`` of shape ``(..., d)`` is pooled to
one vector ``p``, the arithmetic mean over every axis but the last (a 1-D activation is its
own pool), accumulated in float64 and rounded to float32::

    p = float32( mean(A over axes 0 .. ndim-2) )

For one tensor name and dimension ``d``, each signature ``i`` is a (capability, polarity,
vector ``v_i``) triple, ``v_i`` taken as float32 (as the registry stores it). With
``cos(p, v) = sum_j p_j v_j / (sqrt(sum_j p_j^2) * sqrt(sum_j v_j^2))`` evaluated in float64,
for every capability ``c`` with at least one POSITIVE signature::

    pos_c = max { cos(p, v_i) : i positive for c }
    neg_c = max { cos(p, v_i) : i negative for c }          (0 if c has no negative signature)
    s_c   = max(0, pos_c - max(0, neg_c))                   in [0, 1]
    delta = round(s_c * 1_000_000)                          an integer, in micro-units

so a negative sample (an activation known NOT to be the capability) can only lower a score,
and one that points away from ``p`` does not raise it. ``round`` is round-half-to-even. If
``p`` is the zero vector every delta is 0; capabilities with only negative signatures get no
delta at all. Deltas are integers so canonical JSON never carries a float.

How it is computed, and why the result is still the float64 formula: the signatures are
L2-normalised once into one contiguous float32 ``n x d`` matrix, rows sorted by (capability,
polarity), and the cosines of ``p`` with all of them are ONE float32 matrix product; the
per-group maxima are one ``np.maximum.reduceat`` over it (10,000 signatures: one product and
a reduction, no Python loop over signatures). A float32 dot product of unit vectors is off
by at most about ``(d + 8) * 2**-24``, enough to move a micro-unit, and differently on each
BLAS or batch size. So every signature whose float32 cosine lies within
``(d + 8) * 2**-23`` of its group's float32 maximum (the true maximum always does; usually
one row per group) is recomputed in float64 from the stored float32 vectors, and the maxima
are taken over those. Deltas thus do not depend on the machine, on signature order, or on
whether ``score`` or ``score_many`` was called; a float64 recomputation by an authority
gives the same integers unless ``s_c * 10**6`` falls within ~1e-7 of a half-integer.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from embassy.errors import ActivationCorruptError

# One Polarity for the whole embassy: the instruction's wire enum ("positive"/"negative").
# instruction.py is pure too (no I/O); it must never import this module (a cycle).
from embassy.metering.instruction import Polarity

__all__ = ["FORMULA", "MICRO", "Polarity", "SignatureSet", "pool", "score", "score_many"]

FORMULA = "embassy-cosine-margin-v1"
MICRO = 1_000_000

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
Index = npt.NDArray[np.intp]


def pool(array: npt.NDArray[Any]) -> F32:
    """Mean over every axis but the last: one float32 vector of the activation's width."""
    if array.dtype.kind not in "fiu":
        raise ActivationCorruptError(f"activation: dtype {array.dtype} is not a real number type")
    if array.ndim == 0 or array.size == 0:
        raise ActivationCorruptError(f"activation: shape {array.shape} holds no vector")
    if not np.isfinite(array).all():
        raise ActivationCorruptError("activation: non-finite values")
    with np.errstate(over="ignore", invalid="ignore"):  # checked just below
        if array.ndim == 1:
            pooled = np.ascontiguousarray(array, dtype=np.float32)
        else:
            # float64 accumulation: a long float16/32 sequence must not drift with its length.
            mean = array.reshape(-1, array.shape[-1]).mean(axis=0, dtype=np.float64)
            pooled = np.ascontiguousarray(mean, dtype=np.float32)
    if not np.isfinite(pooled).all():
        raise ActivationCorruptError("activation: values beyond the float32 range")
    return pooled


def _read_only(array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    array.setflags(write=False)
    return array


@dataclass(frozen=True, slots=True, eq=False)
class SignatureSet:
    """The signatures of ONE tensor name and dimension, ready to match.

    Rows are grouped by (capability, polarity). ``matrix`` holds them as unit float32 rows
    (for the product), ``vectors`` and ``norms`` as stored (for the float64 recheck);
    ``starts`` is where each group begins, ``sizes`` its row count and ``row_group`` each
    row's group. For the i-th entry of ``capabilities``, ``positive_group[i]`` is its
    positive group and ``negative_group[i]`` its negative group, or -1 if it has none.
    """

    dim: int
    matrix: F32
    vectors: F32
    norms: F64
    starts: Index
    sizes: Index
    row_group: Index
    capabilities: tuple[str, ...]
    positive_group: Index
    negative_group: Index

    @property
    def size(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def tolerance(self) -> float:
        """Twice the worst float32 error of a unit-vector cosine of this dimension."""
        return (self.dim + 8) * 2.0**-23

    @classmethod
    def build(cls, rows: Sequence[tuple[str, Polarity, npt.NDArray[Any]]]) -> SignatureSet:
        if not rows:
            raise ValueError("signature set: no signatures")
        keys: list[tuple[str, bool]] = []  # (capability, is negative): the group order
        for capability, polarity, _ in rows:
            if not isinstance(polarity, Polarity) or not isinstance(capability, str):
                raise TypeError("signature set: rows are (capability: str, Polarity, vector)")
            keys.append((capability, polarity is Polarity.NEGATIVE))
        try:
            stacked = np.stack([np.asarray(vector, dtype=np.float32) for _, _, vector in rows])
        except ValueError:
            raise ValueError("signature set: vectors of several shapes") from None
        if stacked.ndim != 2 or stacked.shape[1] == 0:
            raise ValueError(
                f"signature set: vectors must be 1-D and non-empty, not {stacked.shape[1:]}"
            )
        # Group order: by capability, positive before negative. Order within a group is
        # irrelevant (only its maximum is used), so any permutation of rows scores the same.
        order = sorted(range(len(keys)), key=keys.__getitem__)
        vectors = np.ascontiguousarray(stacked[order])
        if not np.isfinite(vectors).all():
            raise ValueError("signature set: non-finite values in a signature vector")
        wide = vectors.astype(np.float64)
        norms = np.sqrt(np.einsum("ij,ij->i", wide, wide))
        if not (norms > 0).all():
            raise ValueError("signature set: a signature vector is all zero")
        # Divided in float64, rounded once: each unit element is within 2**-24 (relative).
        matrix = np.ascontiguousarray(wide / norms[:, None], dtype=np.float32)

        ordered = [keys[i] for i in order]
        new_group = np.array([True, *(a != b for a, b in itertools.pairwise(ordered))], dtype=bool)
        starts = np.flatnonzero(new_group).astype(np.intp)
        row_group = (np.cumsum(new_group) - 1).astype(np.intp)
        group_of = {ordered[int(s)]: g for g, s in enumerate(starts)}
        capabilities = tuple(c for c, negative in group_of if not negative)
        positive = [group_of[c, False] for c in capabilities]
        negative = [group_of.get((c, True), -1) for c in capabilities]
        return cls(
            dim=int(vectors.shape[1]),
            matrix=_read_only(matrix),
            vectors=_read_only(vectors),
            norms=_read_only(norms),
            starts=_read_only(starts),
            sizes=_read_only(np.diff(np.append(starts, len(order))).astype(np.intp)),
            row_group=_read_only(row_group),
            capabilities=capabilities,
            positive_group=_read_only(np.asarray(positive, dtype=np.intp)),
            negative_group=_read_only(np.asarray(negative, dtype=np.intp)),
        )


def _prepare(pooled: npt.NDArray[Any], dim: int) -> tuple[F64, F32, F64]:
    """The k pooled vectors widened to float64, as float32 unit rows, and their norms."""
    if pooled.ndim != 2 or pooled.shape[1] != dim:
        raise ValueError(
            f"score: pooled vectors of shape {pooled.shape} do not match signatures of "
            f"dimension {dim}"
        )
    if pooled.dtype != np.float32:
        with np.errstate(over="ignore"):  # an overflow is caught as non-finite just below
            pooled = pooled.astype(np.float32)
    # Exactly the float32 values the formula names, widened for the float64 recheck.
    wide = pooled.astype(np.float64)
    # float32 squares cannot overflow a float64 sum: the norm is finite iff every value is.
    norms = np.sqrt(np.sum(wide * wide, axis=1))
    if not np.isfinite(norms).all():
        raise ValueError("score: non-finite values in a pooled vector")
    unit = wide / np.where(norms > 0, norms, 1.0)[:, None]
    return wide, np.ascontiguousarray(unit, dtype=np.float32), norms


def _group_max(sigs: SignatureSet, cos32: F32, wide: F64, norms: F64) -> F64:
    """Exact (float64) per-group maxima for k vectors, from their k x n float32 cosines."""
    k = wide.shape[0]
    approx = np.maximum.reduceat(cos32, sigs.starts, axis=1)
    near = cos32 >= np.repeat(approx - np.float32(sigs.tolerance), sigs.sizes, axis=1)
    zero = norms == 0
    if zero.any():  # all its cosines are 0, all "near": nothing to recheck, it scores 0
        near[zero] = False
    vec_i, row_i = np.nonzero(near)  # row-major: grouped by vector
    exact = np.empty(len(row_i))
    bounds = np.searchsorted(vec_i, np.arange(k + 1))
    # A loop over the k vectors, not over signatures: one float64 product per vector over
    # its candidate rows only (usually about one per group). Per vector, not one gather of
    # all (vector, row) pairs: that would copy each vector once per candidate, and large
    # fresh temporaries cost page faults.
    for j in range(k):
        lo, hi = int(bounds[j]), int(bounds[j + 1])
        if lo < hi:
            rows = row_i[lo:hi]
            dots = sigs.vectors[rows].astype(np.float64) @ wide[j]
            exact[lo:hi] = dots / (sigs.norms[rows] * norms[j])
    out = np.full((k, len(sigs.starts)), -np.inf)
    np.maximum.at(out, (vec_i, sigs.row_group[row_i]), exact)
    return out


def _micro(sigs: SignatureSet, group_max: F64, norms: F64) -> list[dict[str, int]]:
    pos = group_max[:, sigs.positive_group]
    neg = np.maximum(0.0, group_max[:, sigs.negative_group])
    neg[:, sigs.negative_group < 0] = 0.0  # -1 ("no negatives") picked the last group
    s = np.maximum(0.0, pos - neg)
    s[norms == 0] = 0.0
    micro = np.rint(s * MICRO).astype(np.int64).tolist()
    return [dict(zip(sigs.capabilities, row, strict=True)) for row in micro]


def score(sigs: SignatureSet, pooled: npt.NDArray[Any]) -> dict[str, int]:
    """Each capability's delta (micro-units) for one pooled vector of length ``sigs.dim``."""
    if pooled.ndim != 1:
        raise ValueError(f"score: a pooled vector is 1-D, not of shape {pooled.shape}")
    wide, unit, norms = _prepare(pooled[None, :], sigs.dim)
    cos32 = (sigs.matrix @ unit[0])[None, :]  # n x d times d: one matrix-vector product
    return _micro(sigs, _group_max(sigs, cos32, wide, norms), norms)[0]


def score_many(sigs: SignatureSet, pooled_matrix: npt.NDArray[Any]) -> list[dict[str, int]]:
    """:func:`score` for k pooled vectors (a k x d matrix) in one matrix product."""
    wide, unit, norms = _prepare(pooled_matrix, sigs.dim)
    cos32 = unit @ sigs.matrix.T
    return _micro(sigs, _group_max(sigs, cos32, wide, norms), norms)
