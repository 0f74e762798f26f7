"""``embassy registrar``: create the registrar's CA, enrol an embassy, install a chain.

- ``init --dir D``: a new CA key (encrypted with ``EMBASSY_REGISTRAR_PASSPHRASE``) and its
  self-signed certificate ``D/registrar-ca.pem``, the file auditors pin with ``--ak-ca``.
- ``enroll --dir D --socket S --ek-ca/--swtpm-ca F``: check the embassy's EK certificate, run
  credential activation through its socket, issue the AK certificate and install it in the
  daemon (``POST /v1/attestation/ak-certificate``), which serves it in its identity document.
- ``install --socket S --chain F``: install an AK certificate chain obtained elsewhere (a
  cloud vTPM's own AK certificate), checked by the daemon against its AK.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

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


def _emit(args: argparse.Namespace, result: dict[str, Any], text: str) -> None:
    sys.stdout.write(json.dumps(result, sort_keys=True) + "\n" if args.json else text + "\n")


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
        {"ok": True, "certificate": str(path), "sha256": sha},
        f"registrar: CA {args.name!r} created; auditors pin {path} (sha256 {sha})",
    )
    return 0


def _cmd_enroll(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives.serialization import Encoding

    from embassy.daemon.atomic import write_atomic
    from embassy.registrar.ca import load_ca
    from embassy.registrar.enroll import EkTrust, chain_for, enroll

    issuer = load_ca(Path(args.dir), _passphrase())
    trust = EkTrust(_bundle(args.ek_ca), _bundle(args.swtpm_ca), args.allow_software_tpm)
    if not trust.hardware and not trust.software:
        raise ConfigError("name the EK CAs you trust: --ek-ca (hardware) or --swtpm-ca")
    attester = SocketAttester(Path(args.socket))
    enrollment = enroll(
        attester, issuer, trust, now=datetime.now(UTC), lifetime=timedelta(days=args.days)
    )
    chain = chain_for(enrollment)
    if args.out:
        write_atomic(Path(args.out), enrollment.certificate.public_bytes(Encoding.PEM), 0o644)
    if not args.no_install:
        attester.install_ak_chain(chain)
    kind = enrollment.ek.kind.value
    _emit(
        args,
        {
            "ok": True,
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


def _cmd_install(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives.serialization import Encoding

    chain = [c.public_bytes(Encoding.DER) for c in _bundle([args.chain])]
    answer = SocketAttester(Path(args.socket)).install_ak_chain(chain)
    _emit(args, {"ok": True, **answer}, f"registrar: installed {len(chain)} certificate(s)")
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
    enroll.add_argument("--dir", required=True, help="the registrar's CA directory")
    enroll.add_argument("--socket", default="/run/embassy/embassy.sock")
    enroll.add_argument("--ek-ca", action="append", help="hardware TPM makers' EK CAs (PEM)")
    enroll.add_argument("--swtpm-ca", action="append", help="software TPMs' EK CAs (PEM)")
    enroll.add_argument(
        "--allow-software-tpm",
        action="store_true",
        help="INSECURE: certify an AK in a software TPM (testing only)",
    )
    enroll.add_argument("--days", type=positive_int, default=365, help="AK certificate lifetime")
    enroll.add_argument("--out", help="also write the AK certificate here (PEM)")
    enroll.add_argument("--no-install", action="store_true", help="do not install it in the daemon")
    enroll.set_defaults(func=_cmd_enroll)
    install = commands.add_parser("install", help="install an AK certificate chain (PEM)")
    install.add_argument("--socket", default="/run/embassy/embassy.sock")
    install.add_argument("--chain", required=True, help="PEM: the AK certificate first")
    install.set_defaults(func=_cmd_install)
    for p in (init, enroll, install):
        p.add_argument("--json", action="store_true", help="machine-readable result")
