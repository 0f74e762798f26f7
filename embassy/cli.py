"""The ``embassy`` command. Thin: parse arguments, call the library, map errors to exits.

Exit codes (the one place they are decided):

====  ===========================================================
0     everything checked / the command did what it says
1     verification failed (the reason is printed)
2     usage or config error, or a launch refused by policy
3     malformed input (a file that is not what it claims)
4     TPM, firewall or Docker error
5     durable state unreadable or tampered
6     the daemon refused the request
7     cannot reach the daemon
====  ===========================================================
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from embassy.errors import (
    ActivationError,
    ConfigError,
    EmbassyError,
    PolicyError,
    RequestError,
    SealError,
    StorageError,
    TpmError,
    VerificationError,
    WireFormatError,
    WorkloadError,
)

_EXIT: tuple[tuple[type[EmbassyError], int], ...] = (
    (VerificationError, 1),
    (ConfigError, 2),
    (PolicyError, 2),
    (WireFormatError, 3),
    (ActivationError, 3),
    (TpmError, 4),
    (SealError, 4),
    (WorkloadError, 4),
    (StorageError, 5),
    (RequestError, 6),
)
EXIT_CONNECT = 7


def exit_code_for(error: EmbassyError) -> int:
    from embassy.client import ConnectError

    if isinstance(error, ConnectError):
        return EXIT_CONNECT
    for cls, code in _EXIT:
        if isinstance(error, cls):
            return code
    return 1


def _read(path: str) -> bytes:
    try:
        return sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None


def _hex(text: str, what: str, size: int | None = None) -> bytes:
    try:
        value = bytes.fromhex(text)
    except ValueError:
        raise ConfigError(f"{what}: not hex: {text!r}") from None
    if size is not None and len(value) != size:
        raise ConfigError(f"{what}: expected {size} bytes, got {len(value)}")
    return value


def _write_out(data: bytes, out: str | None) -> None:
    if out is None or out == "-":
        sys.stdout.buffer.write(data + b"\n")
    else:
        from embassy.daemon.atomic import write_atomic

        write_atomic(Path(out), data, mode=0o644)


# -- commands --------------------------------------------------------------------------


def _cmd_serve(args: argparse.Namespace) -> int:
    from embassy import logs
    from embassy.config import load_config
    from embassy.daemon.runtime import serve

    config = load_config(Path(args.config) if args.config else None, os.environ)
    logs.configure(config.log_level)
    serve(config)
    return 0


def _cmd_measure(args: argparse.Namespace) -> int:
    from embassy.config import load_config
    from embassy.measure import measure

    m = measure(load_config(Path(args.config) if args.config else None))
    sys.stdout.write(m.encode().decode() + "\n" if args.json else m.digest.hex() + "\n")
    return 0


def _cmd_identity(args: argparse.Namespace) -> int:
    from embassy.client import call
    from embassy.wire.codec import canonical_json

    socket_path = Path(args.socket)
    doc = call(socket_path, "GET", "/v1/identity")
    if args.no_activate:
        sys.stderr.write(
            "identity: WARNING --no-activate: the AK is not proven to live in the TPM whose "
            "EK certificate the document carries\n"
        )
    else:
        _activate(socket_path, doc)
        sys.stderr.write(
            "identity: credential activation passed: the AK is in the TPM that "
            "holds the certified EK\n"
        )
    _write_out(canonical_json(doc), args.out)
    return 0


def _activate(socket_path: Path, doc: dict[str, Any]) -> None:
    """Challenge the daemon to prove its AK and the certified EK share one TPM."""
    from embassy.attest.credential import check_activation, make_credential
    from embassy.attest.marshal import parse_public
    from embassy.client import call
    from embassy.verify.identity import identity_keys_unverified
    from embassy.wire.codec import b64decode, b64encode

    ak_raw, ek_raw = identity_keys_unverified(doc)
    secret = os.urandom(32)
    blob, encrypted = make_credential(parse_public(ek_raw), parse_public(ak_raw).name(), secret)
    answer = call(
        socket_path,
        "POST",
        "/v1/attestation/activate-credential",
        {"credential_blob": b64encode(blob), "encrypted_secret": b64encode(encrypted)},
    )
    check_activation(secret, b64decode(answer.get("secret"), "secret"))


def _policy(args: argparse.Namespace) -> Any:
    from embassy.attest.ek import load_pem_bundle
    from embassy.verify.policy import TrustPolicy

    pcrs: dict[int, bytes] = {}
    for item in args.expect_pcr or []:
        index, _, value = item.partition("=")
        if not index.isdigit() or not value:
            raise ConfigError(f"--expect-pcr {item!r}: expected N=HEX")
        pcrs[int(index)] = _hex(value, f"--expect-pcr {index}", 32)
    cas: list[Any] = []
    for path in args.ek_ca or []:
        cas += load_pem_bundle(_read(path))
    return TrustPolicy(
        ek_cas=tuple(cas),
        expected_measurement=(
            _hex(args.expect_measurement, "--expect-measurement", 32)
            if args.expect_measurement
            else None
        ),
        expected_pcrs=pcrs,
        allow_software_tpm=args.allow_software_tpm,
        insecure_skip_ek_ca=args.insecure_skip_ek_ca,
        insecure_any_measurement=args.insecure_any_measurement,
    )


def _cmd_verify(args: argparse.Namespace) -> int:
    from embassy.verify import report

    result = report.run(args.what, args, _policy(args), _read)
    if args.json:
        sys.stdout.write(json.dumps(result, sort_keys=True) + "\n")
    else:
        for check in result["checks"]:
            sys.stdout.write(f"ok    {check}\n")
        for line in result.get("facts", []):
            sys.stdout.write(f"      {line}\n")
        sys.stdout.write("verified\n")
    return 0


# -- parser ----------------------------------------------------------------------------


def _add_policy_args(p: Any) -> None:
    """What an auditor or user trusts: the same flags wherever evidence is checked."""
    p.add_argument(
        "--ek-ca", action="append", help="PEM CA bundle the EK cert must chain to (repeatable)"
    )
    p.add_argument("--expect-measurement", help="the embassy measurement you rebuilt (hex)")
    p.add_argument("--expect-pcr", action="append", help="pin a boot PCR: N=HEX")
    p.add_argument(
        "--allow-software-tpm",
        action="store_true",
        help="INSECURE: accept evidence from a software TPM (testing only)",
    )
    p.add_argument(
        "--insecure-skip-ek-ca",
        action="store_true",
        help="INSECURE: do not check the EK certificate's issuer",
    )
    p.add_argument(
        "--insecure-any-measurement",
        action="store_true",
        help="INSECURE: accept any embassy measurement",
    )


def _cmd_payload_seal(args: argparse.Namespace) -> int:
    from embassy.payload.envelope import seal_input
    from embassy.verify.identity import verify_identity_document
    from embassy.wire.codec import canonical_json

    # Never wrap a key to an embassy whose identity does not verify under your policy.
    identity = verify_identity_document(_read(args.identity), _policy(args))
    try:
        with open(args.input, "rb") as src, open(args.out, "wb") as dst:
            envelope, _key = seal_input(
                identity.keys, src, dst, suite=args.suite, ttl_seconds=args.ttl
            )
    except OSError as exc:
        raise ConfigError(f"payload: {exc.filename}: {exc.strerror}") from None
    _write_out(canonical_json(envelope.to_json()), args.envelope)
    sys.stderr.write(
        f"payload {envelope.payload_id.hex()} sealed to embassy {envelope.embassy_keyid[:16]}… "
        f"({envelope.suite}); expires at {envelope.expires_unix}\n"
    )
    return 0


def _payload_parser(sub: Any) -> None:
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
    seal.add_argument("--ttl", type=int, default=3600, help="seconds until the payload expires")
    _add_policy_args(seal)
    seal.set_defaults(func=_cmd_payload_seal)


def _verify_parser(sub: Any) -> None:
    verify = sub.add_parser("verify", help="check evidence offline (no TPM, root or Docker)")
    verify.set_defaults(func=_cmd_verify)
    kinds = verify.add_subparsers(dest="what", required=True)
    specs = {
        "identity": "an identity document",
        "log": "log segments (GET /v1/log), against an identity document",
        "statement": "one statement envelope, found in a verified log segment",
        "evidence": "fresh evidence (GET /v1/evidence) over your nonce",
        "result": "a result bundle: output, seal and unseal statements, and their log",
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
        if name == "result":
            p.add_argument("--payload-id", help="your payload's id (hex): the session opened it")
        _add_policy_args(p)
        p.add_argument("--json", action="store_true", help="machine-readable result")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="embassy", description=__doc__.splitlines()[0] if __doc__ else None
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the daemon")
    serve.add_argument("--config", help="YAML config file (default: built-in defaults)")
    serve.set_defaults(func=_cmd_serve)
    identity = sub.add_parser("identity", help="fetch the identity document from a daemon")
    identity.add_argument("--socket", default="/run/embassy/embassy.sock")
    identity.add_argument("--out", help="write the document here (default stdout)")
    identity.add_argument(
        "--no-activate",
        action="store_true",
        help="skip the live credential-activation check of AK and EK",
    )
    identity.set_defaults(func=_cmd_identity)
    measure = sub.add_parser("measure", help="print the reproducible measurement")
    measure.add_argument("--config", help="the config file the daemon runs with")
    measure.add_argument("--json", action="store_true", help="print all components")
    measure.set_defaults(func=_cmd_measure)
    _verify_parser(sub)
    _payload_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0)
    try:
        return int(args.func(args))
    except EmbassyError as exc:
        code = exit_code_for(exc)
        if getattr(args, "json", False) and args.command == "verify":
            sys.stdout.write(
                json.dumps({"ok": False, "error": {"code": exc.code, "message": exc.message}})
                + "\n"
            )
        sys.stderr.write(f"embassy: {exc.code}: {exc.message}\n")
        return code
