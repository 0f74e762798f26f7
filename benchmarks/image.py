"""What computing an image's expected.json costs: PE parsing, Authenticode, PCR prediction.

Run from the repository root::

    .venv/bin/python -m benchmarks.image [--quick]

A synthetic UKI the size of a real one (a 12 MiB kernel, a 32 MiB initrd, the usual small
sections) is built in memory. ``expected_image`` on it (the UKI's Authenticode digest, the
kernel's, every measured section's SHA-256, the phases) is timed against the floor measured
in the same run, interleaved: one SHA-256 over the whole file, and ``authenticode_digest``
alone. An auditor runs this once per image, so the figure to watch is that it stays a
small multiple of hashing the file.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import time
from collections.abc import Callable

from benchmarks.stats import percentile
from embassy.image.expected import expected_image
from embassy.image.pe import authenticode_digest
from tests.unit.image.builder import Spec, build_uki, fake_kernel


def _uki() -> bytes:
    rng = os.urandom  # incompressible contents, as a real kernel and initrd are
    return build_uki(
        "258",
        [
            Spec(".osrel", b'ID=embassy\nNAME="Embassy"\nIMAGE_VERSION=1\n'),
            Spec(".cmdline", b"console=ttyS0 usrhash=" + b"ab" * 32),
            Spec(".uname", b"6.18.0"),
            Spec(".linux", fake_kernel(rng(12 << 20))),
            Spec(".initrd", rng(32 << 20)),
        ],
    )


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples")
    args = parser.parse_args(argv)
    rounds = 5 if args.quick else 21
    uki = _uki()
    cases: dict[str, Callable[[], object]] = {
        "expected_image": lambda: expected_image(uki, None),
        "authenticode_digest": lambda: authenticode_digest(uki),
        "sha256 (baseline)": lambda: hashlib.sha256(uki).digest(),
    }
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):  # interleaved, so drift hits every case alike
        for name, fn in cases.items():
            samples[name].append(_time(fn))
    base = statistics.median(samples["sha256 (baseline)"])
    mib = len(uki) / (1 << 20)
    sys.stdout.write(f"UKI of {mib:.1f} MiB, {rounds} rounds\n")
    for name, values in samples.items():
        p50 = statistics.median(values)
        sys.stdout.write(
            f"{name:22s} p50 {p50 * 1e3:7.1f} ms  p95 {percentile(values, 95) * 1e3:7.1f} ms"
            f"  {mib / p50:7.0f} MiB/s  {p50 / base:5.2f}x sha256\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
