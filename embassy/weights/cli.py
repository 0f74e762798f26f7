"""``embassy weights``: the model owner's commands for encrypted model files.

- ``keygen --out K``: a new random 32-byte weights key, written as hex to ``K`` (mode 0600,
  never over an existing file). It is the owner's secret: it goes to the key broker, and
  reaches a workload only through an attested release.
- ``encrypt --in model.safetensors --out model.emw --model-id ID --key-id ID --key-file K
  [--hide-names] [--chunk-size N]``: streaming, O(chunk) memory.
- ``inspect FILE``: the public header as JSON (no key needed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

from embassy.commands.output import add_json_arg, print_json
from embassy.commands.output import emit as _emit
from embassy.commands.progress import counting, progress_for
from embassy.errors import ConfigError
from workload_sdk.weights import DEFAULT_CHUNK_SIZE, KEY_LEN, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE


def read_key_file(path: str) -> bytearray:
    """A 32-byte key from ``path``: raw, or 64 hex digits (a final newline allowed). The file
    must be a regular file readable by its owner only (mode 0600 or stricter)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        raise ConfigError(f"--key-file {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"--key-file {path}: not a regular file")
        if info.st_mode & 0o077:
            raise ConfigError(
                f"--key-file {path}: mode {stat.S_IMODE(info.st_mode):04o}, must be 0600 "
                "(no access for group or others)"
            )
        data = bytearray(os.read(fd, 2 * KEY_LEN + 3))
    finally:
        os.close(fd)
    try:
        if len(data) == KEY_LEN:
            return data
        text = bytes(data).strip()
        if len(text) == 2 * KEY_LEN:
            with contextlib.suppress(ValueError):
                return bytearray(bytes.fromhex(text.decode("ascii")))
        raise ConfigError(f"--key-file {path}: not {KEY_LEN} raw bytes or {2 * KEY_LEN} hex digits")
    finally:
        data[:] = bytes(len(data))


def _cmd_keygen(args: argparse.Namespace) -> int:
    from embassy.daemon.atomic import create_private

    key = bytearray(os.urandom(KEY_LEN))
    try:
        create_private(Path(args.out), key.hex().encode() + b"\n")
    except FileExistsError:
        raise ConfigError(f"--out {args.out}: exists; a key is never overwritten") from None
    finally:
        key[:] = bytes(KEY_LEN)
    _emit(args, {"key_file": args.out}, f"weights: new key in {args.out} (0600)")
    return 0


def _cmd_encrypt(args: argparse.Namespace) -> int:
    from embassy.weights.encrypt import encrypt_file

    key = read_key_file(args.key_file)
    try:
        size = Path(args.input).stat().st_size
    except OSError:
        size = 0  # encrypt_file says what is wrong with it
    try:
        with progress_for(args).step(f"weights: encrypting {args.input}", size or None) as step:
            header = encrypt_file(
                Path(args.input),
                Path(args.out),
                key,
                model_id=args.model_id,
                key_id=args.key_id,
                chunk_size=args.chunk_size,
                hide_names=args.hide_names,
                wrap_source=lambda src: counting(src, step),
            )
    finally:
        key[:] = bytes(len(key))
    result = {
        "out": args.out,
        "model_id": header.model_id,
        "key_id": header.key_id,
        "names_hidden": header.table is None,
        "header_sha256": header.digest.hex(),
        "file_size": Path(args.out).stat().st_size,
    }
    _emit(
        args,
        result,
        f"weights: {args.out} ({result['file_size']} bytes) for model {header.model_id!r}, "
        f"key {header.key_id!r}; header sha256 {result['header_sha256']}",
    )
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from embassy.weights.format import inspect

    header = inspect(Path(args.file))
    if args.json:  # one line, and the same "ok" as every --json document
        print_json({"ok": True, "header": header})
    else:
        sys.stdout.write(json.dumps(header, indent=2, sort_keys=True) + "\n")
    return 0


def _chunk_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not MIN_CHUNK_SIZE <= value <= MAX_CHUNK_SIZE or value & (value - 1):
        raise argparse.ArgumentTypeError(
            f"a power of two in [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}], got {value}"
        )
    return value


def add_parser(sub: Any) -> None:
    weights = sub.add_parser("weights", help="encrypted model files (the model owner's side)")
    commands = weights.add_subparsers(dest="weights_command", required=True)
    keygen = commands.add_parser("keygen", help="a new random weights key (hex, mode 0600)")
    keygen.add_argument("--out", required=True, help="the key file to create (never overwritten)")
    add_json_arg(keygen)
    keygen.set_defaults(func=_cmd_keygen)
    encrypt = commands.add_parser("encrypt", help="encrypt a safetensors file")
    encrypt.add_argument("--in", dest="input", required=True, help="the safetensors file")
    encrypt.add_argument("--out", required=True, help="the encrypted model file to write")
    encrypt.add_argument("--model-id", required=True, help="the model's id, bound into the file")
    encrypt.add_argument("--key-id", required=True, help="the key's id, bound into the file")
    encrypt.add_argument("--key-file", required=True, help="32 bytes, raw or hex, mode 0600")
    encrypt.add_argument(
        "--hide-names",
        action="store_true",
        help="encrypt the tensor table too (names, dtypes, shapes, metadata)",
    )
    encrypt.add_argument(
        "--chunk-size",
        type=_chunk_size,
        default=DEFAULT_CHUNK_SIZE,
        help=f"plaintext bytes per chunk, a power of two (default {DEFAULT_CHUNK_SIZE})",
    )
    add_json_arg(encrypt)
    encrypt.set_defaults(func=_cmd_encrypt)
    inspect = commands.add_parser("inspect", help="print a file's public header (JSON)")
    inspect.add_argument("file", help="the encrypted model file")
    add_json_arg(inspect)
    inspect.set_defaults(func=_cmd_inspect)
