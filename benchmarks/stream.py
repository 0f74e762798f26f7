"""What streaming decryption of a sealed input costs, against one-shot AES-GCM.

Run from the repository root::

    .venv/bin/python -m benchmarks.stream [--quick] [--size-mib N] [--repeat R] [--dir DIR]

It writes N MiB (default 1024; ``--quick``: 128) of random bytes to a fresh temporary
directory, encrypts them to disk with ``encrypt_stream`` (64 KiB chunks), then measures,
each in its own child process so that peak RSS is that of the measurement alone:

- streaming: ``decrypt_stream_to`` from the file on disk to a ``/dev/null`` sink, as it
  runs (reading ahead on a helper thread when there are two CPUs) and with the reading on
  the caller's thread only ("in line": what one CPU gives);
- streaming encryption: ``encrypt_stream`` from the plaintext file to a ``/dev/null`` sink;
- baseline, same run: one-shot ``AESGCM(key).decrypt`` of the same plaintext size, the
  ciphertext held in memory (made once by a one-shot encrypt in another child);
- ceilings: one-shot ``AESGCM.decrypt_into`` (and ``encrypt_into``) a buffer allocated and
  touched beforehand (cryptography >= 45), i.e. AES-GCM itself without the page faults of
  a fresh 1 GiB output, its input already in memory.

The children run in rounds (``--repeat`` of them, default 3), each round every measurement
once (two timed runs in a fresh child, the better kept), so that a burst of other work on
the machine hits all of them alike; each figure is the best of its rounds, and each ratio
is also given round by round. It prints MB/s (10^6 bytes per second) for each, the ratios, and each
child's peak RSS growth over its RSS before the runs (the VmHWM high-water mark, reset via
/proc/self/clear_refs; ``ru_maxrss`` where that is unavailable) and absolute peak, plus the
streaming runs' peak traced Python allocations (tracemalloc, one extra untimed run). The
files are on disk, so the streaming figures include reading the input (from the page
cache, most likely: it was just written). The temporary directory is removed at the end,
whatever happens.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import workload_sdk.stream as stream_module
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


def _child_stream(work: Path, size: int, repeat: int, mode: str, traced: bool) -> dict[str, Any]:
    key = (work / "key").read_bytes()
    if mode.endswith("-inline"):
        stream_module._can_overlap = lambda: False
    encrypting = mode.startswith("stream-encrypt")

    def once() -> float:
        name = "plain.bin" if encrypting else "stream.enc"
        with (work / name).open("rb") as src, open(os.devnull, "wb") as sink:
            start = time.perf_counter()
            if encrypting:
                encrypt_stream(key, bytes(16), src, sink)
                n = size
            else:
                n = decrypt_stream_to(key, src, sink)
            elapsed = time.perf_counter() - start
        assert n == size, (n, size)
        return elapsed

    before = _reset_peak()
    times = [once() for _ in range(repeat)]
    after = _peak_rss()
    peak = 0
    if traced:
        tracemalloc.start()
        once()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return {"times": times, "rss_before": before, "rss_after": after, "traced": peak}


def _child_one_shot_encrypt_into(work: Path, size: int, repeat: int) -> dict[str, Any]:
    """The AES-GCM encryption ceiling: plaintext in memory, output preallocated."""
    key = (work / "key").read_bytes()
    aead = AESGCM(key)
    plain = (work / "plain.bin").read_bytes()
    out = bytearray(size + 16)
    before = _reset_peak()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        n = aead.encrypt_into(NONCE, plain, None, out)
        times.append(time.perf_counter() - start)
        assert n == size + 16
    after = _peak_rss()
    return {"times": times, "rss_before": before, "rss_after": after}


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


def _merge(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One measurement's rounds: each round's best time, the largest RSS growth, the first
    round's traced peak."""
    worst = max(rounds, key=lambda r: r["rss_after"] - r["rss_before"])
    return {
        "times": [min(r["times"]) for r in rounds],
        "rss_before": worst["rss_before"],
        "rss_after": worst["rss_after"],
        "traced": rounds[0].get("traced", 0),
    }


