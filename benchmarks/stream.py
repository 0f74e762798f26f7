"""What streaming decryption of a sealed input costs, against one-shot AES-GCM.

Run from the repository root::

    .venv/bin/python -m benchmarks.stream [--quick] [--size-mib N] [--repeat R] [--dir DIR]

It writes N MiB (default 1024; ``--quick``: 128) of random bytes to a fresh temporary
directory, encrypts them to disk with ``encrypt_stream`` (64 KiB chunks), then measures,
each in its own child process so that peak RSS is that of the measurement alone:

- streaming: ``decrypt_stream_to`` from the file on disk to a ``/dev/null`` sink;
- baseline, same run: one-shot ``AESGCM(key).decrypt`` of the same plaintext size, the
  ciphertext held in memory (made once by a one-shot encrypt in another child);
- ceiling: one-shot ``AESGCM.decrypt_into`` a buffer allocated and touched beforehand
  (cryptography >= 45), i.e. AES-GCM itself without the page faults of a fresh 1 GiB output.

It prints MB/s (10^6 bytes per second, best of R runs) for each, the ratios, and each
child's peak RSS growth over its RSS before the runs (the VmHWM high-water mark, reset via
/proc/self/clear_refs; ``ru_maxrss`` where that is unavailable) and absolute peak, plus the
streaming run's peak traced Python allocations (tracemalloc, one extra untimed run). The
files are on disk, so the streaming figure includes reading the ciphertext (from the page
cache, most likely: it was just written). The temporary directory is removed at the end,
whatever happens.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from workload_sdk.stream import decrypt_stream_to, encrypt_stream

MIB = 1024 * 1024
ONE_SHOT_MAX = 2**31 - 1  # cryptography refuses larger AEAD inputs
NONCE = bytes(12)


def _status_bytes(name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak() -> int:
    """Reset the RSS high-water mark if Linux lets us; return the RSS to measure from."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        current = _status_bytes("VmRSS")
        if current is not None:
            return current
    except OSError:
        pass
    return _peak_rss()


def _peak_rss() -> int:
    hwm = _status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _mb_s(size: int, seconds: float) -> float:
    return size / seconds / 1e6


# --- children ------------------------------------------------------------------------


def _child_stream(work: Path, size: int, repeat: int) -> dict[str, Any]:
    key = (work / "key").read_bytes()

    def once() -> float:
        with (work / "stream.enc").open("rb") as src, open(os.devnull, "wb") as sink:
            start = time.perf_counter()
            n = decrypt_stream_to(key, src, sink)
            elapsed = time.perf_counter() - start
        assert n == size, (n, size)
        return elapsed

    before = _reset_peak()
    times = [once() for _ in range(repeat)]
    after = _peak_rss()
    tracemalloc.start()
    once()
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"times": times, "rss_before": before, "rss_after": after, "traced": traced}


def _child_one_shot_encrypt(work: Path) -> dict[str, Any]:
    key = (work / "key").read_bytes()
    plain = (work / "plain.bin").read_bytes()
    start = time.perf_counter()
    ct = AESGCM(key).encrypt(NONCE, plain, None)
    elapsed = time.perf_counter() - start
    (work / "oneshot.enc").write_bytes(ct)
    return {"times": [elapsed], "rss_before": 0, "rss_after": _peak_rss()}


def _child_one_shot_decrypt(work: Path, size: int, repeat: int) -> dict[str, Any]:
    key = (work / "key").read_bytes()
    aead = AESGCM(key)
    ct = (work / "oneshot.enc").read_bytes()  # the ciphertext, held in memory
    before = _reset_peak()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        plain = aead.decrypt(NONCE, ct, None)
        times.append(time.perf_counter() - start)
        assert len(plain) == size
        del plain
    after = _peak_rss()
    return {"times": times, "rss_before": before, "rss_after": after}


def _child_one_shot_decrypt_into(work: Path, size: int, repeat: int) -> dict[str, Any]:
    """The AES-GCM ceiling: decrypt into a buffer allocated and touched beforehand."""
    key = (work / "key").read_bytes()
    aead = AESGCM(key)
    ct = (work / "oneshot.enc").read_bytes()
    out = bytearray(size)  # zero-filled: every page is touched before the clock starts
    before = _reset_peak()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        n = aead.decrypt_into(NONCE, ct, None, out)
        times.append(time.perf_counter() - start)
        assert n == size
    after = _peak_rss()
    return {"times": times, "rss_before": before, "rss_after": after}


def _run_child(mode: str, work: Path, size: int, repeat: int) -> dict[str, Any]:
    argv = [sys.executable, "-m", "benchmarks.stream", "--child", mode, "--work", str(work)]
    argv += ["--size-bytes", str(size), "--repeat", str(repeat)]
    out = subprocess.run(argv, check=True, capture_output=True, text=True)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


