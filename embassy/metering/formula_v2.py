"""Meter formula v2: group centroids, negatives as a group, calibration, max over windows.

Pure numpy: no I/O, no clock. Formula ``embassy-centroid-window-v2``. It replaces v1's
1-nearest-signature match (score.py, which stays: v1 readings stay verifiable).

Pooling. An activation ``A`` of shape ``(..., T, d)`` becomes ``m`` rows (``pool_windows``):
row 0 is exactly v1's ``pool(A)`` (the mean over every axis but the last, float64
accumulation, rounded to float32). Rows 1.. are the means of windows of ``WINDOW``
consecutive token rows, for each sequence (``A`` reshaped to ``(S, T, d)``, in sequence
order) at starts ``0, STRIDE, 2*STRIDE, ...`` while ``start + WINDOW <= T``, plus one window
ending at ``T`` when the last start leaves a tail uncovered. Each window mean is the float64
sum of its rows divided by ``WINDOW`` (a power of two), rounded to float32. A 1-D activation,
or one with ``T <= WINDOW`` (its single window would equal row 0), has row 0 only.

Fit (``fit``), for one tensor name and dimension ``d``, from ONE authority's samples (a
sample is one written activation's rows, a capability and a polarity), in float64 from the
float32 rows. Samples are first put in a canonical order, sorted by (capability, polarity,
SHA-256 of their rows), so nothing depends on the order they were written in. The model's
sums and norms are exactly rounded (``math.fsum``)::

    u(x)   = x / |x|                          |x| = sqrt(fsum_j x_j^2)
    S      = fsum_{i in N} u(row0_i)          N: EVERY negative sample, whatever capability
    mu     = S / |N|                          it was written under (mu = 0 if N is empty)
    h(x)   = (u(x) - mu) / |u(x) - mu|        centred: hidden states share a large common
                                              direction (anisotropy) that mu removes
    c_k    = unit( fsum_{i in P_k} h(row0_i) )    P_k: the positive samples of k
    r_k(x) = h(x) . c_k                       in [-1, 1]

The capabilities are those with at least one positive sample. Calibration, per capability,
from the authority's own negatives, each scored by the model fitted WITHOUT it (leave one
out: in-sample, a negative pulls mu towards itself and scores too low, and generic prompts
then move meters)::

    mu_-i  = (S - u(row0_i)) / (|N| - 1)      (0 if |N| = 1)
    c_k,-i, r_k,-i:  as above with mu_-i      (ordinary float64 sums here)
    t_k    = max(0, ceil(10**6 * max_{i in N, x in rows_i} r_k,-i(x)))     micro-units
    t_k    = 0 if the authority wrote no negative

Score (``score_v2``) of the rows ``x_0 .. x_{m-1}`` of an activation (``pool_windows``)::

    delta_k = round(max(0, max_x (10**6 * r_k(x) - t_k)))     round-half-to-even, 0..10**6

over the rows with ``|x| > 0`` and ``u(x) != mu`` (others contribute 0). So a row no closer
to ``c_k`` than the authority's most ``k``-like negative moves nothing, and a prompt unlike
every capability moves no meter. The max over rows is what resists dilution: a benign
preamble changes row 0, but the windows over the prompt itself still score. Deltas are
integers so canonical JSON never carries a float; ``calibration()`` gives the ``t_k``.

Digest: SHA-256 of the canonical JSON ``{"formula", "dim", "window", "stride",
"calibration": {k: t_k}, "samples": [[capability, polarity, rows, sha256 hex of the rows as
little-endian float32, C order], ...]}``, samples in the canonical order: everything the
model is computed from, and the integers it records.

Residual float caveat: the model's sums are exactly rounded, but the leave-one-out sums
and every dot product (calibration and score) are ordinary float64 (BLAS) arithmetic, off
by a few units in the last place depending on the machine. An authority's float64
recomputation gives the same integers unless ``10**6 * r`` falls within ~1e-9 of an integer
(the ceil of a threshold) or of a half-integer plus ``t_k`` (the round of a delta).
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from embassy.errors import ActivationCorruptError
from embassy.metering.instruction import Polarity
from embassy.metering.score import MICRO, pool
from embassy.wire.codec import canonical_json

__all__ = [
    "FORMULA_V2",
    "STRIDE",
    "WINDOW",
    "CentroidModel",
    "Sample",
    "fit",
    "pool_windows",
    "score_v2",
]

FORMULA_V2 = "embassy-centroid-window-v2"
# Token windows: 8 rows (a short phrase of MiniLM word pieces), every 4 rows, so every run of
# 5 consecutive tokens lies inside a whole window. A power of two: dividing by it is exact.
WINDOW = 8
STRIDE = 4

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


def pool_windows(array: npt.NDArray[Any]) -> F32:
    """Row 0: v1's ``pool``; rows 1..: the window means (see the module docstring).

    Each window is summed as the docstring says (its rows in order, each float32 widened
    exactly to float64), but for all windows of a sequence at once: one strided add per
    row offset, not a Python loop over windows. So the daemon's reading threads spend their
    time in numpy with the GIL released; tests/unit/test_formula_v2.py pins the bits
    against a window-by-window reference.
    """
    row0 = pool(array)  # every input check, and the exact v1 row
    if array.ndim == 1 or array.shape[-2] <= WINDOW:
        return row0[None, :]
    d, t = array.shape[-1], array.shape[-2]
    n = (t - WINDOW) // STRIDE + 1  # windows at 0, STRIDE, ... that fit
    span = (n - 1) * STRIDE + 1
    tail = span - 1 + WINDOW < t  # one more window ending at t
    per = n + int(tail)
    seqs = array.reshape(-1, t, d)
    out = np.empty((1 + len(seqs) * per, d), dtype=np.float32)
    out[0] = row0
    with np.errstate(over="ignore", invalid="ignore"):  # checked just below
        for i, seq in enumerate(seqs):
            base = 1 + i * per
            acc = seq[0:span:STRIDE].astype(np.float64)
            for k in range(1, WINDOW):
                acc += seq[k : k + span : STRIDE]
            out[base : base + n] = acc / WINDOW
            if tail:
                last = seq[t - WINDOW].astype(np.float64)
                for k in range(1, WINDOW):
                    last += seq[t - WINDOW + k]
                out[base + n] = last / WINDOW
    if not np.isfinite(out).all():
        raise ActivationCorruptError("activation: values beyond the float32 range")
    return out


@dataclass(frozen=True, slots=True)
class Sample:
    """One written activation: one signature of v2."""

    capability: str
    polarity: Polarity
    windows: F32


def _fsum_rows(rows: F64) -> F64:
    """Column sums of an ``n x d`` matrix, each exactly rounded (order-independent)."""
    return np.array([math.fsum(col) for col in rows.T.tolist()], dtype=np.float64)


def _unit_exact(v: F64) -> tuple[F64, float]:
    norm = math.sqrt(math.fsum((v * v).tolist()))
    return (v / norm if norm > 0 else v), norm


@dataclass(frozen=True, eq=False)
class CentroidModel:
    """A fitted v2 model of one authority, tensor and dimension (see ``fit``)."""

    dim: int
    capabilities: tuple[str, ...]
    digest: bytes
    center: F64 = field(repr=False)  # mu, d
    centroids: F64 = field(repr=False)  # c_k, one row per capability, K x d
    thresholds: tuple[int, ...] = field(repr=False)  # t_k, micro-units
    positives: tuple[int, ...] = field(repr=False)
    negatives: int = field(repr=False)

    def calibration(self) -> dict[str, int]:
        """Each capability's threshold ``t_k`` in micro-units (what a reading records)."""
        return dict(zip(self.capabilities, self.thresholds, strict=True))

    def to_json(self) -> dict[str, Any]:
        """A canonical, integers-and-strings description of the model."""
        return {
            "formula": FORMULA_V2,
            "dim": self.dim,
            "window": WINDOW,
            "stride": STRIDE,
            "digest": self.digest.hex(),
            "capabilities": [
                {"capability": c, "positives": p, "negatives": self.negatives, "threshold": t}
                for c, p, t in zip(self.capabilities, self.positives, self.thresholds, strict=True)
            ],
        }


