"""What a command prints: prose for a person by default, or with ``--json`` exactly one JSON
document on stdout and nothing else there.

The document is ``json.dumps(..., sort_keys=True)`` on one line, bytes as hex (digests, ids)
or as the wire format's base64 (inside documents the protocol defines), integers for counts,
sizes and times (no floats). A result that is itself a JSON document the project defines (an
identity document, an envelope, a measurement) is nested as an object, never as a string.

On an error the one place that maps errors to exit codes (:func:`embassy.cli.main`) prints
:func:`error_document` on stdout for a ``--json`` command, the prose message on stderr as
always, and exits with the same code. Data a command would stream to stdout (``--out -``) is
refused with ``--json`` when it is not JSON, because stdout holds the one document.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from embassy.errors import ConfigError, EmbassyError

JSON_HELP = (
    "print one JSON document on stdout (the result; on an error "
    '{"ok": false, "error": {"code", "message"}} with the same exit code)'
)


def add_json_arg(parser: Any) -> None:
    """The ``--json`` flag, the same words on every command."""
    parser.add_argument("--json", action="store_true", help=JSON_HELP)


def dumps(document: Any) -> str:
    """One line of canonical-ish JSON: keys sorted, no floats expected."""
    return json.dumps(document, sort_keys=True)


def print_json(document: Any) -> None:
    sys.stdout.write(dumps(document) + "\n")


def emit(args: argparse.Namespace, result: dict[str, Any], text: str) -> None:
    """``result`` (with ``"ok": true``) as the ``--json`` document, else the prose ``text``."""
    if getattr(args, "json", False):
        print_json({"ok": True, **result})
    else:
        sys.stdout.write(text + "\n")


def error_document(error: EmbassyError) -> dict[str, Any]:
    """What ``--json`` prints on stdout for an error (its prose stays on stderr)."""
    return {"ok": False, "error": {"code": error.code, "message": error.message}}


def refuse_stdout(args: argparse.Namespace, target: str | None, flag: str) -> None:
    """With ``--json`` stdout holds the JSON document: ``flag`` must name a file."""
    if getattr(args, "json", False) and (target is None or target == "-"):
        raise ConfigError(f"--json prints its document on stdout: give {flag} a file, not stdout")
