"""The ``embassy`` command. Thin: parse arguments, call the library, map errors to exits.

The commands live one family a module in :mod:`embassy.commands` (the registrar, broker and
weights commands beside their packages); this module assembles the parser and is the one
place an error becomes an exit code:

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

The message goes to stderr; a command run with ``--json`` also prints
``{"ok": false, "error": {"code", "message"}}`` on stdout, its one document
(:mod:`embassy.commands.output`). A usage error argparse finds is only on stderr: the command
line was not understood, ``--json`` included.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from embassy.commands import audit, host, identity, keys, meters, payload, result, verify
from embassy.commands.inputs import positive_int
from embassy.commands.keys import PASSPHRASE_ENV
from embassy.commands.output import dumps, error_document
from embassy.commands.policy import trust_policy as _policy  # the name tests and callers know
from embassy.commands.progress import add_progress_arg
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

__all__ = [
    "EXIT_CONNECT",
    "PASSPHRASE_ENV",
    "_policy",
    "build_parser",
    "exit_code_for",
    "main",
    "positive_int",
]

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="embassy", description=__doc__.splitlines()[0] if __doc__ else None
    )
    add_progress_arg(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    # The order is the order `embassy --help` lists them in.
    host.add_parsers(sub)
    identity.add_parser(sub)
    host.add_measure_parser(sub)
    verify.add_parser(sub)
    audit.add_parser(sub)
    payload.add_parser(sub)
    keys.add_parser(sub)
    result.add_parser(sub)
    meters.add_parser(sub)
    from embassy.registrar.cli import add_parser as add_registrar_parser

    add_registrar_parser(sub)
    from embassy.broker.cli import add_parser as add_broker_parser

    add_broker_parser(sub)
    from embassy.weights.cli import add_parser as add_weights_parser

    add_weights_parser(sub)
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
        if getattr(args, "json", False):  # every --json command: one document, even on error
            sys.stdout.write(dumps(error_document(exc)) + "\n")
        sys.stderr.write(f"embassy: {exc.code}: {exc.message}\n")
        return code
