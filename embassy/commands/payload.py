"""``embassy payload seal`` (user side): encrypt an input to an embassy whose identity verifies
under your policy, bound to its measurement and workload, with authorities' instructions
sealed into the payload's actions."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from embassy.commands.inputs import positive_int, read_input, write_out
from embassy.commands.output import add_json_arg, print_json, refuse_stdout
from embassy.commands.policy import add_policy_args, trust_policy
from embassy.commands.progress import counting, progress_for
from embassy.errors import ConfigError, WireFormatError


def _cmd_payload_seal(args: argparse.Namespace) -> int:
    from embassy.metering.actions import MAX_INSTRUCTIONS, seal_actions
    from embassy.payload.envelope import make_payload
    from embassy.verify.identity import verify_identity_document
    from embassy.wire.codec import canonical_json
    from workload_sdk.stream import encrypt_stream

    paths: list[str] = args.instruction or []
    if paths and not args.actions:
        raise ConfigError(
            "payload seal: --instruction needs --actions (where the sealed actions go)"
        )
    if args.actions and not paths:
        raise ConfigError("payload seal: --actions needs at least one --instruction")
    if args.unmetered_ok and not paths:
        raise ConfigError("payload seal: --unmetered-ok applies only with --instruction")
    if len(paths) > MAX_INSTRUCTIONS:
        raise ConfigError(f"payload seal: at most {MAX_INSTRUCTIONS} --instruction per payload")
    # Never wrap a key to an embassy whose identity does not verify under your policy.
    identity = verify_identity_document(read_input(args.identity), trust_policy(args))
    reply_key = _reply_public(args.reply_key) if args.reply_key else None
    if args.job:
        # A job's payload binds the jobs' launch digest (the identity's jobs-ready statement).
        from embassy.verify.job import jobs_launch

        if reply_key is None:
            raise ConfigError("payload seal --job: a job's result needs --reply-key")
        launch_digest = jobs_launch(identity).launch_digest
    elif identity.workload is None:
        raise ConfigError(
            "payload seal: the identity shows no workload launched beside the embassy, and a "
            "payload is bound to the workload that opens it (for a job: --job)"
        )
    else:
        launch_digest = identity.workload.launch_digest
    if args.actions is not None:
        refuse_stdout(args, args.actions, "--actions")
    instructions = _instructions_for(paths, identity.keys, args.ttl)
    # Bound to what the verified identity proves: only an embassy of this measurement,
    # running this workload, opens the payload.
    envelope, input_key, action_key = make_payload(
        identity.keys,
        measurement=identity.measurement.digest,
        launch_digest=launch_digest,
        suite=args.suite,
        ttl_seconds=args.ttl,
        action_key=bool(paths),
        reply_key=reply_key,
    )
    progress = progress_for(args)
    try:
        with open(args.input, "rb") as src, open(args.out, "wb") as dst:
            size = os.fstat(src.fileno()).st_size
            with progress.step(f"payload seal: encrypting {args.input}", size or None) as step:
                written = encrypt_stream(input_key, envelope.payload_id, counting(src, step), dst)
    except OSError as exc:
        raise ConfigError(f"payload: {exc.filename}: {exc.strerror}") from None
    if not (args.json and args.envelope == "-"):  # with --json, stdout's is in the document
        write_out(canonical_json(envelope.to_json()), args.envelope)
    if action_key is not None:
        blob = seal_actions(
            action_key, envelope.payload_id, instructions, unmetered_ok=args.unmetered_ok
        )
        write_out(blob, args.actions, newline=False)
    _report(
        args,
        envelope,
        identity=identity,
        instructions=instructions,
        reply_key=reply_key,
        written=written,
    )
    return 0


def _report(
    args: argparse.Namespace,
    envelope: Any,
    *,
    identity: Any,
    instructions: Sequence[bytes],
    reply_key: Any,
    written: int,
) -> None:
    """What was sealed: the ``--json`` document on stdout, and the prose note on stderr."""
    workload = "jobs" if identity.workload is None or args.job else identity.workload.name
    if args.json:
        print_json(
            {
                "ok": True,
                "payload_id": envelope.payload_id.hex(),
                "embassy_keyid": envelope.embassy_keyid,
                "suite": envelope.suite,
                "measurement": envelope.measurement.hex(),
                "launch_digest": envelope.launch_digest.hex(),
                "workload": workload,
                "expires_unix": envelope.expires_unix,
                "instructions": len(instructions),
                "unmetered_ok": bool(args.unmetered_ok),
                "reply_keyid": None if reply_key is None else reply_key.keyid(),
                "out": args.out,
                "stream_bytes": written,
                "envelope_file": None if args.envelope == "-" else args.envelope,
                "actions_file": args.actions,
                "envelope": envelope.to_json(),
            }
        )
    sys.stderr.write(
        f"payload {envelope.payload_id.hex()} sealed to embassy {envelope.embassy_keyid[:16]}… "
        f"({envelope.suite}), measurement {envelope.measurement.hex()[:16]}…, workload "
        f"{workload} "
        f"(launch digest {envelope.launch_digest.hex()[:16]}…); "
        f"expires at {envelope.expires_unix}"
        + (
            f"; {len(instructions)} instruction(s) sealed in its actions"
            + (" (unmetered if refused)" if args.unmetered_ok else "")
            if instructions
            else ""
        )
        + ("" if reply_key is None else f"; results to reply key {reply_key.keyid()[:16]}…")
        + "\n"
    )


def _reply_public(path: str) -> Any:
    """A reply key's public JSON (what ``keygen --reply`` printed)."""
    from embassy.payload.envelope import ReplyKey

    return ReplyKey.parse(read_input(path).strip(), f"{path}: reply key")


