"""What matching one activation against the registry's signatures costs.

Run from the repository root::

    OPENBLAS_NUM_THREADS=1 .venv/bin/python -m benchmarks.metering_match [--quick] [--dir DIR]

For signature sets of 100, 1,000 and 10,000 signatures of dimension 384 over 20
capabilities (two thirds positive, one third negative; random normal vectors), it times
``score(sigs, p)`` on a fresh pooled vector per call against the baseline, measured in the
same run on the same matrix with the calls interleaved: the bare float32 product
``sigs.matrix @ u`` (u already unit length), the floor under any cosine matcher. Likewise
``score_many`` for 64 vectors at once (per vector) against the bare ``U @ matrix.T``. Then:
a worst case for the float64 recheck (10,000 identical signatures, so every row is within
the float32 tolerance of its group's maximum and is recomputed), ``SignatureSet.build`` of
10,000 signatures, the registry's ``signature_set`` load of 10,000 committed signatures
from SQLite (a fresh ``Registry`` per sample, so the cache is cold), and, for scale, one
``stage_update`` + ``commit`` (two fsync'd transactions) and the one-off staging of the
10,000 signatures. The temporary directory (``--dir``: its parent) is removed at the end.

``OPENBLAS_NUM_THREADS=1``: on a small VM shared with other work, OpenBLAS's thread
hand-offs make the multi-threaded products' times erratic (milliseconds for a 100-row
product); one thread gives stable, comparable figures. The footer says which was used.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from benchmarks.stats import percentile
from embassy.metering.registry import Registry, SignatureRow
from embassy.metering.score import F32, Polarity, SignatureSet, pool, score, score_many

DIM = 384
CAPABILITIES = 20
SIZES = (100, 1_000, 10_000)
BATCH = 64


def _timed(fns: Sequence[Callable[[int], object]], n: int, warmup: int) -> list[list[float]]:
    """Microseconds per call of each ``fn(i)``, the calls interleaved (so a burst of other
    work on the machine hits all of them alike), the GC paused during the timed loop."""
    for i in range(warmup):
        for fn in fns:
            fn(i)
    samples = [[0.0] * n for _ in fns]
    clock = time.perf_counter_ns
    gc.disable()
    try:
        for i in range(n):
            for fn, out in zip(fns, samples, strict=True):
                t0 = clock()
                fn(i)
                out[i] = (clock() - t0) / 1e3
    finally:
        gc.enable()
    return [sorted(x) for x in samples]


def _rows(rng: np.random.Generator, n: int) -> list[tuple[str, Polarity, F32]]:
    return [
        (
            f"cap{i % CAPABILITIES:02d}",
            Polarity.NEGATIVE if i % 3 == 0 else Polarity.POSITIVE,
            rng.standard_normal(DIM).astype(np.float32),
        )
        for i in range(n)
    ]


def _fmt(us: float) -> str:
    return f"{us / 1000:,.2f} ms" if us >= 1000 else f"{us:,.1f} µs"


class Table:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.p50: dict[str, float] = {}

    def add(self, key: str, label: str, samples: list[float], per: int = 1) -> None:
        p50 = percentile(samples, 50) / per
        p99 = percentile(samples, 99) / per
        self.p50[key] = p50
        mean = statistics.fmean(samples) / per
        self.lines.append(
            f"{label:<52} {len(samples):>6}  {_fmt(p50):>10}  {_fmt(p99):>10}  {_fmt(mean):>10}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    parser.add_argument("--dir", type=Path, default=None, help="parent of the temporary dir")
    args = parser.parse_args(argv)
    n_score = 300 if args.quick else 3000
    n_load = 5 if args.quick else 30
    rng = np.random.default_rng(2026)
    load = os.getloadavg()[0]
    cpus = os.cpu_count() or 1
    if load > cpus / 2:
        print(f"warning: load average {load:.2f} on {cpus} CPUs: figures will be noisy")
    table = Table()
    # One fresh pooled vector per call, made up front: pool() of a (16 x d) activation.
    pooled = [pool(rng.standard_normal((16, DIM)).astype(np.float32)) for _ in range(n_score)]
    units = [(p / np.linalg.norm(p)).astype(np.float32) for p in pooled]
    many = np.stack(pooled[:BATCH])

    unit_many = np.stack(units[:BATCH])
    for size in SIZES:
        sigs = SignatureSet.build(_rows(rng, size))

        def bare(i: int, m: F32 = sigs.matrix) -> object:
            return m @ units[i]

        def one(i: int, s: SignatureSet = sigs) -> object:
            return score(s, pooled[i])

        def bare_many(i: int, m: F32 = sigs.matrix) -> object:
            return unit_many @ m.T

        def many_at_once(i: int, s: SignatureSet = sigs) -> object:
            return score_many(s, many)

        base, scored = _timed([bare, one], n_score, 50)
        table.add(f"base{size}", f"baseline: matrix @ u ({size:,} x {DIM})", base)
        table.add(f"score{size}", f"score, {size:,} signatures", scored)
        base, scored = _timed([bare_many, many_at_once], max(20, n_score // 20), 5)
        table.add(f"basemany{size}", f"baseline: U @ matrix.T (k={BATCH}, per vector)", base, BATCH)
        table.add(
            f"many{size}", f"score_many, {size:,} signatures (k={BATCH}, per vector)", scored, BATCH
        )

    same = np.ones(DIM, dtype=np.float32)
    identical = SignatureSet.build(
        [(f"cap{i % CAPABILITIES:02d}", Polarity.POSITIVE, same) for i in range(10_000)]
    )
    (worst,) = _timed([lambda i: score(identical, pooled[i])], max(30, n_score // 10), 5)
    table.add("worst", "score, 10,000 identical signatures (all rechecked)", worst)

    rows10k = _rows(rng, 10_000)
    (build,) = _timed([lambda i: SignatureSet.build(rows10k)], n_load, 2)
    table.add("build", "SignatureSet.build, 10,000 signatures", build)

    with tempfile.TemporaryDirectory(prefix="embassy-bench-", dir=args.dir) as tmp:
        path = Path(tmp) / "registry.sqlite"
        with Registry.open(path) as reg:
            t0 = time.perf_counter()
            batch = reg.stage_signatures(
                [SignatureRow(c, "aisi", p, "layer.12", v) for c, p, v in rows10k]
            )
            reg.commit(batch, 1)
            stage_s = time.perf_counter() - t0

            def update(i: int) -> None:
                reg.commit(reg.stage_update("ab" * 16, "cd" * 32, {"cap01": 1, "cap02": 2}), i + 2)

            (updates,) = _timed([update], max(20, n_score // 10), 5)
            table.add("update", "stage_update + commit (2 fsync'd transactions)", updates)

        def load_once(_: int) -> None:
            with Registry.open(path) as fresh:
                t0 = time.perf_counter_ns()
                assert fresh.signature_set("layer.12", DIM) is not None
                load_samples.append((time.perf_counter_ns() - t0) / 1e3)

        load_samples: list[float] = []
        for i in range(n_load + 2):
            load_once(i)
        table.add(
            "load", "registry.signature_set, 10,000 from SQLite (cold)", sorted(load_samples[2:])
        )

    print(f"{'benchmark':<52} {'n':>6}  {'p50':>10}  {'p99':>10}  {'mean':>10}")
    print("\n".join(table.lines))
    print(f"\nstage_signatures + commit of 10,000 signatures (once): {stage_s * 1e3:,.1f} ms")
    print("\nratios of p50s (same run, same matrix):")
    for size in SIZES:
        p = table.p50
        print(
            f"  {size:>6,} signatures: score/(matrix @ u) = "
            f"{p[f'score{size}'] / p[f'base{size}']:.2f}x   score_many/(U @ matrix.T) = "
            f"{p[f'many{size}'] / p[f'basemany{size}']:.2f}x   score_many/(matrix @ u) = "
            f"{p[f'many{size}'] / p[f'base{size}']:.2f}x"
        )
    print(
        "  10,000 identical signatures (all rechecked)/score = "
        f"{table.p50['worst'] / table.p50['score10000']:.1f}x"
    )
    print(
        f"\n({'quick' if args.quick else 'full'} run, d={DIM}, {CAPABILITIES} capabilities, "
        f"{cpus} CPUs, load average {load:.2f} at start, numpy {np.__version__}, "
        f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
