"""``embassy registrar``: create the registrar's CA, enrol an embassy, install a chain.

- ``init --dir D``: a new CA key (encrypted with ``EMBASSY_REGISTRAR_PASSPHRASE``) and its
  self-signed certificate ``D/registrar-ca.pem``, the file auditors pin with ``--ak-ca``.
- ``enroll --dir D --socket S --ek-ca/--swtpm-ca F``: check the embassy's EK certificate, run
  credential activation through its socket, issue the AK certificate and install it in the
  daemon (``POST /v1/attestation/ak-certificate``), which serves it in its identity document.
- ``install --socket S --chain F``: install an AK certificate chain obtained elsewhere (a
  cloud vTPM's own AK certificate, or one ``issue`` wrote), checked by the daemon.
- Relayed, for a registrar elsewhere (:mod:`embassy.registrar.relay`): ``challenge --dir D
  --identity F`` on the registrar, ``answer --socket S --challenge F`` on the host, ``issue
  --dir D --answer F`` on the registrar, then ``install`` on the host.
"""

from __future__ import annotations

import argparse
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from embassy.commands.output import add_json_arg
from embassy.commands.output import emit as _emit
from embassy.commands.progress import progress_for
from embassy.errors import ConfigError

PASSPHRASE_ENV = "EMBASSY_REGISTRAR_PASSPHRASE"  # noqa: S105 (the variable's name)


def _passphrase() -> bytes:
    value = os.environ.get(PASSPHRASE_ENV, "")
    if not value:
        raise ConfigError(
            f"set {PASSPHRASE_ENV}: the registrar's CA key is stored encrypted under it"
        )
    return value.encode("utf-8")


def _bundle(paths: list[str] | None) -> tuple[Any, ...]:
    from embassy.attest.chain import load_pem_bundle

    out: list[Any] = []
    for path in paths or []:
        try:
            out += load_pem_bundle(Path(path).read_bytes())
        except OSError as exc:
            raise ConfigError(f"{path}: {exc.strerror}") from None
    return tuple(out)


class SocketAttester:
    """The embassy reached through its Unix socket."""

    def __init__(self, socket_path: Path) -> None:
        self._socket = socket_path

    def identity_document(self) -> dict[str, Any]:
        from embassy.client import call

        return call(self._socket, "GET", "/v1/identity")

    def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        from embassy.client import call
        from embassy.wire.codec import b64decode, b64encode

        answer = call(
            self._socket,
            "POST",
            "/v1/attestation/activate-credential",
            {
                "credential_blob": b64encode(credential_blob),
                "encrypted_secret": b64encode(encrypted_secret),
            },
        )
        return b64decode(answer.get("secret"), "secret")

    def install_ak_chain(self, chain: list[bytes]) -> dict[str, Any]:
        from embassy.client import call
        from embassy.wire.codec import b64encode

        return call(
            self._socket,
            "POST",
            "/v1/attestation/ak-certificate",
            {"ak_certificates": [b64encode(c) for c in chain]},
        )


