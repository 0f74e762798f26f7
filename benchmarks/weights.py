"""What loading an encrypted model costs: decrypt-and-load against loading the same tensors
unencrypted with ``safetensors``, measured in the same run.

Run from the repository root::

    .venv/bin/python -m benchmarks.weights [--quick] [--dir DIR] [--size-mib N]

A synthetic model of about 1 GiB (a float16 embedding, then layers of float32 attention
and float16 MLP matrices of a 2048-wide transformer; float16 stands in for bfloat16, which
``safetensors.numpy`` cannot load) is written to a temporary directory on disk as a
safetensors file and encrypted with ``embassy weights encrypt``'s code (4 MiB chunks, the
default). Both files are read once first, so both loads come from the page cache: the
figures compare decryption with copying, not disk speeds.

Each measurement runs in a fresh child process (so one load's memory cannot hide another's):
it warms up on a small file of the same kind, resets its peak RSS (``/proc/self/clear_refs``),
then times one load (wall and CPU time) and reads its RSS before and its peak (``VmHWM``)
after. Right before the load it touches 1.25x the model's size of memory and frees it: in a
VM, pages the host has not backed (never used, or handed back by free page reporting) are
several times slower to fault in, and whichever load got them would look slow. Loads
alternate (baseline, encrypted, encrypted with one thread), five times (``--quick``: once);
the figures are medians.

- baseline: ``safetensors.numpy.load_file(path)`` (a memory map, copied into arrays).
- encrypted: ``workload_sdk.weights.load_encrypted(path, key, ...)`` with the default
  threads (every CPU), and with ``threads=1``.
- ratio = baseline time / encrypted time (>= 0.8 is the target: decryption must not be the
  bottleneck). cores = CPU time / wall time. extra memory = peak RSS growth minus the
  arrays' bytes.

Everything is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

KEY = bytes(range(32))
MODEL_ID, KEY_ID = "bench/model@1", "bench-key"
HIDDEN, FFN, VOCAB = 2048, 5632, 32000


def _shapes(target: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype, shape) of a transformer-like model of about ``target`` bytes."""
    out: list[tuple[str, str, tuple[int, ...]]] = [("embed.weight", "F16", (VOCAB, HIDDEN))]
    size = VOCAB * HIDDEN * 2
    layer = 0
    while size < target:
        for part in ("q", "k", "v", "o"):
            out.append((f"layers.{layer}.attn.{part}.weight", "F32", (HIDDEN, HIDDEN)))
        out.append((f"layers.{layer}.mlp.gate.weight", "F16", (FFN, HIDDEN)))
        out.append((f"layers.{layer}.mlp.up.weight", "F16", (FFN, HIDDEN)))
        out.append((f"layers.{layer}.mlp.down.weight", "F16", (HIDDEN, FFN)))
        out.append((f"layers.{layer}.norm.weight", "F32", (HIDDEN,)))
        size += 4 * HIDDEN * HIDDEN * 4 + 3 * FFN * HIDDEN * 2 + HIDDEN * 4
        layer += 1
    return out


def _write_model(directory: Path, target: int) -> tuple[Path, Path, int]:
    import numpy as np
    from safetensors.numpy import save_file

    from embassy.weights.encrypt import encrypt_file

    rng = np.random.default_rng(13)
    arrays = {}
    for name, dtype, shape in _shapes(target):
        kind = np.float32 if dtype == "F32" else np.float16
        count = int(np.prod(shape))
        arrays[name] = rng.standard_normal(count, dtype=np.float32).astype(kind).reshape(shape)
    plain = directory / "model.safetensors"
    save_file(arrays, str(plain))
    size = sum(a.nbytes for a in arrays.values())
    del arrays
    sealed = directory / "model.emw"
    start = time.perf_counter()
    encrypt_file(plain, sealed, KEY, model_id=MODEL_ID, key_id=KEY_ID)
    seconds = time.perf_counter() - start
    print(f"model: {size / 2**30:.3f} GiB in {len(_shapes(target))} tensors", flush=True)
    print(f"encrypt (one thread, to disk): {seconds:.2f} s = {size / seconds / 2**30:.2f} GiB/s")
    return plain, sealed, size


def _warm(path: Path) -> None:
    with path.open("rb") as f:
        while f.read(16 << 20):
            pass