def _check_rows(rows: npt.NDArray[Any], dim: int | None, what: str) -> F32:
    if not isinstance(rows, np.ndarray) or rows.dtype != np.float32:
        raise ValueError(f"{what}: rows must be a float32 array")
    if rows.ndim != 2 or rows.shape[0] == 0 or rows.shape[1] == 0:
        raise ValueError(f"{what}: rows must be a non-empty m x d matrix, not {rows.shape}")
    if dim is not None and rows.shape[1] != dim:
        raise ValueError(f"{what}: dimension {rows.shape[1]} differs from {dim}")
    if not np.isfinite(rows).all():
        raise ValueError(f"{what}: non-finite values")
    return rows


def _raw(model_center: F64, centroids: F64, rows: F32) -> F64:
    """``r_k(x)`` for every row (m x K); rows that are zero or equal to mu get -inf."""
    wide = rows.astype(np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", wide, wide))
    ok = norms > 0
    unit = wide / np.where(ok, norms, 1.0)[:, None]
    z = unit - model_center
    znorm = np.sqrt(np.einsum("ij,ij->i", z, z))
    ok &= znorm > 0
    h = z / np.where(ok, znorm, 1.0)[:, None]
    raw = h @ centroids.T
    raw[~ok] = -np.inf
    return raw


Keyed = tuple[str, str, str, Sample]  # (capability, polarity, sha256 hex of rows, sample)


def _canonical(samples: Sequence[Sample]) -> tuple[int, list[Keyed]]:
    """The checked samples' dimension, and the samples in the canonical order."""
    if not samples:
        raise ValueError("formula v2: no samples")
    dim: int | None = None
    keyed: list[Keyed] = []
    for i, sample in enumerate(samples):
        if not isinstance(sample, Sample) or not isinstance(sample.polarity, Polarity):
            raise TypeError(f"formula v2: sample {i} is not a Sample with a Polarity")
        if not isinstance(sample.capability, str) or not sample.capability:
            raise ValueError(f"formula v2: sample {i} has no capability name")
        rows = _check_rows(sample.windows, dim, f"formula v2: sample {i}")
        dim = int(rows.shape[1])
        if not (np.einsum("ij,ij->i", rows, rows) > 0).all():
            raise ValueError(f"formula v2: sample {i} has an all-zero row")
        data = np.ascontiguousarray(rows, dtype="<f4").tobytes()
        keyed.append(
            (sample.capability, sample.polarity.value, hashlib.sha256(data).hexdigest(), sample)
        )
    assert dim is not None
    keyed.sort(key=lambda k: k[:3])  # the fit never depends on the samples' order
    return dim, keyed


def _units(keyed: list[Keyed]) -> F64:
    """``u(row0)`` of each sample, in float64 with exactly rounded norms."""
    return np.stack([_unit_exact(k[3].windows[0].astype(np.float64))[0] for k in keyed])


def _norms(rows: F64, exact: bool) -> F64:
    if exact:
        return np.array([math.sqrt(math.fsum(r)) for r in (rows * rows).tolist()])
    out: F64 = np.sqrt(np.einsum("ij,ij->i", rows, rows))
    return out


def _centroids(units: F64, starts: list[int], center: F64, exact: bool) -> F64:
    """``c_k`` for each capability from its positives' ``u(row0)`` (grouped at ``starts``);
    ``exact``: every sum exactly rounded, else ordinary float64 sums."""
    z = units - center
    norms = _norms(z, exact)
    if not (norms > 0).all():
        raise ValueError("formula v2: a positive sample is the negatives' mean")
    h = z / norms[:, None]
    bounds = [*starts, len(units)]
    sums = np.stack(
        [
            _fsum_rows(h[lo:hi]) if exact else h[lo:hi].sum(axis=0)
            for lo, hi in itertools.pairwise(bounds)
        ]
    )
    norms = _norms(sums, exact)
    if not (norms > 0).all():
        raise ValueError("formula v2: the positive samples of a capability cancel out")
    out: F64 = sums / norms[:, None]
    return out


_BLOCK = 256  # leave-one-out models built at once: a 256 x K x d float64 array


def _calibrate(pos_units: F64, starts: list[int], neg: list[Keyed], neg_units: F64) -> list[int]:
    """``t_k``: each negative's rows scored by the model fitted without it (leave one out).

    The leave-one-out centroids of a block of negatives at once (a loop that refits per
    negative redoes a P x d pass each time): with ``mu_i`` the centre without negative i,
    ``|u_p - mu_i|^2 = |u_p|^2 - 2 u_p.mu_i + |mu_i|^2`` for every (p, i) is one product, and
    ``sum_p h_i(u_p) = U^T w_i - mu_i sum_p w_i`` with ``w_pi = 1/|u_p - mu_i|``."""
    n, total = len(neg), _fsum_rows(neg_units)
    pp = np.einsum("ij,ij->i", pos_units, pos_units)[:, None]
    bounds = list(itertools.pairwise([*starts, len(pos_units)]))
    best = np.full(len(starts), -np.inf)
    for first in range(0, n, _BLOCK):
        block = neg[first : first + _BLOCK]
        centers = (
            (total - neg_units[first : first + _BLOCK]) / (n - 1) if n > 1 else 0 * total[None]
        )
        sq = pp - 2.0 * (pos_units @ centers.T) + np.einsum("ij,ij->i", centers, centers)[None, :]
        if not (sq > 0).all():
            raise ValueError("formula v2: a positive sample is the negatives' mean")
        w = 1.0 / np.sqrt(sq)  # P x B
        sums = np.stack(
            [
                w[lo:hi].T @ pos_units[lo:hi] - centers * w[lo:hi].sum(axis=0)[:, None]
                for lo, hi in bounds
            ],
            axis=1,
        )  # B x K x d
        norms = np.sqrt(np.einsum("ikj,ikj->ik", sums, sums))
        if not (norms > 0).all():
            raise ValueError("formula v2: the positive samples of a capability cancel out")
        cents = sums / norms[:, :, None]
        for i, k in enumerate(block):
            raw = _raw(centers[i], cents[i], k[3].windows)
            best = np.maximum(best, raw.max(axis=0))
    # -inf: every row of every negative was skipped (equal to its centre): nothing to bound.
    return [max(0, math.ceil(float(v) * MICRO)) if math.isfinite(v) else 0 for v in best]


def fit(samples: Sequence[Sample]) -> CentroidModel:
    """The v2 model of one authority's samples (one tensor name, one dimension)."""
    dim, keyed = _canonical(samples)
    pos = [k for k in keyed if k[3].polarity is Polarity.POSITIVE]
    neg = [k for k in keyed if k[3].polarity is Polarity.NEGATIVE]
    if not pos:
        raise ValueError("formula v2: no positive sample")
    capabilities = tuple(sorted({k[0] for k in pos}))
    starts = [next(i for i, k in enumerate(pos) if k[0] == c) for c in capabilities]
    pos_units = _units(pos)
    neg_units = _units(neg) if neg else np.zeros((0, dim))
    center = _fsum_rows(neg_units) / len(neg) if neg else np.zeros(dim)
    centroids = _centroids(pos_units, starts, center, exact=True)
    thresholds = _calibrate(pos_units, starts, neg, neg_units) if neg else [0] * len(starts)
    description = {
        "formula": FORMULA_V2,
        "dim": dim,
        "window": WINDOW,
        "stride": STRIDE,
        "calibration": dict(zip(capabilities, thresholds, strict=True)),
        "samples": [[c, p, int(s.windows.shape[0]), h] for c, p, h, s in keyed],
    }
    center.setflags(write=False)
    centroids.setflags(write=False)
    return CentroidModel(
        dim=dim,
        capabilities=capabilities,
        digest=hashlib.sha256(canonical_json(description)).digest(),
        center=center,
        centroids=centroids,
        thresholds=tuple(thresholds),
        positives=tuple(sum(1 for k in pos if k[0] == c) for c in capabilities),
        negatives=len(neg),
    )


def score_v2(model: CentroidModel, windows: npt.NDArray[Any]) -> dict[str, int]:
    """Each capability's delta (micro-units) for an activation's ``pool_windows`` rows."""
    if not isinstance(windows, np.ndarray) or windows.ndim != 2 or windows.shape[1] != model.dim:
        shape = getattr(windows, "shape", None)
        raise ValueError(
            f"score v2: rows of shape {shape} do not match a model of dimension {model.dim}"
        )
    if windows.shape[0] == 0:
        raise ValueError("score v2: no rows")
    if windows.dtype != np.float32:
        with np.errstate(over="ignore"):  # an overflow is caught as non-finite just below
            windows = windows.astype(np.float32)
    if not np.isfinite(windows).all():
        raise ValueError("score v2: non-finite values in a row")
    raw = _raw(model.center, model.centroids, windows)
    t = np.asarray(model.thresholds, dtype=np.float64)
    best = (raw * MICRO - t).max(axis=0)  # a skipped row (-inf) never wins
    micro = np.rint(np.maximum(best, 0.0)).astype(np.int64).tolist()
    return dict(zip(model.capabilities, micro, strict=True))
