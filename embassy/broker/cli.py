"""``embassy broker``: the model owner's key broker.

- ``init --dir D``: the broker's Ed25519 signing key and an empty keyring, both encrypted
  under ``EMBASSY_BROKER_PASSPHRASE``; prints the public key's keyid.
- ``add-key --dir D --model-id M --key-id K --key-file F``: add a weights key (32 raw bytes
  or 64 hex characters, as ``embassy weights keygen`` writes it).
- ``serve --config broker.yaml``: the HTTP service (:mod:`embassy.broker.service`).
- ``log --dir D [--config C] [--verify]``: print the decision log; ``--verify`` checks its
  chain and signatures against the broker's public key.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from embassy.commands.output import add_json_arg, print_json
from embassy.commands.progress import progress_for
from embassy.errors import ConfigError

_LOG = logging.getLogger(__name__)


def _cmd_init(args: argparse.Namespace) -> int:
    from embassy.broker.keyring import init_broker, passphrase_from_env
    from embassy.weights.release import broker_keyid

    public = init_broker(Path(args.dir), passphrase_from_env())
    result = {
        "broker_keyid": broker_keyid(public),
        "public_key": str(Path(args.dir) / "broker-signing.pub"),
    }
    print_json({"ok": True, **result}) if args.json else print(json.dumps(result))
    return 0


def _cmd_add_key(args: argparse.Namespace) -> int:
    from embassy.broker.keyring import add_key, passphrase_from_env, read_weights_key

    count = add_key(
        Path(args.dir),
        passphrase_from_env(),
        args.model_id,
        args.key_id,
        read_weights_key(Path(args.key_file)),
    )
    result = {"model_id": args.model_id, "key_id": args.key_id, "keys": count}
    print_json({"ok": True, **result}) if args.json else print(json.dumps(result))
    return 0


def _open_store(sqlite: Path | None, postgres: str | None) -> Any:
    if postgres is not None:
        from embassy.broker.store_pg import PostgresStore

        return PostgresStore(postgres)
    from embassy.broker.store import SqliteStore

    assert sqlite is not None
    return SqliteStore(sqlite)


def build_broker(config_path: Path) -> tuple[Any, Any]:
    """(Broker, BrokerConfig) from a config file: keys decrypted, policy compiled, store
    opened. Everything that can be wrong is found here, before anything listens."""
    from embassy.broker.config import load_broker_config, load_trust
    from embassy.broker.keyring import load_keyring, load_signing_key, passphrase_from_env
    from embassy.broker.policy import RegoPolicy
    from embassy.broker.release import Broker

    config = load_broker_config(config_path)
    passphrase = passphrase_from_env()
    signing = load_signing_key(config.dir, passphrase)
    keys = load_keyring(config.dir, passphrase)
    policy = RegoPolicy.from_files(
        str(config.policy),
        None if config.data is None else str(config.data),
        timeout_s=config.policy_timeout_s,
    )
    trust = load_trust(config.trust)
    store = _open_store(config.sqlite, config.postgres)
    broker = Broker(
        signing_key=signing,
        keys=keys,
        policy=policy,
        trust=trust,
        store=store,
        nonce_ttl_s=config.nonce_ttl_s,
    )
    return broker, config


def _cmd_serve(args: argparse.Namespace) -> int:
    from embassy.broker.service import BrokerService

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    broker, config = build_broker(Path(args.config))
    try:
        service = BrokerService(
            broker, tcp=config.tcp, unix=config.unix, max_body=config.max_body_bytes
        )
    except OSError as exc:
        broker.store.close()
        raise ConfigError(f"listen: cannot bind: {exc.strerror}") from None
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    service.start()
    _LOG.info(
        "broker serving on %s%s; policy %s, %d keys",
        ""
        if service.tcp_address is None
        else f"http://{service.tcp_address[0]}:{service.tcp_address[1]} ",
        "" if config.unix is None else f"unix:{config.unix}",
        broker.policy.sha256.hex(),
        len(broker.keys),
    )
    print(json.dumps({"ready": True, **service.describe(), "tcp": service.tcp_address}), flush=True)
    stop.wait()
    _LOG.info("broker stopping")
    service.stop()
    broker.policy.close()
    broker.store.close()
    return 0


def _cmd_log(args: argparse.Namespace) -> int:
    from embassy.broker.decision_log import parse_entry, verify_decision_log
    from embassy.broker.keyring import load_public_key

    directory = Path(args.dir)
    if args.config:
        from embassy.broker.config import load_broker_config

        config = load_broker_config(Path(args.config))
        sqlite, postgres = config.sqlite, config.postgres
    else:
        sqlite, postgres = directory / "decisions.db", None
        if not sqlite.exists():
            raise ConfigError(f"{sqlite}: no decision log (pass --config for another store)")
    progress = progress_for(args)
    store = _open_store(sqlite, postgres)
    try:
        with progress.step("broker log: reading the decision log"):
            entries = store.decisions(0)
    finally:
        store.close()
    if args.verify:
        with progress.step(f"broker log: verifying {len(entries)} entries"):
            verify_decision_log(entries, load_public_key(directory))
    decisions = []
    for item in entries:
        entry = parse_entry(item.entry)
        decisions.append({"seq": entry.seq, **entry.decision})
    if args.json:
        print_json({"ok": True, "verified": bool(args.verify), "decisions": decisions})
    else:
        for decision in decisions:
            sys.stdout.write(json.dumps(decision, sort_keys=True) + "\n")
    if args.verify:
        sys.stderr.write(f"decision log verified: {len(entries)} entries, chained and signed\n")
    return 0


def add_parser(sub: Any) -> None:
    broker = sub.add_parser("broker", help="the key broker: release weights keys by Rego policy")
    commands = broker.add_subparsers(dest="broker_command", required=True)
    init = commands.add_parser("init", help="create the broker's signing key and keyring")
    init.add_argument("--dir", required=True, help="the broker's directory")
    add_json_arg(init)
    init.set_defaults(func=_cmd_init)
    add = commands.add_parser("add-key", help="add a model's weights key to the keyring")
    add.add_argument("--dir", required=True, help="the broker's directory")
    add.add_argument("--model-id", required=True)
    add.add_argument("--key-id", required=True)
    add.add_argument("--key-file", required=True, help="32 raw bytes or 64 hex characters")
    add_json_arg(add)
    add.set_defaults(func=_cmd_add_key)
    serve = commands.add_parser("serve", help="serve release requests over HTTP")
    serve.add_argument("--config", required=True, help="broker.yaml")
    serve.set_defaults(func=_cmd_serve)
    log = commands.add_parser("log", help="print (and verify) the decision log")
    log.add_argument("--dir", required=True, help="the broker's directory (its public key)")
    log.add_argument("--config", help="broker.yaml, for a store other than <dir>/decisions.db")
    log.add_argument("--verify", action="store_true", help="check the chain and signatures")
    add_json_arg(log)
    log.set_defaults(func=_cmd_log)