def _status(field: str) -> int:
    """A ``/proc/self/status`` memory field in bytes (ru_maxrss would be the parent's: Linux
    keeps the high-water mark across fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/self/status")


def _touch_memory(size: int) -> None:
    """Touch ``size`` bytes and free them, so the load that follows faults in pages the host
    already backs (see the module's docstring)."""
    import numpy as np

    block = np.ones(size, dtype=np.uint8)
    del block


def _child(kind: str, path: str, warm: str, threads: int) -> None:
    """One load in this (fresh) process; prints its figures as JSON."""
    import gc

    from safetensors.numpy import load_file

    from workload_sdk.weights import load_encrypted

    def load(p: str) -> dict[str, Any]:
        if kind == "safetensors":
            return load_file(p)
        return load_encrypted(p, KEY, model_id=MODEL_ID, key_id=KEY_ID, threads=threads or None)

    load(warm)
    _touch_memory(Path(path).stat().st_size * 5 // 4)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to VmRSS
    before = _status("VmRSS")
    cpu, wall = time.process_time(), time.perf_counter()
    tensors = load(path)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = _status("VmHWM")
    size = sum(t.nbytes for t in tensors.values())
    print(json.dumps({"wall": wall, "cpu": cpu, "growth": peak - before, "bytes": size}))


def _measure(kind: str, path: Path, warm: Path, threads: int = 0) -> dict[str, float]:
    argv = [sys.executable, "-m", "benchmarks.weights", "--child", kind, str(path), str(warm)]
    done = subprocess.run(
        [*argv, str(threads)], check=True, capture_output=True, text=True, timeout=600
    )
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _small(directory: Path) -> tuple[Path, Path]:
    """Small files of each kind, to warm a child up (imports, OpenSSL, the thread pool)."""
    import numpy as np
    from safetensors.numpy import save_file

    from embassy.weights.encrypt import encrypt_file

    plain, sealed = directory / "warm.safetensors", directory / "warm.emw"
    save_file({"w": np.ones((256, 1024), np.float32)}, str(plain))
    encrypt_file(plain, sealed, KEY, model_id=MODEL_ID, key_id=KEY_ID)
    return plain, sealed


def _row(label: str, runs: list[dict[str, float]]) -> dict[str, float]:
    wall = statistics.median(r["wall"] for r in runs)
    cpu = statistics.median(r["cpu"] for r in runs)
    growth = statistics.median(r["growth"] for r in runs)
    size = runs[0]["bytes"]
    extra = growth - size
    print(
        f"{label:<34} {wall * 1e3:8.1f} ms {size / wall / 2**30:6.2f} GiB/s  "
        f"cores {cpu / wall:4.2f}  extra memory {extra / 2**20:7.1f} MiB"
    )
    return {"wall": wall, "cpu": cpu, "extra": extra, "bytes": size}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one run of each, not five")
    parser.add_argument("--dir", help="where to write the model (default: the temp dir)")
    parser.add_argument("--size-mib", type=int, default=1024, help="the model's size")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, path, warm, threads = args.child
        _child(kind, path, warm, int(threads))
        return 0
    load = os.getloadavg()[0]
    cpus = len(os.sched_getaffinity(0))
    if load > cpus / 2:
        print(f"warning: load average {load:.2f}: figures will be noisy", file=sys.stderr)
    print(f"{cpus} CPUs, load average {load:.2f}")
    directory = Path(tempfile.mkdtemp(prefix="embassy-bench-weights-", dir=args.dir))
    try:
        plain, sealed, _ = _write_model(directory, args.size_mib << 20)
        warm_plain, warm_sealed = _small(directory)
        for path in (plain, sealed):
            _warm(path)
        runs: dict[str, list[dict[str, float]]] = {"base": [], "enc": [], "enc1": []}
        for _ in range(1 if args.quick else 5):
            runs["base"].append(_measure("safetensors", plain, warm_plain))
            runs["enc"].append(_measure("encrypted", sealed, warm_sealed))
            runs["enc1"].append(_measure("encrypted", sealed, warm_sealed, threads=1))
        print(f"{'':<34} {'median':>11} {'rate':>11}")
        base = _row("baseline safetensors.numpy.load_file", runs["base"])
        enc = _row(f"load_encrypted ({cpus} threads)", runs["enc"])
        one = _row("load_encrypted (1 thread)", runs["enc1"])
        ratio, ratio_one = base["wall"] / enc["wall"], base["wall"] / one["wall"]
        print(f"  encrypted/baseline = {ratio:.3f}x (target >= 0.8x)")
        print(f"  encrypted, 1 thread/baseline = {ratio_one:.3f}x")
        if args.json:
            figures = {"baseline": base, "encrypted": enc, "encrypted_1_thread": one}
            figures["derived"] = {"ratio": ratio, "ratio_1_thread": ratio_one, "cpus": cpus}
            Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