# --- parent --------------------------------------------------------------------------


def _write_plaintext(path: Path, size: int) -> float:
    start = time.perf_counter()
    with path.open("wb") as f:
        left = size
        while left:
            n = min(MIB, left)
            f.write(os.urandom(n))
            left -= n
    return time.perf_counter() - start


def _encrypt_file(work: Path, key: bytes) -> tuple[float, int]:
    start = time.perf_counter()
    with (work / "plain.bin").open("rb") as src, (work / "stream.enc").open("wb") as dst:
        written = encrypt_stream(key, os.urandom(16), src, dst)
    return time.perf_counter() - start, written


def _fmt_mib(n: int) -> str:
    return f"{n / MIB:8.1f} MiB"


def run(size: int, repeat: int, base_dir: str | None) -> None:
    work = Path(tempfile.mkdtemp(prefix="embassy-bench-stream-", dir=base_dir))
    try:
        key = os.urandom(32)
        (work / "key").write_bytes(key)
        print(f"size {size / MIB:.0f} MiB, repeat {repeat}, temp dir {work}")
        gen = _write_plaintext(work / "plain.bin", size)
        print(f"  wrote random plaintext            {_mb_s(size, gen):9.1f} MB/s")
        enc, written = _encrypt_file(work, key)
        print(
            f"  encrypt_stream file -> file       {_mb_s(size, enc):9.1f} MB/s  "
            f"(stream is {written - size} bytes larger)"
        )

        stream = _run_child("stream", work, size, repeat)
        stream_best = min(stream["times"])
        one_shot: dict[str, Any] | None = None
        ceiling: dict[str, Any] = {}
        if size <= ONE_SHOT_MAX:
            enc1 = _run_child("one-shot-encrypt", work, size, 1)
            (work / "plain.bin").unlink()  # not needed any more; free the disk
            one_shot = _run_child("one-shot-decrypt", work, size, repeat)
            ceiling = _run_child("one-shot-decrypt-into", work, size, repeat)
            print(f"  one-shot AESGCM encrypt (memory)  {_mb_s(size, enc1['times'][0]):9.1f} MB/s")

        print()
        print(f"  {'':28}{'MB/s (best)':>12}{'peak RSS growth':>18}{'peak RSS':>14}")
        rows = [("decrypt_stream_to (disk->null)", stream)]
        if one_shot is not None:
            rows.append(("one-shot AESGCM.decrypt (mem)", one_shot))
            rows.append(("  decrypt_into preallocated", ceiling))
        for name, r in rows:
            growth = r["rss_after"] - r["rss_before"]
            print(
                f"  {name:28}{_mb_s(size, min(r['times'])):12.1f}"
                f"{_fmt_mib(growth):>18}{_fmt_mib(r['rss_after']):>14}"
            )
        print(f"  streaming: peak traced Python allocations {stream['traced'] / 1024:.0f} KiB")
        if one_shot is not None:
            ratio = _mb_s(size, stream_best) / _mb_s(size, min(one_shot["times"]))
            print(f"\n  streaming / one-shot throughput: {ratio:.2f}")
            ratio = _mb_s(size, stream_best) / _mb_s(size, min(ceiling["times"]))
            print(f"  streaming / decrypt_into (AES-GCM ceiling): {ratio:.2f}")
            print(
                "  (one-shot peak RSS includes the ciphertext held in memory; its growth "
                "is the plaintext it allocates)"
            )
        else:
            print(f"\n  one-shot baseline skipped: {size} bytes exceeds AESGCM's 2^31-1 limit")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stream", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="128 MiB instead of 1 GiB")
    parser.add_argument("--size-mib", type=int, default=None, help="input size (default 1024)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each (best kept)")
    parser.add_argument("--dir", default=None, help="where to make the temporary directory")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--size-bytes", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child is not None:
        work = Path(args.work)
        if args.child == "stream":
            result = _child_stream(work, args.size_bytes, args.repeat)
        elif args.child == "one-shot-encrypt":
            result = _child_one_shot_encrypt(work)
        elif args.child == "one-shot-decrypt":
            result = _child_one_shot_decrypt(work, args.size_bytes, args.repeat)
        elif args.child == "one-shot-decrypt-into":
            result = _child_one_shot_decrypt_into(work, args.size_bytes, args.repeat)
        else:
            parser.error(f"unknown child mode {args.child!r}")
        print(json.dumps(result))
        return 0

    size_mib = args.size_mib if args.size_mib is not None else (128 if args.quick else 1024)
    if size_mib <= 0 or args.repeat <= 0:
        parser.error("--size-mib and --repeat must be positive")
    run(size_mib * MIB, args.repeat, args.dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
