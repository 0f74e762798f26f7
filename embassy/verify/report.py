"""Run one ``embassy verify`` kind and describe what was proved, for humans and machines.

A thin layer over :class:`embassy.verify.api.Verifier`: read the files the arguments name,
call the API, turn its result into ``{"ok", "checks", "facts"}``.
"""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Callable
from typing import Any

from embassy.errors import ConfigError, WireFormatError
from embassy.verify.api import Verifier
from embassy.verify.evidence import VerifiedEvidence
from embassy.verify.identity import VerifiedIdentity
from embassy.verify.logs import verify_segments
from embassy.verify.policy import TrustPolicy

Reader = Callable[[str], bytes]

__all__ = ["Reader", "run", "verify_segments"]


def _identity_facts(identity: VerifiedIdentity) -> list[str]:
    facts = [
        f"measurement {identity.measurement.digest.hex()}",
        f"signing key {identity.keys['signing']['keyid']}",
        f"AK name {identity.ak.name().hex()}",
        f"TPM mode {identity.tpm_mode.value}, boot {identity.segment.reset_count}",
        *(identity.tpm.describe() if identity.tpm is not None else []),
    ]
    workload = identity.workload
    if workload is None:
        facts.append("workload: none launched by this run")
    else:
        facts.append(
            f"workload {workload.name!r} ({workload.image}): image digest "
            f"{workload.image_digest}, launch digest {workload.launch_digest.hex()} "
            f"(launch events seq {workload.first_seq}..{workload.last_seq})"
        )
    return facts


def _hex_arg(value: str, flag: str) -> bytes:
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise ConfigError(f"{flag}: not hex: {value!r}") from None


def _evidence(
    verifier: Verifier,
    identity: VerifiedIdentity,
    read: Reader,
    *,
    path: str | None,
    nonce: str | None,
    flag: str,
) -> VerifiedEvidence | None:
    if path is None and nonce is None:
        return None
    if path is None or nonce is None:
        raise ConfigError(f"{flag} and {flag}-nonce go together: the evidence and your nonce")
    return verifier.evidence(identity, read(path), _hex_arg(nonce, f"{flag}-nonce"))


def run(kind: str, args: argparse.Namespace, policy: TrustPolicy, read: Reader) -> dict[str, Any]:
    verifier = Verifier(policy)
    if kind == "identity":
        identity = verifier.identity(read(args.file))
        return {"ok": True, "checks": list(identity.checks), "facts": _identity_facts(identity)}
    identity = verifier.identity(read(args.identity))
    checks = [f"identity:{c}" for c in identity.checks]
    if kind == "log":
        complete = None
        if getattr(args, "complete", False):
            if not getattr(args, "evidence", None) or not getattr(args, "nonce", None):
                raise ConfigError(
                    "--complete needs --evidence FILE and --nonce HEX: fresh evidence over "
                    "your nonce, taken after you fetched the log"
                )
            complete = _evidence(
                verifier, identity, read, path=args.evidence, nonce=args.nonce, flag="--evidence"
            )
        log = verifier.log(identity, *(read(f) for f in args.file), complete_with=complete)
        return {"ok": True, "checks": [*checks, *log.checks], "facts": log.facts()}
    if kind == "evidence":
        evidence = verifier.evidence(identity, read(args.file), _hex_arg(args.nonce, "--nonce"))
        return {
            "ok": True,
            "checks": [*checks, *evidence.segment.checks, "nonce"],
            "facts": evidence.facts(),
        }
    if kind == "statement":
        found = verifier.statement(identity, read(args.file).rstrip(b"\n"), read(args.log))
        return {"ok": True, "checks": [*checks, *found.checks], "facts": found.facts()}
    if kind == "result":
        payload_id = _hex_arg(args.payload_id, "--payload-id") if args.payload_id else None
        before = _evidence(
            verifier,
            identity,
            read,
            path=getattr(args, "before", None),
            nonce=getattr(args, "before_nonce", None),
            flag="--before",
        )
        after = _evidence(
            verifier,
            identity,
            read,
            path=getattr(args, "after", None),
            nonce=getattr(args, "after_nonce", None),
            flag="--after",
        )
        result = verifier.result(
            identity, read(args.file), payload_id=payload_id, before=before, after=after
        )
        out: dict[str, Any] = {
            "ok": True,
            "checks": [*checks, *result.checks],
            "facts": result.facts(),
            "output_sha256": hashlib.sha256(result.output).hexdigest(),
            "session": result.session,
            "payload_id": result.payload_id,
            "deadline_unix": result.deadline_unix,
        }
        if result.window is not None:
            out["window"] = result.window.to_json()
        return out
    if kind == "job":
        payload_id = _hex_arg(args.payload_id, "--payload-id") if args.payload_id else None
        job = verifier.job(
            identity,
            read(args.file),
            reply_key=getattr(args, "reply_private", None),
            payload_id=payload_id,
        )
        return {
            "ok": True,
            "checks": [*checks, *job.checks],
            "facts": job.facts(),
            "job": job.job,
            "container_id": job.container_id,
            "output_sha256": job.output_sha256,
            "checked_gone": job.checked_gone,
        }
    raise WireFormatError(f"unknown verify kind {kind!r}")
