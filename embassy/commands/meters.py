"""``embassy meters instruct | read`` (an authority's side of metering): sign an instruction for
a verified embassy, and verify and decrypt the meter reading it answers with."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from embassy.commands.inputs import positive_int, read_input, write_out
from embassy.commands.keys import load_signing_key
from embassy.commands.output import add_json_arg, print_json
from embassy.commands.policy import add_policy_args, trust_policy
from embassy.errors import ConfigError, WireFormatError


def _cmd_meters_instruct(args: argparse.Namespace) -> int:
    from embassy.metering.instruction import Op, Polarity, make_instruction
    from embassy.metering.reading import reply_public_bytes
    from embassy.payload.envelope import embassy_keyid
    from embassy.verify.identity import verify_identity_document

    key = load_signing_key(args.key)
    op = Op(args.op)
    # Never instruct an embassy whose identity does not verify under your policy.
    identity = verify_identity_document(read_input(args.identity), trust_policy(args))
    target = embassy_keyid(identity.keys)
    expires = int(time.time()) + args.ttl
    try:
        data = make_instruction(
            key,
            op=op,
            authority=args.authority,
            capabilities=args.capability or [],
            embassy_keyid=target,
            expires_unix=expires,
            polarity=None if args.polarity is None else Polarity(args.polarity),
            reply_key=reply_public_bytes(key) if op is Op.READ else None,
        )
    except WireFormatError as exc:  # the shape the user asked for, not a malformed file
        raise ConfigError(f"meters instruct: {exc.message}") from None
    if args.json:
        if args.out is not None and args.out != "-":
            write_out(data, args.out)
        print_json(
            {
                "ok": True,
                "op": op.value,
                "authority": args.authority,
                "capabilities": sorted(args.capability or []),
                "embassy_keyid": target,
                "expires_unix": expires,
                "out": None if args.out in (None, "-") else args.out,
                # The signed instruction itself (a DSSE envelope), an object, not a string.
                "instruction": json.loads(data),
            }
        )
    else:
        write_out(data, args.out)
    sys.stderr.write(
        f"instruction {op.value} {sorted(args.capability or [])} by {args.authority!r} "
        f"for embassy {target[:16]}…; expires at {expires}\n"
    )
    return 0


def _reading_bytes(path: str) -> bytes:
    """A meter-reading statement: its DSSE JSON, or that in base64 as the daemon returns it."""
    from embassy.wire.codec import b64decode

    data = read_input(path).strip()
    if data.startswith(b"{"):
        return data
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise WireFormatError(f"{path}: neither a DSSE envelope nor its base64") from None
    return b64decode(text, f"{path}: meter reading")


def _cmd_meters_read(args: argparse.Namespace) -> int:
    from embassy.metering.instruction import (
        INSTRUCTION_PAYLOAD_TYPE,
        Op,
        parse_instruction_payload,
    )
    from embassy.metering.reading import open_reading
    from embassy.verify.identity import verify_identity_document
    from embassy.wire.dsse import keyid, parse_envelope

    key = load_signing_key(args.key)
    digest = None
    if args.instruction:
        envelope = parse_envelope(read_input(args.instruction).strip())
        if envelope.payload_type != INSTRUCTION_PAYLOAD_TYPE:
            raise WireFormatError(f"{args.instruction}: not an instruction")
        instruction = parse_instruction_payload(envelope.payload)
        if instruction.op is not Op.READ or instruction.authority != args.authority:
            raise ConfigError(
                f"{args.instruction}: a {instruction.op.value} instruction of "
                f"{instruction.authority!r}, not a read of {args.authority!r}"
            )
        digest = instruction.digest
    reading_data = _reading_bytes(args.reading)
    identity = verify_identity_document(read_input(args.identity), trust_policy(args))
    reading = open_reading(
        reading_data,
        embassy_key=identity.signing_key,
        embassy_keyid=keyid(identity.signing_key),
        signing_key=key,
        authority=args.authority,
        instruction_sha256=digest,
    )
    assert reading.header is not None  # open_reading sets it from the verified statement
    result = {
        "authority": reading.authority,
        "instruction_sha256": reading.instruction_sha256.hex(),
        "formula": reading.formula,
        "as_of_seq": reading.as_of_seq,
        "statement_seq": reading.header.seq,
        "meters": [m.to_json() for m in reading.meters],
    }
    if args.json:
        # The prose form is this object already; --json adds what the stderr note says.
        print_json(
            {
                "ok": True,
                **result,
                "embassy_keyid": keyid(identity.signing_key),
                "answers_instruction": digest is not None,
            }
        )
    else:
        sys.stdout.write(json.dumps(result, sort_keys=True) + "\n")
    sys.stderr.write(
        f"meters read: signed by embassy {keyid(identity.signing_key)[:16]}… and decrypted"
        + ("" if digest is None else ", answering your instruction")
        + f"; check its log position (seq {reading.header.seq}) with `embassy verify statement`\n"
    )
    return 0


def add_parser(sub: Any) -> None:
    meters = sub.add_parser("meters", help="instruct an embassy and read its meters (authority)")
    kinds = meters.add_subparsers(dest="what", required=True)
    instruct = kinds.add_parser("instruct", help="sign an instruction for a verified embassy")
    read = kinds.add_parser("read", help="verify and decrypt a meter-reading statement")
    for p in (instruct, read):
        p.add_argument(
            "--key", required=True, metavar="FILE", help="the authority's private key (PEM)"
        )
        p.add_argument(
            "--authority", required=True, metavar="NAME", help="the authority's name in the policy"
        )
        p.add_argument(
            "--identity", required=True, metavar="FILE", help="the embassy's identity document"
        )
    instruct.add_argument("--op", required=True, choices=["write", "update", "read"])
    instruct.add_argument(
        "--capability",
        action="append",
        metavar="C",
        help="a capability (repeatable; write names one)",
    )
    instruct.add_argument(
        "--polarity", choices=["positive", "negative"], help="write only: the samples' kind"
    )
    instruct.add_argument(
        "--ttl",
        type=positive_int,
        default=3600,
        metavar="SECONDS",
        help="seconds until the instruction expires (default 3600)",
    )
    instruct.add_argument(
        "--out", metavar="FILE", help="write the instruction here (default stdout)"
    )
    instruct.set_defaults(func=_cmd_meters_instruct)
    read.add_argument("--instruction", metavar="FILE", help="the read instruction it must answer")
    read.add_argument(
        "reading", metavar="READING", help="the meter-reading statement (JSON or base64; '-' stdin)"
    )
    read.set_defaults(func=_cmd_meters_read)
    for p in (instruct, read):
        add_policy_args(p)
        add_json_arg(p)
