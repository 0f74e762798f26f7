"""``embassy result open`` (user side): decrypt a job's result bundle with your reply key.
Decryption proves only that the result was wrapped to that key; ``embassy verify job`` shows
who made it."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from embassy.commands.inputs import read_input
from embassy.commands.keys import passphrase
from embassy.commands.output import add_json_arg, print_json, refuse_stdout
from embassy.commands.progress import counting, progress_for
from embassy.errors import ConfigError


def _cmd_result_open(args: argparse.Namespace) -> int:
    """Decrypt a job's result with the user's reply key. Plaintext reaches ``--out`` only
    once all of it authenticated (a temporary file renamed into place, removed on error)."""
    import tempfile

    from embassy.jobs.result import JobResultBundle, ReplyPrivateKey, open_result, open_result_to

    key = ReplyPrivateKey.from_pem(read_input(args.key), passphrase(), f"--key {args.key}")
    bundle = JobResultBundle.parse(read_input(args.bundle).strip())
    # Opened under the binding the bundle names: decryption proves no more than that the
    # result was wrapped to this reply key. `embassy verify job` checks the embassy signed it.
    binding = bundle.wrapped_key.binding
    refuse_stdout(args, args.out, "--out")
    progress = progress_for(args)
    if args.out == "-":
        ciphertext = None if args.ciphertext is None else read_input(args.ciphertext)
        sys.stdout.buffer.write(open_result(bundle, key, binding, ciphertext=ciphertext))
        size = None
    else:
        out = Path(args.out)
        fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as dst:
                if args.ciphertext is None:
                    with progress.step(f"result open: decrypting job {bundle.job}'s result"):
                        size = open_result_to(bundle, key, binding, dst)
                else:
                    with open(args.ciphertext, "rb") as src:
                        # Read twice: once for its SHA-256, once to decrypt.
                        total = 2 * os.fstat(src.fileno()).st_size
                        label = f"result open: checking and decrypting {args.ciphertext}"
                        with progress.step(label, total or None) as step:
                            size = open_result_to(
                                bundle, key, binding, dst, ciphertext=counting(src, step)
                            )
                dst.flush()
                os.fsync(dst.fileno())
            tmp.replace(out)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise ConfigError(f"result open: {exc.filename or args.out}: {exc.strerror}") from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    if args.json:
        print_json(
            {
                "ok": True,
                "job": bundle.job,
                "bytes": size,
                "out": args.out,
                "binding": dict(binding),
            }
        )
    sys.stderr.write(
        f"result of job {bundle.job} decrypted"
        + ("" if size is None else f" ({size} bytes to {args.out})")
        + f"; bound to {json.dumps(binding, sort_keys=True)}. Decryption does not show who "
        "made it: check the job with `embassy verify job`\n"
    )
    return 0


def add_parser(sub: Any) -> None:
    result = sub.add_parser("result", help="open a job's encrypted result (user side)")
    kinds = result.add_subparsers(dest="what", required=True)
    open_ = kinds.add_parser("open", help="decrypt a job result bundle with your reply key")
    open_.add_argument(
        "--key",
        required=True,
        metavar="FILE",
        help="your reply private key (keygen --reply; $EMBASSY_KEY_PASSPHRASE)",
    )
    open_.add_argument("--bundle", required=True, metavar="FILE", help="the job result bundle")
    open_.add_argument(
        "--ciphertext",
        metavar="FILE",
        help="the result's ciphertext, when the bundle does not carry it",
    )
    open_.add_argument(
        "--out", required=True, metavar="FILE", help="where the plaintext goes ('-': stdout)"
    )
    add_json_arg(open_)
    open_.set_defaults(func=_cmd_result_open)
