"""Private keys on the command line: the passphrase from the environment, loading an
authority's Ed25519 key, writing a new secret once, and the ``keygen`` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embassy.commands.inputs import read_input, write_out
from embassy.commands.output import add_json_arg, print_json
from embassy.errors import ConfigError, StorageError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

PASSPHRASE_ENV = "EMBASSY_KEY_PASSPHRASE"  # noqa: S105 (the variable's name, not a secret)


def passphrase() -> bytes | None:
    """The key passphrase from :data:`PASSPHRASE_ENV`; set but empty is a mistake, not none."""
    value = os.environ.get(PASSPHRASE_ENV)
    if value is None:
        return None
    if not value:
        raise ConfigError(f"{PASSPHRASE_ENV} is set but empty: unset it or give a passphrase")
    return value.encode("utf-8")


def load_signing_key(path: str) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PKCS#8 PEM file, decrypted with the env passphrase."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    data, secret = read_input(path), passphrase()
    encrypted = b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data
    if encrypted and secret is None:
        raise ConfigError(f"{path}: the key is encrypted: set {PASSPHRASE_ENV}")
    if not encrypted and secret is not None:
        sys.stderr.write(f"embassy: WARNING {path} is not encrypted; {PASSPHRASE_ENV} unused\n")
        secret = None
    try:
        key = load_pem_private_key(data, secret)
    except ValueError:
        if encrypted:
            raise ConfigError(f"{path}: wrong passphrase in {PASSPHRASE_ENV}") from None
        raise ConfigError(f"{path}: not a PEM (PKCS#8) private key") from None
    except TypeError as exc:  # cannot happen after the checks above; never a traceback
        raise ConfigError(f"{path}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: a {type(key).__name__} key, not an Ed25519 key")
    return key


def write_new_private(path: Path, data: bytes) -> None:
    """Write a secret once (:func:`embassy.daemon.atomic.create_private`)."""
    from embassy.daemon.atomic import create_private

    try:
        create_private(path, data)
    except FileExistsError:
        raise ConfigError(f"{path}: exists; refusing to overwrite a key") from None
    except StorageError as exc:  # a path given on the command line: the caller's to fix
        raise ConfigError(exc.message) from None


def _cmd_reply_keygen(args: argparse.Namespace) -> int:
    """A reply key pair: the private key encrypted (never in the clear), the public printed."""
    from embassy.jobs.result import ReplyPrivateKey
    from embassy.payload.envelope import SUITE_MLKEM768_X25519
    from embassy.wire.codec import canonical_json

    if args.name:
        raise ConfigError("keygen --reply: --name is for an authority's key")
    secret = passphrase()
    if secret is None:
        raise ConfigError(
            f"keygen --reply: a reply key is never written in the clear: set {PASSPHRASE_ENV}"
        )
    key = ReplyPrivateKey.generate(args.suite or SUITE_MLKEM768_X25519)
    write_new_private(Path(args.out), key.to_pem(secret))
    sys.stderr.write(
        f"keygen: wrote reply key {args.out} ({key.suite}, encrypted with {PASSPHRASE_ENV}); "
        "give the public key below to `embassy payload seal --reply-key`\n"
    )
    public = canonical_json(key.public.to_json())
    if args.public_out:
        write_out(public, args.public_out)
    if args.json:
        print_json(
            {
                "ok": True,
                "out": args.out,
                "encrypted": True,
                "suite": key.suite,
                "keyid": key.public.keyid(),
                "public": key.public.to_json(),
                "public_out": args.public_out,
            }
        )
    else:
        sys.stdout.write(public.decode() + "\n")
    return 0


def _cmd_keygen(args: argparse.Namespace) -> int:
    if args.reply:
        return _cmd_reply_keygen(args)
    if args.suite or args.public_out:
        raise ConfigError("keygen: --suite and --public-out are for a reply key (--reply)")
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import (
        BestAvailableEncryption,
        Encoding,
        KeySerializationEncryption,
        NoEncryption,
        PrivateFormat,
    )

    from embassy.wire.codec import b64encode
    from embassy.wire.dsse import keyid, raw_public_key

    secret = passphrase()
    encryption: KeySerializationEncryption = (
        NoEncryption() if secret is None else BestAvailableEncryption(secret)
    )
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, encryption)
    write_new_private(Path(args.out), pem)
    if secret is None:
        sys.stderr.write(
            f"keygen: WARNING {args.out} is NOT encrypted: anyone who reads it can sign as "
            f"this key. Set {PASSPHRASE_ENV} to encrypt it.\n"
        )
    else:
        sys.stderr.write(f"keygen: wrote {args.out} (encrypted with {PASSPHRASE_ENV})\n")
    public = key.public_key()
    entry = {
        "name": args.name,
        "ed25519": b64encode(raw_public_key(public)),
        "keyid": keyid(public),
    }
    if args.json:
        print_json({"ok": True, "out": args.out, "encrypted": secret is not None, **entry})
    else:
        sys.stdout.write(json.dumps(entry, sort_keys=True) + "\n")
    return 0


def add_parser(sub: Any) -> None:
    keygen = sub.add_parser(
        "keygen",
        help="make an Ed25519 key for an authority (encrypted with $EMBASSY_KEY_PASSPHRASE)",
    )
    keygen.add_argument(
        "--out", required=True, metavar="FILE", help="the new private key file (PKCS#8 PEM)"
    )
    keygen.add_argument(
        "--name", metavar="NAME", help="the authority's name, for the printed config entry"
    )
    keygen.add_argument(
        "--reply",
        action="store_true",
        help="make a user's reply key instead (HPKE, for job results): needs "
        "$EMBASSY_KEY_PASSPHRASE; prints the public key JSON",
    )
    keygen.add_argument(
        "--suite", choices=["mlkem768-x25519", "x25519"],
        help="with --reply: the HPKE suite (default: the post-quantum hybrid)",
    )  # fmt: skip
    keygen.add_argument(
        "--public-out", metavar="FILE", help="with --reply: write the public key JSON here too"
    )
    add_json_arg(keygen)
    keygen.set_defaults(func=_cmd_keygen)
