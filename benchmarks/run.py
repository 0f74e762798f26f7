"""Embassy benchmarks: what signing, logging, quoting and verifying statements cost.

Run from the repository root::

    .venv/bin/python -m benchmarks.run [--quick] [--json OUT] [--dir DIR]

Everything runs against a swtpm this script starts in its own temporary directory (and
always powers off at the end). Every figure is measured in the same run as the baselines
it is compared with (bare Ed25519 sign and verify), so the ratios are meaningful on any
machine even when the absolute numbers are not. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

import embassy.daemon.statement_log as statement_log_module
from benchmarks.stats import percentile
from embassy.attest.akcert import issue_ak_certificate
from embassy.attest.ek import load_pem_bundle
from embassy.attest.marshal import parse_public
from embassy.attest.types import TpmMode
from embassy.config import Config, parse_config
from embassy.daemon.runtime import Embassy, TpmHandle
from embassy.log.segment import Segment, parse_segment
from embassy.registrar.ca import make_ca
from embassy.registrar.enroll import EkTrust, chain_for, enroll
from embassy.tpm.device import TpmDevice
from embassy.tpm.swtpm import Swtpm
from embassy.verify.identity import verify_identity_document
from embassy.verify.policy import TrustPolicy
from embassy.verify.segment import SegmentKeys, verify_segment
from embassy.wire.codec import canonical_json
from embassy.wire.dsse import IN_TOTO_PAYLOAD_TYPE, pae, parse_envelope
from embassy.wire.statement import LIFECYCLE_V1

BASELINE_PAYLOAD_BYTES = 600
FSYNC_LINE_BYTES = 1024
NONCE_BYTES = 32


@dataclass(frozen=True)
class Counts:
    """Iteration counts: (warm-up, measured) per benchmark."""

    sign: tuple[int, int]
    verify: tuple[int, int]
    fsync: tuple[int, int]
    extend: tuple[int, int]
    clock: tuple[int, int]
    statement: tuple[int, int]
    statement_quote: tuple[int, int]
    quote: tuple[int, int]
    segment_repeats: tuple[int, int]
    identity: tuple[int, int]
    enroll: tuple[int, int]


FULL = Counts(
    sign=(500, 20_000),
    verify=(500, 10_000),
    fsync=(20, 500),
    extend=(20, 1000),
    clock=(20, 1000),
    statement=(50, 2000),
    statement_quote=(10, 300),
    quote=(10, 300),
    segment_repeats=(1, 5),
    identity=(20, 500),
    enroll=(3, 50),
)
QUICK = Counts(
    sign=(200, 3000),
    verify=(200, 2000),
    fsync=(10, 100),
    extend=(10, 200),
    clock=(10, 200),
    statement=(20, 300),
    statement_quote=(5, 50),
    quote=(5, 50),
    segment_repeats=(1, 3),
    identity=(5, 100),
    enroll=(1, 10),
)


@dataclass(frozen=True)
class Stats:
    """Figures of one benchmark; latencies in microseconds."""

    n: int
    wall_s: float
    ops_per_s: float
    mean_us: float
    p50_us: float
    p99_us: float
    min_us: float
    max_us: float


def measure(fn: Callable[[], object], warmup: int, n: int) -> Stats:
    """Call ``fn`` ``warmup`` times untimed, then ``n`` times, timing each call."""
    for _ in range(warmup):
        fn()
    samples = [0] * n
    clock = time.perf_counter_ns
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection landing in one sample would only add noise to p99
    try:
        start = clock()
        for i in range(n):
            t0 = clock()
            fn()
            samples[i] = clock() - t0
        wall = clock() - start
    finally:
        if gc_was_enabled:
            gc.enable()
    samples.sort()
    return Stats(
        n=n,
        wall_s=wall / 1e9,
        ops_per_s=n / (wall / 1e9),
        mean_us=statistics.fmean(samples) / 1e3,
        p50_us=percentile(samples, 50) / 1e3,
        p99_us=percentile(samples, 99) / 1e3,
        min_us=samples[0] / 1e3,
        max_us=samples[-1] / 1e3,
    )


class InSitu:
    """Time the real calls one logged statement makes, by wrapping them in place.

    Wraps ``sign_envelope`` as the statement log module calls it, the log file's
    ``append`` (write + fsync) and the TPM's ``extend`` and ``clock``; the wrappers are
    removed again when the ``with`` block ends.
    """

    def __init__(self) -> None:
        self.ns: dict[str, int] = {}

    def _wrap(self, obj: object, attr: str, label: str) -> Callable[[], None]:
        inner: Callable[..., Any] = getattr(obj, attr)
        self.ns[label] = 0
        clock = time.perf_counter_ns

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = clock()
            try:
                return inner(*args, **kwargs)
            finally:
                self.ns[label] += clock() - t0

        had_own = attr in vars(obj)
        setattr(obj, attr, timed)

        def restore() -> None:
            if had_own:
                setattr(obj, attr, inner)
            else:
                delattr(obj, attr)

        return restore

    @contextlib.contextmanager
    def wrapped(self, embassy: Embassy) -> Iterator[None]:
        log = embassy.log
        undo = [
            self._wrap(statement_log_module, "sign_envelope", "sign_envelope"),
            self._wrap(log._entries, "append", "fsync_append"),
            self._wrap(embassy.tpm, "extend", "pcr_extend"),
            self._wrap(embassy.tpm, "clock", "tpm_clock"),
        ]
        try:
            yield
        finally:
            for restore in reversed(undo):
                restore()


def _unused_pcr(config: Config) -> int:
    """A PCR the embassy neither extends nor quotes (16, the debug PCR, by preference)."""
    taken = set(config.pcrs.quoted)
    candidates: list[int] = [16, 23, *range(8, 24)]
    for pcr in candidates:
        if pcr not in taken:
            return pcr
    raise RuntimeError("no PCR free for the extend benchmark")


@dataclass
class Bench:
    counts: Counts
    results: dict[str, Any]

    def _progress(self, what: str) -> None:
        print(f"  ... {what}", file=sys.stderr, flush=True)

    def run(self, embassy: Embassy, swtpm: Swtpm, data_dir: Path) -> None:
        c = self.counts
        r = self.results
        key = embassy.keys.signing
        tpm = embassy.tpm
        config = embassy.config

        # 1. Baselines: bare Ed25519 over ~600 bytes.
        self._progress("baseline Ed25519 sign/verify")
        payload = os.urandom(BASELINE_PAYLOAD_BYTES)
        r["baseline_sign"] = measure(lambda: key.sign(payload), *c.sign)
        sig = key.sign(payload)
        pub = key.public_key()
        r["baseline_verify"] = measure(lambda: pub.verify(sig, payload), *c.verify)

        # 6. The primitives one logged statement is made of, each on its own.
        self._progress("primitives: sign, fsync append, PCR extend, clock")
        sample = embassy.log.append_statement(LIFECYCLE_V1, [], {"event": "bench", "i": -1})
        stmt_payload = parse_envelope(sample.envelope).payload
        stmt_pae = pae(IN_TOTO_PAYLOAD_TYPE, stmt_payload)
        r["statement_sizes"] = {
            "payload_bytes": len(stmt_payload),
            "envelope_bytes": len(sample.envelope),
            "log_line_bytes": len(sample.entry.raw) + 1,
        }
        r["prim_sign"] = measure(lambda: key.sign(stmt_pae), *c.sign)
        line = b"x" * (FSYNC_LINE_BYTES - 1) + b"\n"
        fd = os.open(data_dir / "bench-fsync.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:

            def write_fsync() -> None:
                os.write(fd, line)
                os.fsync(fd)

            r["prim_fsync_append"] = measure(write_fsync, *c.fsync)
        finally:
            os.close(fd)
        pcr = _unused_pcr(config)
        digest = os.urandom(32)
        r["prim_extend_pcr"] = pcr
        r["prim_extend"] = measure(lambda: tpm.extend(pcr, digest), *c.extend)
        r["prim_clock"] = measure(tpm.clock, *c.clock)

        # 2. Statements signed, fsync'd, extended (no quote: checkpoint_every is huge).
        self._progress("statements signed + logged")
        i = 0

        def append() -> None:
            nonlocal i
            i += 1
            embassy.log.append_statement(LIFECYCLE_V1, [], {"event": "bench", "i": i})

        r["statement"] = measure(append, *c.statement)

        # 6b. The same again with the real calls timed in place: the split as it happens.
        self._progress("statements again, with the split timed in place")
        in_situ = InSitu()
        with in_situ.wrapped(embassy):
            n_in_situ = c.statement[1]
            t0 = time.perf_counter_ns()
            for _ in range(n_in_situ):
                append()
            total_ns = time.perf_counter_ns() - t0
        r["in_situ"] = {
            "n": n_in_situ,
            "statement_mean_us": total_ns / n_in_situ / 1e3,
            **{f"{k}_mean_us": v / n_in_situ / 1e3 for k, v in in_situ.ns.items()},
        }

        # 5. Verification of the segment the log now holds (before the quote-per-statement
        # run, so its size is the statement run's).
        self._progress("segment and identity verification")
        # A registrar certifies the AK (a real credential activation with the swtpm), so the
        # identity verified below carries its AK certificate chain.
        swtpm_cas = tuple(load_pem_bundle(swtpm.ca_certificates_pem()))
        registrar = make_ca("bench registrar", now=datetime.now(UTC), lifetime=timedelta(1))
        trust = EkTrust((), swtpm_cas, allow_software_tpm=True)
        enrollment = enroll(embassy, registrar, trust, now=datetime.now(UTC), lifetime=timedelta(1))
        embassy.install_ak_chain(chain_for(enrollment), None)
        identity_bytes = canonical_json(embassy.identity_document())
        policy = TrustPolicy(
            software_ek_cas=swtpm_cas,
            ak_cas=(registrar.certificate,),
            expected_measurement=embassy.measurement.digest,
            allow_software_tpm=True,
        )
        t0 = time.perf_counter_ns()
        identity = verify_identity_document(identity_bytes, policy)
        r["identity_verify_ms"] = (time.perf_counter_ns() - t0) / 1e6
        quiet = logging.getLogger("embassy")
        level, quiet.level = quiet.level, logging.ERROR  # allow_software_tpm warns per call
        try:
            r["identity_verify"] = measure(
                lambda: verify_identity_document(identity_bytes, policy), *c.identity
            )
        finally:
            quiet.setLevel(level)
        ak, ek_cert = parse_public(embassy.tpm.ak_public()), embassy.tpm.ek_certificate()
        now = datetime.now(UTC)
        r["ak_issue"] = measure(
            lambda: issue_ak_certificate(
                registrar, ak, ek_cert, now=now, lifetime=timedelta(1), serial=1
            ),
            *c.identity,
        )
        baseline_key = ec.generate_private_key(ec.SECP256R1())
        tbs = os.urandom(BASELINE_PAYLOAD_BYTES)
        r["baseline_ecdsa_sign"] = measure(
            lambda: baseline_key.sign(tbs, ec.ECDSA(hashes.SHA256())), *c.identity
        )
        r["enroll"] = measure(
            lambda: enroll(embassy, registrar, trust, now=now, lifetime=timedelta(1)),
            *c.enroll,
        )
        keys = identity.segment_keys
        segment_json = canonical_json(embassy.log_segment(0)["segment"])
        self._bench_segment(segment_json, keys)

        # 3. Statements each followed by a TPM-quoted checkpoint.
        self._progress("statements + quote each")

        def append_and_quote() -> None:
            append()
            embassy.log.checkpoint()

        r["statement_quote"] = measure(append_and_quote, *c.statement_quote)

        # 4. A bare quote over the configured PCRs with a fresh 32-byte nonce.
        self._progress("quote latency")
        quoted = config.pcrs.quoted
        r["quote_pcrs"] = list(quoted)
        r["quote"] = measure(lambda: tpm.quote(quoted, os.urandom(NONCE_BYTES)), *c.quote)

    def _bench_segment(self, segment_json: bytes, keys: SegmentKeys) -> None:
        warmup, repeats = self.counts.segment_repeats

        def parse() -> Segment:
            return parse_segment(json.loads(segment_json))

        segment = parse()
        verified = verify_segment(segment, keys, allow_software_tpm=True)
        statements = len(verified.statements)
        parse_stats = measure(parse, warmup, repeats)
        verify_stats = measure(
            lambda: verify_segment(segment, keys, allow_software_tpm=True), warmup, repeats
        )
        self.results["segment"] = {
            "entries": len(segment.entries),
            "statements": statements,
            "json_bytes": len(segment_json),
            "checks": list(verified.checks),
            "parse": parse_stats,
            "verify": verify_stats,
            "verify_ms_p50": verify_stats.p50_us / 1e3,
            "parse_ms_p50": parse_stats.p50_us / 1e3,
            "statements_verified_per_s": statements / (verify_stats.p50_us / 1e6),
            "statements_parsed_and_verified_per_s": statements
            / ((verify_stats.p50_us + parse_stats.p50_us) / 1e6),
        }


def derive(r: dict[str, Any]) -> dict[str, float]:
    """Ratios and the cost split, from the measured figures."""
    sign: Stats = r["baseline_sign"]
    ver: Stats = r["baseline_verify"]
    stmt: Stats = r["statement"]
    stmt_q: Stats = r["statement_quote"]
    seg = r["segment"]
    parts = {
        "sign": r["prim_sign"].mean_us,
        "fsync_append": r["prim_fsync_append"].mean_us,
        "pcr_extend": r["prim_extend"].mean_us,
        "tpm_clock": r["prim_clock"].mean_us,
    }
    situ = r["in_situ"]
    situ_parts = {
        "sign": situ["sign_envelope_mean_us"],
        "fsync_append": situ["fsync_append_mean_us"],
        "pcr_extend": situ["pcr_extend_mean_us"],
        "tpm_clock": situ["tpm_clock_mean_us"],
    }
    ratios = {
        "statement/baseline-sign": stmt.ops_per_s / sign.ops_per_s,
        "statement+quote/baseline-sign": stmt_q.ops_per_s / sign.ops_per_s,
        "statement+quote/statement": stmt_q.ops_per_s / stmt.ops_per_s,
        "verify-statement/baseline-verify": seg["statements_verified_per_s"] / ver.ops_per_s,
        "verify-statement/statement": seg["statements_verified_per_s"] / stmt.ops_per_s,
        "ak-issue/baseline-ecdsa-sign": r["ak_issue"].ops_per_s
        / r["baseline_ecdsa_sign"].ops_per_s,
        "verify-identity/baseline-verify": r["identity_verify"].ops_per_s / ver.ops_per_s,
    }
    split = {f"split_{k}_us": v for k, v in parts.items()}
    split["split_other_us"] = stmt.mean_us - sum(parts.values())
    split["split_statement_mean_us"] = stmt.mean_us
    split |= {f"in_situ_{k}_us": v for k, v in situ_parts.items()}
    split["in_situ_other_us"] = situ["statement_mean_us"] - sum(situ_parts.values())
    split["in_situ_statement_mean_us"] = situ["statement_mean_us"]
    return {**{f"ratio {k}": v for k, v in ratios.items()}, **split}


def _fmt_rate(x: float) -> str:
    return f"{x:,.0f}/s" if x >= 100 else f"{x:,.1f}/s"


def _fmt_us(us: float) -> str:
    if us >= 1000:
        return f"{us / 1000:,.2f} ms"
    return f"{us:,.1f} µs"


def report(r: dict[str, Any], derived: dict[str, float]) -> str:
    rows: list[tuple[str, str, str, str, str, str]] = []

    def row(name: str, s: Stats) -> None:
        rows.append(
            (
                name,
                str(s.n),
                _fmt_rate(s.ops_per_s),
                _fmt_us(s.p50_us),
                _fmt_us(s.p99_us),
                _fmt_us(s.mean_us),
            )
        )

    row(f"1. baseline Ed25519 sign ({BASELINE_PAYLOAD_BYTES} B)", r["baseline_sign"])
    row(f"   baseline Ed25519 verify ({BASELINE_PAYLOAD_BYTES} B)", r["baseline_verify"])
    row("2. statement signed+fsync'd+extended", r["statement"])
    row("3. statement + TPM quote (checkpoint)", r["statement_quote"])
    row(f"4. TPM quote ({len(r['quote_pcrs'])} PCRs, 32 B nonce)", r["quote"])
    seg = r["segment"]
    row(f"5. verify_segment ({seg['statements']} statements)", seg["verify"])
    row("   parse segment JSON", seg["parse"])
    row("6. Ed25519 sign (statement PAE)", r["prim_sign"])
    row(f"   write+fsync {FSYNC_LINE_BYTES} B line", r["prim_fsync_append"])
    row(f"   TPM PCR extend (PCR {r['prim_extend_pcr']})", r["prim_extend"])
    row("   TPM read clock", r["prim_clock"])
    row("7. verify identity (AK chain, EK chain)", r["identity_verify"])
    row("8. registrar: issue an AK certificate", r["ak_issue"])
    row(f"   baseline ECDSA P-256 sign ({BASELINE_PAYLOAD_BYTES} B)", r["baseline_ecdsa_sign"])
    row("   registrar: whole enrolment (activation)", r["enroll"])
    head = ("benchmark", "n", "ops/s", "p50", "p99", "mean")
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(6)]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    out = [line(head), "  ".join("-" * w for w in widths), *(line(x) for x in rows), ""]
    out.append(
        f"verification: {_fmt_rate(seg['statements_verified_per_s'])} statements verified "
        f"(p50 {seg['verify_ms_p50']:.1f} ms per segment of {seg['entries']} entries / "
        f"{seg['statements']} statements, {seg['json_bytes'] / 1024:,.0f} KiB JSON; "
        f"{_fmt_rate(seg['statements_parsed_and_verified_per_s'])} including parsing)"
    )
    out.append(f"identity document verification (once): {r['identity_verify_ms']:.1f} ms")
    sizes = r["statement_sizes"]
    out.append(
        f"statement sizes: payload {sizes['payload_bytes']} B, envelope "
        f"{sizes['envelope_bytes']} B, log line {sizes['log_line_bytes']} B"
    )
    out.append("")
    out.append("ratios (ops/s over ops/s, same run):")
    for k, v in derived.items():
        if k.startswith("ratio "):
            out.append(f"  {k[6:]} = {v:.4f}x")
    out.append("")
    total = derived["split_statement_mean_us"]
    situ_total = derived["in_situ_statement_mean_us"]
    out.append("where one logged statement's time goes (means):")
    out.append(f"  {'part':<40} {'isolated':>10} {'share':>6}   {'in place':>10} {'share':>6}")
    labels = {
        "sign": "Ed25519 sign (in place: sign_envelope)",
        "fsync_append": "write + fsync of the log line",
        "pcr_extend": "TPM PCR extend",
        "tpm_clock": "TPM read clock",
        "other": "other (encode, JSON, hashing, locks)",
    }
    for part, label in labels.items():
        iso = derived[f"split_{part}_us"]
        situ = derived[f"in_situ_{part}_us"]
        out.append(
            f"  {label:<40} {_fmt_us(iso):>10} {100 * iso / total:5.1f}%"
            f"   {_fmt_us(situ):>10} {100 * situ / situ_total:5.1f}%"
        )
    out.append(
        f"  {'= one statement':<40} {_fmt_us(total):>10} {'':>6}   {_fmt_us(situ_total):>10}"
    )
    return "\n".join(out)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Stats):
        return asdict(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _build_embassy(tmp: Path, swtpm: Swtpm, tcti: tuple[str, str]) -> Embassy:
    config = parse_config(
        {
            "data_dir": str(tmp / "data"),
            "socket": str(tmp / "embassy.sock"),
            "statement_log": {"checkpoint_every": 1_000_000},
        }
    )
    device = TpmDevice.open(*tcti, TpmMode.SOFTWARE)
    # On failure the constructor closes the device; the caller powers the swtpm off.
    return Embassy(config, TpmHandle(device, swtpm))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer iterations (~20 s)")
    parser.add_argument("--json", type=Path, metavar="OUT", help="write all figures here")
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="parent of the temporary directory (its filesystem is the one fsync'd)",
    )
    parser.add_argument("--verbose", action="store_true", help="show embassy log warnings")
    args = parser.parse_args(argv)
    if not args.verbose:
        logging.getLogger("embassy").setLevel(logging.ERROR)
    counts = QUICK if args.quick else FULL
    load_at_start = os.getloadavg()[0]
    cpus = os.cpu_count() or 1
    if load_at_start > cpus / 2:
        print(
            f"warning: load average {load_at_start:.2f} on {cpus} CPUs: other work is running "
            "and the figures will be noisy",
            file=sys.stderr,
        )
    results: dict[str, Any] = {}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="embassy-bench-", dir=args.dir) as tmp_name:
        tmp = Path(tmp_name)
        swtpm = Swtpm(tmp / "swtpm")
        try:
            print("starting swtpm and an embassy on it ...", file=sys.stderr, flush=True)
            t0 = time.monotonic()
            tcti = swtpm.ensure_running()
            embassy = _build_embassy(tmp, swtpm, tcti)
            results["setup_s"] = time.monotonic() - t0
            try:
                Bench(counts, results).run(embassy, swtpm, tmp / "data")
            finally:
                embassy.close()  # appends a stop statement, then powers the swtpm off
        finally:
            swtpm.stop()  # idempotent; covers failures before or inside Embassy()
    derived = derive(results)
    meta = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "cpus": cpus,
        "load_average_at_start": load_at_start,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "tmp_dir": str(args.dir or tempfile.gettempdir()),
        "elapsed_s": time.monotonic() - started,
        "counts": asdict(counts),
    }
    print()
    print(report(results, derived))
    print(
        f"\n({'quick' if args.quick else 'full'} run, {cpus} CPUs, load average "
        f"{load_at_start:.2f} at start, setup {results['setup_s']:.1f} s, "
        f"total {meta['elapsed_s']:.1f} s)"
    )
    if args.json:
        out = {"meta": meta, "results": _jsonable(results), "derived": derived}
        args.json.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