def _run_child(
    mode: str, work: Path, size: int, repeat: int, *, traced: bool = False
) -> dict[str, Any]:
    argv = [sys.executable, "-m", "benchmarks.stream", "--child", mode, "--work", str(work)]
    argv += ["--size-bytes", str(size), "--repeat", str(repeat)]
    if traced:
        argv.append("--traced")
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
        load = os.getloadavg()[0]
        print(
            f"size {size / MIB:.0f} MiB, {repeat} rounds, {os.cpu_count()} CPUs, "
            f"load average {load:.2f} at start, temp dir {work}"
        )
        if load > (os.cpu_count() or 1) / 2:
            print("  warning: the machine is busy: the read-ahead thread needs a free CPU")
        gen = _write_plaintext(work / "plain.bin", size)
        print(f"  wrote random plaintext            {_mb_s(size, gen):9.1f} MB/s")
        enc, written = _encrypt_file(work, key)
        print(
            f"  encrypt_stream file -> file       {_mb_s(size, enc):9.1f} MB/s  "
            f"(stream is {written - size} bytes larger)"
        )

        modes = ["stream", "stream-inline", "stream-encrypt", "stream-encrypt-inline"]
        if size <= ONE_SHOT_MAX:
            enc1 = _run_child("one-shot-encrypt", work, size, 1)
            print(f"  one-shot AESGCM encrypt (memory)  {_mb_s(size, enc1['times'][0]):9.1f} MB/s")
            modes += ["one-shot-decrypt", "one-shot-decrypt-into", "one-shot-encrypt-into"]
        rounds: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
        for i in range(repeat):
            for mode in modes:
                rounds[mode].append(_run_child(mode, work, size, 2, traced=i == 0))
        res = {m: _merge(rs) for m, rs in rounds.items()}

        print()
        print(f"  {'':34}{'MB/s (best)':>12}{'peak RSS growth':>18}{'peak RSS':>14}")
        names = {
            "stream": "decrypt_stream_to (disk->null)",
            "stream-inline": "  in line (one CPU)",
            "stream-encrypt": "encrypt_stream (disk->null)",
            "stream-encrypt-inline": "  in line (one CPU)",
            "one-shot-decrypt": "one-shot AESGCM.decrypt (mem)",
            "one-shot-decrypt-into": "  decrypt_into preallocated",
            "one-shot-encrypt-into": "  encrypt_into preallocated",
        }
        for mode in modes:
            r = res[mode]
            growth = r["rss_after"] - r["rss_before"]
            print(
                f"  {names[mode]:34}{_mb_s(size, min(r['times'])):12.1f}"
                f"{_fmt_mib(growth):>18}{_fmt_mib(r['rss_after']):>14}"
            )
        for mode in modes[:4]:
            print(
                f"  {names[mode].strip()}: peak traced Python allocations "
                f"{res[mode]['traced'] / 1024:.0f} KiB"
            )
        if size <= ONE_SHOT_MAX:
            print()
            pairs = [
                ("decrypt streaming / one-shot decrypt", "stream", "one-shot-decrypt"),
                ("decrypt streaming / decrypt_into (ceiling)", "stream", "one-shot-decrypt-into"),
                ("  in line / decrypt_into", "stream-inline", "one-shot-decrypt-into"),
                (
                    "encrypt streaming / encrypt_into (ceiling)",
                    "stream-encrypt",
                    "one-shot-encrypt-into",
                ),
                ("  in line / encrypt_into", "stream-encrypt-inline", "one-shot-encrypt-into"),
            ]
            print(f"  {'throughput ratios, same run':46}{'best/best':>10}   per round")
            for label, num, den in pairs:
                best = min(res[den]["times"]) / min(res[num]["times"])
                each = sorted(
                    d / n for n, d in zip(res[num]["times"], res[den]["times"], strict=True)
                )
                spread = f"{each[0]:.2f}-{each[-1]:.2f}, median {statistics.median(each):.2f}"
                print(f"  {label:46}{best:10.2f}   {spread}")
            print(
                "  (one-shot peak RSS includes the input held in memory; a one-shot decrypt's "
                "growth is the plaintext it allocates)"
            )
        else:
            print(f"\n  one-shot baseline skipped: {size} bytes exceeds AESGCM's 2^31-1 limit")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stream", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="128 MiB instead of 1 GiB")
    parser.add_argument("--size-mib", type=int, default=None, help="input size (default 1024)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds (best kept)")
    parser.add_argument("--dir", default=None, help="where to make the temporary directory")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--size-bytes", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--traced", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child is not None:
        work = Path(args.work)
        if args.child.startswith("stream"):
            result = _child_stream(work, args.size_bytes, args.repeat, args.child, args.traced)
        elif args.child == "one-shot-encrypt":
            result = _child_one_shot_encrypt(work)
        elif args.child == "one-shot-decrypt":
            result = _child_one_shot_decrypt(work, args.size_bytes, args.repeat)
        elif args.child == "one-shot-decrypt-into":
            result = _child_one_shot_decrypt_into(work, args.size_bytes, args.repeat)
        elif args.child == "one-shot-encrypt-into":
            result = _child_one_shot_encrypt_into(work, args.size_bytes, args.repeat)
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
