"""``embassy verify``: check evidence offline (no TPM, root or Docker) under the trust-policy
flags, and print what was checked (or, with ``--json``, the verifier's report)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from embassy.commands.inputs import read_input
from embassy.commands.keys import passphrase
from embassy.commands.output import add_json_arg, print_json
from embassy.commands.policy import add_completeness_args, add_policy_args, trust_policy
from embassy.commands.progress import progress_for


def _cmd_verify(args: argparse.Namespace) -> int:
    from embassy.verify import report

    if args.what == "job" and args.reply_key:
        from embassy.jobs.result import ReplyPrivateKey

        args.reply_private = ReplyPrivateKey.from_pem(
            read_input(args.reply_key), passphrase(), f"--reply-key {args.reply_key}"
        )
    policy = trust_policy(args)
    with progress_for(args).step(f"verify {args.what}: checking"):
        result = report.run(args.what, args, policy, read_input)
    if args.json:
        print_json(result)
    else:
        for check in result["checks"]:
            sys.stdout.write(f"ok    {check}\n")
        for line in result.get("facts", []):
            sys.stdout.write(f"      {line}\n")
        sys.stdout.write("verified\n")
    return 0


def add_parser(sub: Any) -> None:
    verify = sub.add_parser("verify", help="check evidence offline (no TPM, root or Docker)")
    verify.set_defaults(func=_cmd_verify)
    kinds = verify.add_subparsers(dest="what", required=True)
    specs = {
        "identity": "an identity document",
        "log": "log segments (GET /v1/log), against an identity document",
        "statement": "one statement envelope, found in a verified log segment",
        "evidence": "fresh evidence (GET /v1/evidence) over your nonce",
        "result": "a result bundle: output, seal and unseal statements, and their log",
        "job": "a job's result bundle: sealed from birth, key once, committed, destroyed",
    }
    for name, help_text in specs.items():
        p = kinds.add_parser(name, help=f"verify {help_text}")
        p.add_argument(
            "file", nargs="+" if name == "log" else None, help="the file to verify ('-' for stdin)"
        )
        if name != "identity":
            p.add_argument("--identity", required=True, help="the identity document")
        if name == "statement":
            p.add_argument("--log", required=True, help="a log segment containing it")
        if name == "evidence":
            p.add_argument("--nonce", required=True, help="the nonce you sent (hex)")
        if name == "job":
            p.add_argument("--payload-id", help="your payload's id (hex): the job opened it")
            p.add_argument(
                "--reply-key",
                metavar="FILE",
                help="your private reply key (keygen --reply; its passphrase in the "
                "environment): the result must open with it",
            )
        if name == "result":
            p.add_argument("--payload-id", help="your payload's id (hex): the session opened it")
            for when, what in (("before", "before sending"), ("after", "after receiving")):
                p.add_argument(f"--{when}", metavar="EVIDENCE", help=f"evidence you fetched {what}")
                p.add_argument(f"--{when}-nonce", metavar="HEX", help=f"the --{when} nonce")
        if name == "log":
            add_completeness_args(p)
        add_policy_args(p)
        add_json_arg(p)
