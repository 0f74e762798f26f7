"""``embassy audit``: verify log segments with the embassy's own verifier, then write a
self-contained HTML report of what they proved (and what they did not).

Verification comes first: a segment, identity or evidence that does not verify is refused
with the verifier's code and message, and no file is written. The report is written
atomically, so ``--out`` holds either the previous file or the whole new one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from embassy.commands.inputs import hex_arg, read_input, write_out
from embassy.commands.keys import load_signing_key
from embassy.commands.meters import _reading_bytes as reading_bytes
from embassy.commands.output import add_json_arg, print_json, refuse_stdout
from embassy.commands.policy import add_completeness_args, add_policy_args, trust_policy
from embassy.commands.progress import human_bytes, progress_for, read_file
from embassy.errors import ConfigError


def _reading_files(directory: str) -> list[tuple[str, bytes]]:
    """Every file in ``directory`` (not recursively), in name order, as a reading envelope."""
    root = Path(directory)
    if not root.is_dir():
        raise ConfigError(f"--readings {directory}: not a directory")
    return [(p.name, reading_bytes(str(p))) for p in sorted(root.iterdir()) if p.is_file()]


def _cmd_audit(args: argparse.Namespace) -> int:
    from embassy.audit import audit_report, render_html
    from embassy.verify.api import Verifier

    if args.readings and not args.authority_key:
        raise ConfigError("--readings needs --authority-key: the readings open only with it")
    if args.complete and not (args.evidence and args.nonce):
        raise ConfigError(
            "--complete needs --evidence FILE and --nonce HEX: fresh evidence over your nonce, "
            "taken after you fetched the log"
        )
    if not args.complete and (args.evidence or args.nonce):
        raise ConfigError("--evidence and --nonce show completeness: pass --complete with them")
    refuse_stdout(args, args.out, "--out")
    progress = progress_for(args)
    verifier = Verifier(trust_policy(args))
    identity = verifier.identity(read_input(args.identity))
    complete = None
    if args.complete:
        complete = verifier.evidence(
            identity, read_input(args.evidence), hex_arg(args.nonce, "--nonce")
        )
    key = load_signing_key(args.authority_key) if args.authority_key else None
    segments = [read_file(progress, f, f"audit: reading {f}") for f in args.file]
    size = human_bytes(sum(len(s) for s in segments))
    with progress.step(f"audit: verifying {len(segments)} segment(s) ({size})"):
        log, report = audit_report(
            verifier,
            identity,
            segments,
            complete_with=complete,
            authority_key=key,
            reading_files=_reading_files(args.readings) if args.readings else None,
        )
    with progress.step("audit: drawing the report"):
        html = render_html(report).encode()
    write_out(html, args.out, newline=False)
    sessions = sum(len(w.sessions) for w in report.workloads)
    jobs = sum(len(w.jobs) for w in report.workloads)
    if args.json:
        print_json(
            {
                "ok": True,
                "out": args.out,
                "bytes": len(html),
                "first_seq": log.first_seq,
                "last_seq": log.last_seq,
                "complete": complete is not None,
                "statements": len(report.statements),
                "sessions": sessions,
                "jobs": jobs,
                "key_decisions": len(report.releases),
                "meter_values": len(report.readings),
            }
        )
    sys.stderr.write(
        f"audit: verified entries seq {log.first_seq}..{log.last_seq} "
        f"({'complete' if complete is not None else 'inclusion only'}): "
        f"{len(report.statements)} statements, {sessions} sessions, {jobs} jobs, "
        f"{len(report.releases)} key decisions, {len(report.readings)} meter values; "
        f"wrote {args.out}\n"
    )
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "audit",
        help="verify log segments, then write an HTML report of what they proved (offline)",
    )
    p.set_defaults(func=_cmd_audit)
    p.add_argument("file", nargs="+", help="log segments (GET /v1/log), in log order")
    p.add_argument("--identity", required=True, help="the identity document")
    p.add_argument("--out", required=True, help="where to write the report (HTML; '-' stdout)")
    add_completeness_args(p)
    p.add_argument(
        "--authority-key",
        metavar="KEY",
        help="an authority's private key (PEM; passphrase in the environment): its meter "
        "readings in the log are opened and charted",
    )
    p.add_argument(
        "--readings",
        metavar="DIR",
        help="meter-reading statements you kept (one per file); each is shown only if it is "
        "in the verified log (needs --authority-key)",
    )
    add_policy_args(p)
    add_json_arg(p)
