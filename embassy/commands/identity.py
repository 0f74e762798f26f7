"""``embassy identity``: fetch a daemon's identity document, proving its AK live by credential
activation (the AK and the certified EK share one TPM) unless told not to."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from embassy.commands.inputs import write_out
from embassy.commands.output import add_json_arg, print_json
from embassy.commands.progress import progress_for


def _cmd_identity(args: argparse.Namespace) -> int:
    from embassy.client import call
    from embassy.wire.codec import canonical_json

    socket_path = Path(args.socket)
    progress = progress_for(args)
    with progress.step("identity: waiting for the daemon's identity document"):
        doc = call(socket_path, "GET", "/v1/identity")
    ak_name = None
    if args.no_activate:
        sys.stderr.write(
            "identity: WARNING --no-activate: the AK is not proven to live in the TPM whose "
            "EK certificate the document carries\n"
        )
    else:
        with progress.step("identity: waiting for the TPM's credential activation"):
            ak_name = activate(socket_path, doc)
        sys.stderr.write(
            "identity: credential activation passed: the AK is in the TPM that "
            "holds the certified EK\n"
        )
    if args.json:
        if args.out is not None and args.out != "-":
            write_out(canonical_json(doc), args.out)
        print_json(
            {
                "ok": True,
                "activated": ak_name is not None,
                "ak_name": None if ak_name is None else ak_name.hex(),
                "identity": doc,
                "out": None if args.out in (None, "-") else args.out,
            }
        )
    else:
        write_out(canonical_json(doc), args.out)
    return 0


def activate(socket_path: Path, doc: dict[str, Any]) -> bytes:
    """Challenge the daemon to prove its AK and the certified EK share one TPM; return the
    AK's TPM name."""
    from embassy.attest.credential import check_activation, make_credential
    from embassy.attest.marshal import parse_public
    from embassy.client import call
    from embassy.verify.identity import identity_tpm_unverified
    from embassy.wire.codec import b64decode, b64encode

    ak_raw, ek_raw, _ = identity_tpm_unverified(doc)
    ak_name = parse_public(ak_raw).name()
    secret = os.urandom(32)
    blob, encrypted = make_credential(parse_public(ek_raw), ak_name, secret)
    answer = call(
        socket_path,
        "POST",
        "/v1/attestation/activate-credential",
        {"credential_blob": b64encode(blob), "encrypted_secret": b64encode(encrypted)},
    )
    check_activation(secret, b64decode(answer.get("secret"), "secret"))
    return ak_name


def add_parser(sub: Any) -> None:
    identity = sub.add_parser("identity", help="fetch the identity document from a daemon")
    identity.add_argument("--socket", default="/run/embassy/embassy.sock")
    identity.add_argument("--out", help="write the document here (default stdout)")
    identity.add_argument(
        "--no-activate",
        action="store_true",
        help="skip the live credential-activation check of AK and EK",
    )
    add_json_arg(identity)
    identity.set_defaults(func=_cmd_identity)