def _cmd_init(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import hashes

    from embassy.registrar.ca import CERT_FILE, init_ca

    issuer = init_ca(
        Path(args.dir),
        _passphrase(),
        name=args.name,
        now=datetime.now(UTC),
        lifetime=timedelta(days=args.days),
    )
    sha = issuer.certificate.fingerprint(hashes.SHA256()).hex()
    path = Path(args.dir) / CERT_FILE
    _emit(
        args,
        {"certificate": str(path), "sha256": sha},
        f"registrar: CA {args.name!r} created; auditors pin {path} (sha256 {sha})",
    )
    return 0


def _cmd_enroll(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives.serialization import Encoding

    from embassy.daemon.atomic import write_atomic
    from embassy.registrar.ca import load_ca
    from embassy.registrar.enroll import chain_for, enroll

    issuer = load_ca(Path(args.dir), _passphrase())
    trust = _trust(args)
    attester = SocketAttester(Path(args.socket))
    progress = progress_for(args)
    with progress.step("registrar: enrolling (the daemon's TPM activates the credential)"):
        enrollment = enroll(
            attester, issuer, trust, now=datetime.now(UTC), lifetime=timedelta(days=args.days)
        )
    chain = chain_for(enrollment)
    if args.out:
        write_atomic(Path(args.out), enrollment.certificate.public_bytes(Encoding.PEM), 0o644)
    if not args.no_install:
        with progress.step("registrar: waiting for the daemon to install the chain"):
            attester.install_ak_chain(chain)
    kind = enrollment.ek.kind.value
    _emit(
        args,
        {
            "ak_name": enrollment.ak_name.hex(),
            "tpm_kind": kind,
            "tpm": enrollment.ek.attributes.describe(),
            "serial": format(enrollment.certificate.serial_number, "x"),
            "installed": not args.no_install,
        },
        f"registrar: AK {enrollment.ak_name.hex()} is in a {kind} TPM "
        f"({enrollment.ek.attributes.describe()}); certificate serial "
        f"{enrollment.certificate.serial_number:x}"
        + ("" if args.no_install else ", installed in the daemon"),
    )
    return 0


def _trust(args: argparse.Namespace) -> Any:
    from embassy.registrar.enroll import EkTrust

    trust = EkTrust(_bundle(args.ek_ca), _bundle(args.swtpm_ca), args.allow_software_tpm)
    if not trust.hardware and not trust.software:
        raise ConfigError("name the EK CAs you trust: --ek-ca (hardware) or --swtpm-ca")
    return trust


def _read_file(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None


def _cmd_challenge(args: argparse.Namespace) -> int:
    from embassy.daemon.atomic import write_atomic
    from embassy.registrar.enroll import make_challenge
    from embassy.registrar.relay import PendingStore, challenge_json
    from embassy.wire.codec import canonical_json, parse_json_object

    doc = parse_json_object(_read_file(args.identity), args.identity)
    challenge = make_challenge(doc, _trust(args), now=datetime.now(UTC))
    challenge_id = PendingStore(Path(args.dir)).put(challenge)
    write_atomic(Path(args.out), canonical_json(challenge_json(challenge_id, challenge)), 0o644)
    _emit(
        args,
        {"id": challenge_id.hex(), "ak_name": challenge.ak_name.hex()},
        f"registrar: challenge {challenge_id.hex()} for AK {challenge.ak_name.hex()} written to "
        f"{args.out}; have the host answer it (`embassy registrar answer`)",
    )
    return 0


def _cmd_answer(args: argparse.Namespace) -> int:
    from embassy.daemon.atomic import write_atomic
    from embassy.registrar.relay import answer_json, parse_challenge
    from embassy.wire.codec import canonical_json

    relayed = parse_challenge(_read_file(args.challenge))
    with progress_for(args).step("registrar: waiting for the daemon's TPM to answer"):
        secret = SocketAttester(Path(args.socket)).activate_credential(
            relayed.credential_blob, relayed.encrypted_secret
        )
    # Only the registrar that made the challenge can use this; it is one-use.
    write_atomic(Path(args.out), canonical_json(answer_json(relayed.id, secret)), 0o600)
    _emit(args, {"id": relayed.id.hex()}, f"registrar: answer written to {args.out}")
    return 0


def _cmd_issue(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives.serialization import Encoding

    from embassy.daemon.atomic import write_atomic
    from embassy.registrar.ca import load_ca
    from embassy.registrar.enroll import Challenge, check_tpm, complete
    from embassy.registrar.relay import PendingStore, parse_answer

    challenge_id, secret = parse_answer(_read_file(args.answer))
    issuer = load_ca(Path(args.dir), _passphrase())
    pending = PendingStore(Path(args.dir)).take(challenge_id, now=datetime.now(UTC).timestamp())
    now = datetime.now(UTC)
    certified = check_tpm(
        pending.ak_public, pending.ek_public, pending.ek_certificate, _trust(args), now=now
    )
    kept = Challenge(
        pending.ak_public,
        pending.ek_public,
        pending.ek_certificate,
        certified,
        b"",
        b"",
        pending.secret,
    )
    enrollment = complete(kept, secret, issuer, now=now, lifetime=timedelta(days=args.days))
    write_atomic(Path(args.out), enrollment.certificate.public_bytes(Encoding.PEM), 0o644)
    _emit(
        args,
        {"ak_name": enrollment.ak_name.hex(), "tpm_kind": certified.kind.value},
        f"registrar: AK {enrollment.ak_name.hex()} certified; install {args.out} on the host "
        "(`embassy registrar install`)",
    )
    return 0


def _cmd_install(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives.serialization import Encoding

    chain = [c.public_bytes(Encoding.DER) for c in _bundle([args.chain])]
    with progress_for(args).step("registrar: waiting for the daemon to install the chain"):
        answer = SocketAttester(Path(args.socket)).install_ak_chain(chain)
    _emit(args, {**answer}, f"registrar: installed {len(chain)} certificate(s)")
    return 0


def add_parser(sub: Any) -> None:
    from embassy.cli import positive_int

    registrar = sub.add_parser(
        "registrar", help="a privacy CA: certify that an embassy's AK is in its certified TPM"
    )
    commands = registrar.add_subparsers(dest="registrar_command", required=True)
    init = commands.add_parser("init", help="create the registrar's CA")
    init.add_argument("--dir", required=True, help="directory for the CA key and certificate")
    init.add_argument("--name", default="embassy registrar CA", help="the CA's common name")
    init.add_argument("--days", type=positive_int, default=3650, help="CA lifetime in days")
    init.set_defaults(func=_cmd_init)
    enroll = commands.add_parser("enroll", help="certify a running embassy's AK")
    enroll.add_argument("--socket", default="/run/embassy/embassy.sock")
    challenge = commands.add_parser(
        "challenge", help="relayed enrolment, 1/3: a challenge for an identity document"
    )
    challenge.add_argument("--identity", required=True, help="the embassy's identity document")
    challenge.add_argument("--out", required=True, help="the challenge file for the host")
    answer = commands.add_parser(
        "answer", help="relayed enrolment, 2/3 (on the host): the TPM answers a challenge"
    )
    answer.add_argument("--socket", default="/run/embassy/embassy.sock")
    answer.add_argument("--challenge", required=True, help="the registrar's challenge file")
    answer.add_argument("--out", required=True, help="the answer file for the registrar")
    issue = commands.add_parser(
        "issue", help="relayed enrolment, 3/3: check the answer, write the AK certificate"
    )
    issue.add_argument("--answer", required=True, help="the host's answer file")
    issue.add_argument("--out", required=True, help="the AK certificate (PEM) to install")
    for p in (enroll, challenge, issue):
        p.add_argument("--dir", required=True, help="the registrar's CA directory")
        p.add_argument("--ek-ca", action="append", help="hardware TPM makers' EK CAs (PEM)")
        p.add_argument("--swtpm-ca", action="append", help="software TPMs' EK CAs (PEM)")
        p.add_argument(
            "--allow-software-tpm",
            action="store_true",
            help="INSECURE: certify an AK in a software TPM (testing only)",
        )
    for p in (enroll, issue):
        p.add_argument("--days", type=positive_int, default=365, help="AK certificate lifetime")
    enroll.add_argument("--out", help="also write the AK certificate here (PEM)")
    enroll.add_argument("--no-install", action="store_true", help="do not install it in the daemon")
    enroll.set_defaults(func=_cmd_enroll)
    challenge.set_defaults(func=_cmd_challenge)
    answer.set_defaults(func=_cmd_answer)
    issue.set_defaults(func=_cmd_issue)
    install = commands.add_parser("install", help="install an AK certificate chain (PEM)")
    install.add_argument("--socket", default="/run/embassy/embassy.sock")
    install.add_argument("--chain", required=True, help="PEM: the AK certificate first")
    install.set_defaults(func=_cmd_install)
    for p in (init, enroll, install, challenge, answer, issue):
        add_json_arg(p)
