"""The broker's configuration (``embassy broker serve --config broker.yaml``), parsed once
into a frozen :class:`BrokerConfig`. Unknown keys and bad values are refused with the key's
dotted path; relative paths are relative to the config file's directory::

    dir: /var/lib/embassy-broker         # broker init's directory (keys, keyring)
    listen:
      tcp: 127.0.0.1:8470                # host:port; default 127.0.0.1:8470 if no unix
      unix: /run/embassy-broker.sock     # optional
    policy: policy.rego
    data: data.json                      # optional (an empty data document)
    policy_timeout_s: 2
    nonce_ttl_s: 60
    max_body_bytes: 1048576
    trust:
      ek_cas: [tpm-vendor-ca.pem]        # hardware TPM makers' EK CAs
      swtpm_cas: []                      # software TPMs' EK CAs (need allow_software_tpm)
      ak_cas: [registrar-ca.pem]         # registrars' CAs
      vtpm_ak_cas: []
      allow_software_tpm: false          # INSECURE: testing only
      expected_pcrs: {4: "<hex>", 11: "<hex>", 12: "<hex>"}
    store:
      sqlite: broker.db                  # default: <dir>/decisions.db
      # postgres: "postgresql://broker@db/broker"   (several replicas, one log)

Reading the certificate files is :func:`load_trust`'s, not the parser's.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from embassy.errors import ConfigError
from embassy.verify.policy import TrustPolicy

DEFAULT_PORT = 8470
MAX_CONFIG_BYTES = 1 << 16
_HEX32 = re.compile(r"[0-9a-fA-F]{64}")
_TOP = {
    "dir",
    "listen",
    "policy",
    "data",
    "policy_timeout_s",
    "nonce_ttl_s",
    "max_body_bytes",
    "trust",
    "store",
}
_TRUST_LISTS = ("ek_cas", "swtpm_cas", "ak_cas", "vtpm_ak_cas")


@dataclass(frozen=True)
class TrustConfig:
    ek_cas: tuple[Path, ...] = ()
    swtpm_cas: tuple[Path, ...] = ()
    ak_cas: tuple[Path, ...] = ()
    vtpm_ak_cas: tuple[Path, ...] = ()
    allow_software_tpm: bool = False
    expected_pcrs: Mapping[int, bytes] | None = None


@dataclass(frozen=True)
class BrokerConfig:
    dir: Path
    policy: Path
    data: Path | None
    tcp: tuple[str, int] | None
    unix: Path | None
    trust: TrustConfig
    sqlite: Path | None
    postgres: str | None
    policy_timeout_s: float = 2.0
    nonce_ttl_s: int = 60
    max_body_bytes: int = 1 << 20


def _keys(obj: object, allowed: set[str], where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: expected a mapping")
    for key in obj:
        if key not in allowed:
            raise ConfigError(f"{where}.{key}: unknown key" if where else f"{key}: unknown key")
    return obj


def _path(value: object, where: str, base: Path) -> Path:
    if not isinstance(value, str) or not value or "\0" in value or len(value) > 4096:
        raise ConfigError(f"{where}: expected a path")
    path = Path(value)
    return path if path.is_absolute() else base / path


def _int(value: object, where: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{where}: expected an integer from {low} to {high}")
    return value


def _tcp(value: object) -> tuple[str, int]:
    where = "listen.tcp"
    if not isinstance(value, str) or ":" not in value:
        raise ConfigError(f"{where}: expected host:port")
    host, _, port_text = value.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ConfigError(f"{where}: {host!r} is not an IP address") from None
    if not port_text.isdigit():
        raise ConfigError(f"{where}: port {port_text!r} is not a number")
    return host, _int(int(port_text), f"{where} port", 0, 65535)


def _trust(obj: object, base: Path) -> TrustConfig:
    tree = _keys(
        obj if obj is not None else {},
        {*_TRUST_LISTS, "allow_software_tpm", "expected_pcrs"},
        "trust",
    )
    lists: dict[str, tuple[Path, ...]] = {}
    for name in _TRUST_LISTS:
        items = tree.get(name, [])
        if not isinstance(items, list):
            raise ConfigError(f"trust.{name}: expected a list of paths")
        lists[name] = tuple(_path(v, f"trust.{name}[{i}]", base) for i, v in enumerate(items))
    allow = tree.get("allow_software_tpm", False)
    if not isinstance(allow, bool):
        raise ConfigError("trust.allow_software_tpm: expected true or false")
    pcrs: dict[int, bytes] | None = None
    if "expected_pcrs" in tree:
        raw = tree["expected_pcrs"]
        if not isinstance(raw, dict):
            raise ConfigError("trust.expected_pcrs: expected a mapping of PCR index to hex")
        pcrs = {}
        for index, value in raw.items():
            pcr = _int(
                int(index) if isinstance(index, str) and index.isdigit() else index,
                f"trust.expected_pcrs.{index}",
                0,
                23,
            )
            if not isinstance(value, str) or not _HEX32.fullmatch(value):
                raise ConfigError(f"trust.expected_pcrs.{index}: expected 64 hex characters")
            pcrs[pcr] = bytes.fromhex(value)
    return TrustConfig(allow_software_tpm=allow, expected_pcrs=pcrs, **lists)


def parse_broker_config(tree: object, base: Path) -> BrokerConfig:
    """The config from its YAML tree; ``base`` resolves relative paths."""
    top = _keys(tree, _TOP, "")
    for required in ("dir", "policy"):
        if required not in top:
            raise ConfigError(f"{required}: missing")
    listen = _keys(top.get("listen", {}) or {}, {"tcp", "unix"}, "listen")
    tcp = _tcp(listen["tcp"]) if "tcp" in listen else None
    unix = _path(listen["unix"], "listen.unix", base) if "unix" in listen else None
    if unix is not None and len(str(unix)) > 107:
        raise ConfigError("listen.unix: longer than a socket path can be (107 bytes)")
    if tcp is None and unix is None:
        tcp = ("127.0.0.1", DEFAULT_PORT)
    store = _keys(top.get("store", {}) or {}, {"sqlite", "postgres"}, "store")
    if "sqlite" in store and "postgres" in store:
        raise ConfigError("store: name sqlite or postgres, not both")
    directory = _path(top["dir"], "dir", base)
    postgres = store.get("postgres")
    if postgres is not None and (not isinstance(postgres, str) or not postgres):
        raise ConfigError("store.postgres: expected a DSN string")
    sqlite = (
        None
        if postgres is not None
        else _path(store["sqlite"], "store.sqlite", base)
        if "sqlite" in store
        else directory / "decisions.db"
    )
    timeout = top.get("policy_timeout_s", 2)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 60:
        raise ConfigError("policy_timeout_s: expected a number of seconds, above 0 and at most 60")
    return BrokerConfig(
        dir=directory,
        policy=_path(top["policy"], "policy", base),
        data=_path(top["data"], "data", base) if "data" in top else None,
        tcp=tcp,
        unix=unix,
        trust=_trust(top.get("trust"), base),
        sqlite=sqlite,
        postgres=postgres,
        policy_timeout_s=float(timeout),
        nonce_ttl_s=_int(top.get("nonce_ttl_s", 60), "nonce_ttl_s", 5, 3600),
        max_body_bytes=_int(top.get("max_body_bytes", 1 << 20), "max_body_bytes", 1024, 1 << 24),
    )


def load_broker_config(path: Path) -> BrokerConfig:
    try:
        with path.open("rb") as f:
            text = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: over {MAX_CONFIG_BYTES} bytes")
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not YAML: {exc}") from None
    return parse_broker_config(tree, path.resolve().parent)


def load_trust(trust: TrustConfig) -> TrustPolicy:
    """The verifier's trust policy: the configured certificate files, read and parsed."""
    from embassy.attest.ek import load_pem_bundle

    def bundle(paths: tuple[Path, ...]) -> tuple[Any, ...]:
        out: list[Any] = []
        for path in paths:
            try:
                out += load_pem_bundle(path.read_bytes())
            except OSError as exc:
                raise ConfigError(f"{path}: {exc.strerror}") from None
        return tuple(out)

    return TrustPolicy(
        ek_cas=bundle(trust.ek_cas),
        software_ek_cas=bundle(trust.swtpm_cas),
        ak_cas=bundle(trust.ak_cas),
        vtpm_ak_cas=bundle(trust.vtpm_ak_cas),
        allow_software_tpm=trust.allow_software_tpm,
        expected_pcrs=dict(trust.expected_pcrs or {}),
    )
