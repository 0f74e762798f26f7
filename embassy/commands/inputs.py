"""What a command reads and writes: files or stdin/stdout, hex arguments, argparse types.

Every failure here is the caller's to fix (a path or a value on the command line), so it is a
:class:`~embassy.errors.ConfigError` (exit 2), never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from embassy.errors import ConfigError


def read_input(path: str) -> bytes:
    """A file's bytes, or stdin's for ``-``."""
    try:
        return sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None


def hex_arg(text: str, what: str, size: int | None = None) -> bytes:
    """A hex argument, of ``size`` bytes when given."""
    try:
        value = bytes.fromhex(text)
    except ValueError:
        raise ConfigError(f"{what}: not hex: {text!r}") from None
    if size is not None and len(value) != size:
        raise ConfigError(f"{what}: expected {size} bytes, got {len(value)}")
    return value


def write_out(data: bytes, out: str | None, *, newline: bool = True) -> None:
    """To stdout (``None`` or ``-``), or atomically to a file."""
    if out is None or out == "-":
        sys.stdout.buffer.write(data + b"\n" if newline else data)
    else:
        from embassy.daemon.atomic import write_atomic

        write_atomic(Path(out), data, mode=0o644)


def positive_int(text: str) -> int:
    """argparse type: a count of seconds, so a bad value is a usage error (exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value