def _instructions_for(paths: Sequence[str], identity_keys: Any, ttl: int) -> list[bytes]:
    """Read signed instructions and refuse any the embassy would refuse for the asking."""
    from embassy.metering.instruction import (
        INSTRUCTION_PAYLOAD_TYPE,
        parse_instruction_payload,
    )
    from embassy.payload.envelope import embassy_keyid
    from embassy.wire.dsse import parse_envelope

    own, now = embassy_keyid(identity_keys), int(time.time())
    out = []
    for path in paths:
        data = read_input(path).strip()  # JSON: trailing whitespace (a newline) means nothing
        envelope = parse_envelope(data)
        if envelope.payload_type != INSTRUCTION_PAYLOAD_TYPE:
            raise WireFormatError(f"{path}: not an instruction ({envelope.payload_type!r})")
        instruction = parse_instruction_payload(envelope.payload)
        if instruction.embassy_keyid != own:
            raise ConfigError(
                f"{path}: the instruction is for embassy {instruction.embassy_keyid[:16]}…, "
                f"not this one ({own[:16]}…)"
            )
        if instruction.expires_unix <= now:
            raise ConfigError(f"{path}: the instruction expired at {instruction.expires_unix}")
        if instruction.expires_unix < now + ttl:
            sys.stderr.write(
                f"embassy: WARNING {path}: the instruction expires at "
                f"{instruction.expires_unix}, before the payload does; a session opened later "
                "is refused\n"
            )
        out.append(data)
    return out


def add_parser(sub: Any) -> None:
    payload = sub.add_parser("payload", help="make sealed payloads (user side)")
    kinds = payload.add_subparsers(dest="what", required=True)
    seal = kinds.add_parser(
        "seal", help="encrypt an input to a verified embassy: a stream and its envelope"
    )
    seal.add_argument("--identity", required=True, help="the embassy's identity document")
    seal.add_argument("--in", dest="input", required=True, help="the plaintext input file")
    seal.add_argument("--out", required=True, help="where to write the encrypted stream")
    seal.add_argument("--envelope", required=True, help="where to write the envelope (JSON)")
    seal.add_argument(
        "--suite", choices=["mlkem768-x25519", "x25519"], default="mlkem768-x25519",
        help="HPKE suite (default: the post-quantum hybrid)",
    )  # fmt: skip
    seal.add_argument(
        "--ttl", type=positive_int, default=3600, help="seconds until the payload expires"
    )
    seal.add_argument(
        "--instruction",
        action="append",
        metavar="FILE",
        help="an authority's signed instruction to seal into the payload's actions (repeatable)",
    )
    seal.add_argument(
        "--actions", metavar="OUT", help="where to write the sealed actions (with --instruction)"
    )
    seal.add_argument(
        "--job",
        action="store_true",
        help="for a job (POST /v1/jobs): bind the identity's jobs launch digest, not its "
        "workload's (needs --reply-key)",
    )
    seal.add_argument(
        "--reply-key",
        metavar="FILE",
        help="your reply key's public JSON (keygen --reply printed it): a job's result is "
        "encrypted to it",
    )
    seal.add_argument(
        "--unmetered-ok",
        action="store_true",
        help="if the embassy refuses an instruction, run the session unmetered (default: abort)",
    )
    add_policy_args(seal)
    add_json_arg(seal)
    seal.set_defaults(func=_cmd_payload_seal)
