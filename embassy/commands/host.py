"""The host operator's commands: ``serve`` (run the daemon), ``spool`` (mount the activation
spool for a sandboxed daemon) and ``measure`` (the reproducible measurement, or with ``--uki``
the whole expected.json an auditor pins)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from embassy.commands.output import add_json_arg, emit
from embassy.commands.progress import human_bytes, progress_for, read_file


def _cmd_serve(args: argparse.Namespace) -> int:
    from embassy import logs
    from embassy.config import load_config
    from embassy.daemon.runtime import serve

    config = load_config(Path(args.config) if args.config else None, os.environ)
    logs.configure(config.log_level)
    serve(config)
    return 0


def _cmd_spool(args: argparse.Namespace) -> int:
    from embassy.config import load_config
    from embassy.daemon.spool import ensure_spool

    config = load_config(Path(args.config) if args.config else None, os.environ)
    state = ensure_spool(config.data_dir / "activations", config.metering)
    emit(args, {"spool": str(config.data_dir / "activations"), "state": state}, state)
    return 0


def _cmd_measure(args: argparse.Namespace) -> int:
    from embassy.config import load_config
    from embassy.measure import measure

    m = measure(load_config(Path(args.config) if args.config else None, read_metadata=False))
    if args.uki:
        # The whole expectation an auditor pins: the image's boot PCRs and the embassy's
        # measurement, from the UKI and config the image build produced (docs/image.md).
        from embassy.image.expected import expected_image
        from embassy.image.uki import DEFAULT_PHASES

        phases = DEFAULT_PHASES if args.phases is None else [p for p in args.phases.split(",") if p]
        progress = progress_for(args)
        uki = read_file(progress, args.uki, f"measure: reading {args.uki}")
        with progress.step(f"measure: hashing the UKI ({human_bytes(len(uki))}) for PCRs 4/11/12"):
            expected = expected_image(uki, m, phases, secure_boot=args.secure_boot)
        sys.stdout.write(expected.encode().decode() + "\n")
        return 0
    sys.stdout.write(m.encode().decode() + "\n" if args.json else m.digest.hex() + "\n")
    return 0


def add_parsers(sub: Any) -> None:
    serve = sub.add_parser("serve", help="run the daemon")
    serve.add_argument("--config", help="YAML config file (default: built-in defaults)")
    serve.set_defaults(func=_cmd_serve)
    spool = sub.add_parser(
        "spool",
        help="mount the activation spool (or check the one mounted): for a host where the "
        "daemon runs sandboxed in a mount namespace of its own and cannot mount it itself",
    )
    spool.add_argument("--config", help="YAML config file (default: built-in defaults)")
    add_json_arg(spool)
    spool.set_defaults(func=_cmd_spool)


def add_measure_parser(sub: Any) -> None:
    measure = sub.add_parser("measure", help="print the reproducible measurement")
    measure.add_argument("--config", help="the config file the daemon runs with")
    measure.add_argument(
        "--json",
        action="store_true",
        help="print all components: the measurement document (with --uki, expected.json is "
        'JSON already); on an error {"ok": false, "error": {...}}',
    )
    measure.add_argument(
        "--uki",
        metavar="FILE",
        help="the image's unified kernel image: print expected.json (boot PCRs + measurement)",
    )
    measure.add_argument(
        "--phases",
        metavar="P1,P2",
        help="systemd-pcrphase words in PCR 11 when quoted (default: up to 'ready')",
    )
    measure.add_argument(
        "--secure-boot",
        action="store_true",
        help="predict for a boot with UEFI Secure Boot on (changes PCR 4 for some stubs)",
    )
    measure.set_defaults(func=_cmd_measure)
