"""The daemon's configuration: one declarative schema, parsed once into frozen objects.

``SCHEMA`` is the single source of truth for every key: its type, default and meaning. The
parser, ``docs/config.md`` and (later) the NixOS module's options are all derived from it, so
they cannot drift. Unknown keys and bad values are refused with the key's dotted path.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from embassy.errors import ConfigError, WireFormatError
from embassy.metering.instruction import CAPABILITY_PATTERN
from embassy.validate import as_bool, as_int, as_str, as_str_list, fail, show_key, show_value
from embassy.wire.codec import JsonObject, b64decode, b64encode, parse_json_object
from embassy.workload.spec import ENV_PREFIX, WORKLOAD_SCHEMA, WorkloadSpec, parse_workload

# PCRs the embassy may own: not reset by software (16, 23), not locality-restricted
# (17-22), not precomputed or used by the boot path (0-12: firmware, boot loader, UKI).
EMBASSY_PCR_CHOICES = frozenset({13, 14, 15})
BOOT_PCR_CHOICES = frozenset(range(13))
# Hostile files and variables are refused with the key's name, never a traceback: every
# value is bounded (embassy.validate: the same rules as on the workload keys).
MAX_CONFIG_BYTES = 1 << 20
MAX_SOCKET_PATH = 107  # sun_path is 108 bytes with its NUL
MAX_AUTHORITIES = 64
MAX_CAPABILITIES = 256
MAX_GID = 2**32 - 2
_GROUP = re.compile(r"[0-9]{1,10}|[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?")
_FAILPOINT = re.compile(r"[a-z0-9][a-z0-9:_-]{0,63}")
_AUTHORITY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True, slots=True)
class Key:
    path: str
    kind: str  # "str", "path", "int", "bool", "pcr", "pcr-list", "authorities", "level"
    default: Any
    doc: str


SCHEMA: tuple[Key, ...] = (
    Key(
        "socket",
        "path",
        "/run/embassy/embassy.sock",
        "Unix socket of the HTTP/JSON API; created owner-only (0600), or 0660 with socket_group.",
    ),
    Key(
        "socket_group",
        "str",
        None,
        "Group (name or numeric gid) that owns the socket, which is then 0660: lets a "
        "non-root workload connect. Session routes still accept only the workload's own "
        "processes (peer credentials). Null: owner-only.",
    ),
    Key(
        "data_dir",
        "path",
        "/var/lib/embassy",
        "Durable state: statement log, checkpoints, TPM-sealed key blob, swtpm state.",
    ),
    Key("log_level", "level", "info", "One of debug, info, warning, error."),
    Key(
        "tpm.device",
        "str",
        None,
        "TPM character device (e.g. /dev/tpmrm0). Null: the daemon starts its own swtpm, "
        "a software TPM with no hardware root of trust (debug mode, said in every statement).",
    ),
    Key("pcrs.embassy", "pcr", 13, "PCR that records each daemon start and its measurement."),
    Key("pcrs.log", "pcr", 14, "PCR that the statement log is extended into."),
    Key(
        "pcrs.boot",
        "pcr-list",
        [4, 11, 12],
        "Boot-state PCRs included in every quote (UKI, its command line, boot path).",
    ),
    Key(
        "statement_log.checkpoint_every",
        "int",
        64,
        "Take a TPM-quoted checkpoint after this many entries (>= 1).",
    ),
    Key("http.max_body_bytes", "int", 1 << 20, "Largest request body accepted (bytes)."),
    Key("http.timeout_seconds", "int", 30, "Per-connection read timeout (seconds)."),
    Key("http.backlog", "int", 128, "Listen backlog of the socket (connections not yet accepted)."),
    Key("http.workers", "int", 16, "Connections served at once; the others wait their turn."),
    Key(
        "http.max_connections",
        "int",
        256,
        "Connections held open at most (served or waiting); beyond it, 503 and close.",
    ),
    Key(
        "debug.failpoint",
        "str",
        None,
        "TESTS ONLY: the daemon kills itself (SIGKILL) at this named point of seal or unseal "
        "(seal:before-statement, seal:after-statement, unseal:after-statement). Measured, so "
        "such a daemon cannot pass for a production one.",
    ),
    Key(
        "workload",
        "workload",
        None,
        "The workload the embassy launches and seals (see the workload.* keys below). "
        "Recorded as launch events in the log, not in the measurement.",
    ),
    Key(
        "workload_metadata",
        "path",
        None,
        "JSON file with the workload section chosen at boot (runtime metadata: a file on a "
        "config partition, or fetched from a cloud metadata server). Its keys override "
        "workload:, and EMBASSY_WORKLOAD_* variables override it. Null: no such file.",
    ),
    Key(
        "jobs.image",
        "str",
        None,
        "Job mode (docs/adr/0014-jobs.md): the image each job runs in, one fresh container "
        "per request with no network at any moment. Null: job mode is off. Used by ID once "
        "inspected; never pulled.",
    ),
    Key(
        "jobs.command",
        "str-list",
        None,
        "The job container's command (a list of arguments). Null: the image's own.",
    ),
    Key(
        "jobs.runtime",
        "str",
        None,
        "Docker runtime of job containers: null (runc) or a registered gVisor runtime with "
        "--network=none in its runtimeArgs (scripts/ensure_dockerd.sh registers runsc-nonet).",
    ),
    Key(
        "jobs.user",
        "str",
        "65534",
        "User (uid or uid:gid, numeric) job processes run as; never root. The socket's group "
        "(socket_group, required with jobs) is added so the job reaches the embassy.",
    ),
    Key("jobs.pool_size", "int", 2, "Warm job containers created and started ahead (0-64)."),
    Key(
        "jobs.deadline_seconds",
        "int",
        300,
        "A job not committed this long after it was assigned is killed, destroyed and aborted "
        "(1 to 86400).",
    ),
    Key("jobs.memory", "int", 512 << 20, "Memory limit of a job container (bytes, >= 6 MiB)."),
    Key("jobs.cpus", "int", 1000, "CPU limit of a job container in thousandths of a CPU (>= 10)."),
    Key("jobs.pids", "int", 128, "Process limit of a job container (8 to 4194304)."),
    Key(
        "jobs.scratch_bytes",
        "int",
        64 << 20,
        "Size of the tmpfs at /tmp in a job container, its only writable scratch.",
    ),
    Key(
        "jobs.max_input_bytes",
        "int",
        64 << 20,
        "Largest encrypted input a job takes (bytes); inline base64 inputs are also bounded "
        "by http.max_body_bytes.",
    ),
    Key(
        "jobs.max_output_bytes",
        "int",
        64 << 20,
        "Largest encrypted result a job may commit (bytes); more ends the job output-too-large.",
    ),
    Key("jobs.max_concurrent", "int", 4, "Jobs running at once; more are refused (busy, 503)."),
    Key(
        "authorities",
        "authorities",
        [],
        "Authorities: list of {name, ed25519, capabilities} where ed25519 is a base64 raw "
        "public key and capabilities the names it alone may write, update and read. "
        "Part of the policy, and so of the measurement.",
    ),
    Key(
        "metering.max_activation_bytes",
        "int",
        64 << 20,
        "Largest activation file the intake reads (bytes); larger ones are rejected unread.",
    ),
    Key(
        "metering.max_files_per_session",
        "int",
        4096,
        "Activation files one session may hand in; the rest are rejected.",
    ),
    Key(
        "metering.drain_timeout_seconds",
        "int",
        60,
        "How long closing a session waits for its activation files to be handled; files "
        "still unhandled then are counted (files_left) in its unseal statement.",
    ),
    Key(
        "metering.spool_bytes",
        "int",
        256 << 20,
        "Size of the activation spool: the tmpfs the embassy mounts on DATA/activations, "
        "the only directory the workload can write to (1 MiB to 64 GiB, at least "
        "max_activation_bytes). A full spool fails the workload's writes, never the host.",
    ),
    Key(
        "metering.spool_inodes",
        "int",
        8192,
        "Files (inodes) the activation spool holds at most (64 to 1048576).",
    ),
    Key(
        "metering.spool_gid",
        "int",
        0,
        "Group owning the activation spool (mode 0770, owner root): the workload's group "
        "when it does not run as root.",
    ),
    Key(
        "metrics.listen",
        "str",
        None,
        "Also serve Prometheus metrics (GET /metrics, as on the socket) on this TCP address: "
        "IP:PORT or [IPv6]:PORT, a literal loopback address unless "
        "metrics.allow_non_loopback (e.g. 127.0.0.1:9464). Null: on the socket only.",
    ),
    Key(
        "metrics.allow_non_loopback",
        "bool",
        False,
        "Let metrics.listen be a non-loopback address (the metrics then reach the network; "
        "they hold counts and embassy codes, never a workload's bytes).",
    ),
)


@dataclass(frozen=True, slots=True)
class Authority:
    name: str
    ed25519: bytes
    capabilities: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Metering:
    max_activation_bytes: int = 64 << 20
    max_files_per_session: int = 4096
    drain_timeout_seconds: int = 60
    spool_bytes: int = 256 << 20
    spool_inodes: int = 8192
    spool_gid: int = 0


@dataclass(frozen=True, slots=True)
class Jobs:
    """Job mode (``jobs.*``): what each job's fresh container is made from and its limits."""

    image: str
    command: tuple[str, ...] | None = None
    runtime: str | None = None
    user: str = "65534"
    pool_size: int = 2
    deadline_seconds: int = 300
    memory: int = 512 << 20
    cpus: int = 1000  # thousandths of a CPU
    pids: int = 128
    scratch_bytes: int = 64 << 20
    max_input_bytes: int = 64 << 20
    max_output_bytes: int = 64 << 20
    max_concurrent: int = 4

    def to_json(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "command": None if self.command is None else list(self.command),
            "runtime": self.runtime,
            "user": self.user,
            "pool_size": self.pool_size,
            "deadline_seconds": self.deadline_seconds,
            "memory": self.memory,
            "cpus": self.cpus,
            "pids": self.pids,
            "scratch_bytes": self.scratch_bytes,
            "max_input_bytes": self.max_input_bytes,
            "max_output_bytes": self.max_output_bytes,
            "max_concurrent": self.max_concurrent,
        }


@dataclass(frozen=True, slots=True)
class HttpLimits:
    backlog: int = 128
    workers: int = 16
    max_connections: int = 256


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """A literal IP and port (``metrics.listen``): nothing to resolve, nothing to guess."""

    host: str
    port: int

    @property
    def loopback(self) -> bool:
        return ipaddress.ip_address(self.host).is_loopback

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_listen(where: str, text: str) -> ListenAddress:
    """``IP:PORT`` or ``[IPv6]:PORT``, the port 1 to 65535."""
    bracketed = text.startswith("[")
    host, sep, port = text[1:].partition("]:") if bracketed else text.rpartition(":")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise fail(where, f"expected IP:PORT or [IPv6]:PORT, got {show_value(text)}") from None
    if not sep or (address.version == 6) != bracketed:
        raise fail(where, f"expected IP:PORT or [IPv6]:PORT, got {show_value(text)}")
    if not (port.isascii() and port.isdigit() and len(port) <= 5 and 1 <= int(port) <= 65535):
        raise fail(where, f"the port must be 1 to 65535, got {show_value(port)}")
    return ListenAddress(str(address), int(port))


@dataclass(frozen=True, slots=True)
class PcrLayout:
    embassy: int
    log: int
    boot: tuple[int, ...]

    @property
    def quoted(self) -> tuple[int, ...]:
        return tuple(sorted({*self.boot, self.embassy, self.log}))


@dataclass(frozen=True, slots=True)
class Config:
    socket: Path
    data_dir: Path
    log_level: str
    tpm_device: str | None
    pcrs: PcrLayout
    checkpoint_every: int
    max_body_bytes: int
    timeout_seconds: int
    authorities: tuple[Authority, ...]
    http: HttpLimits = HttpLimits()
    socket_group: str | None = None
    failpoint: str | None = None
    workload: WorkloadSpec | None = None
    metering: Metering = Metering()
    workload_metadata: Path | None = None
    jobs: Jobs | None = None
    metrics_listen: ListenAddress | None = None

    def effective(self) -> dict[str, Any]:
        """The config as measured: every key, defaults filled, in schema names."""
        return {
            "socket": str(self.socket),
            "socket_group": self.socket_group,
            "data_dir": str(self.data_dir),
            "log_level": self.log_level,
            "tpm": {"device": self.tpm_device},
            "pcrs": {
                "embassy": self.pcrs.embassy,
                "log": self.pcrs.log,
                "boot": list(self.pcrs.boot),
            },
            "statement_log": {"checkpoint_every": self.checkpoint_every},
            "http": {
                "max_body_bytes": self.max_body_bytes,
                "timeout_seconds": self.timeout_seconds,
                "backlog": self.http.backlog,
                "workers": self.http.workers,
                "max_connections": self.http.max_connections,
            },
            "debug": {"failpoint": self.failpoint},
            "workload_metadata": None
            if self.workload_metadata is None
            else str(self.workload_metadata),
            "metering": {
                "max_activation_bytes": self.metering.max_activation_bytes,
                "max_files_per_session": self.metering.max_files_per_session,
                "drain_timeout_seconds": self.metering.drain_timeout_seconds,
                "spool_bytes": self.metering.spool_bytes,
                "spool_inodes": self.metering.spool_inodes,
                "spool_gid": self.metering.spool_gid,
            },
            # Measured: a payload sealed to this measurement binds the jobs' limits too.
            **({} if self.jobs is None else {"jobs": self.jobs.to_json()}),
            # Measured when set: a TCP listener is something an auditor should see.
            **(
                {}
                if self.metrics_listen is None
                else {"metrics": {"listen": str(self.metrics_listen)}}
            ),
            "authorities": [
                {
                    "name": a.name,
                    "ed25519": b64encode(a.ed25519),
                    "capabilities": list(a.capabilities),
                }
                for a in self.authorities
            ],
        }


def _at(path: str) -> str:
    """Where a config error is: the key's dotted path, under ``config:``."""
    return f"config: {path}"


def _fail(path: str, message: str) -> ConfigError:
    return fail(_at(path), message)


def _as_socket(path: str, value: Any) -> Path:
    text = as_str(_at(path), value)
    if len(os.fsencode(text)) > MAX_SOCKET_PATH:
        raise _fail(path, f"a Unix socket path has at most {MAX_SOCKET_PATH} bytes")
    return Path(text)


def _as_pcr(path: str, value: Any) -> int:
    pcr = as_int(_at(path), value)
    if pcr not in EMBASSY_PCR_CHOICES:
        raise _fail(
            path,
            f"PCR {pcr} cannot be the embassy's: software can reset 16 and 23, "
            "17-22 need a higher locality and 0-12 belong to the boot path; "
            f"choose one of {sorted(EMBASSY_PCR_CHOICES)}",
        )
    return pcr


def _as_pcr_list(path: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > len(BOOT_PCR_CHOICES):
        raise _fail(path, f"expected a list of PCR indexes, got {show_value(value)}")
    pcrs = tuple(as_int(_at(f"{path}[{i}]"), v) for i, v in enumerate(value))
    bad = [p for p in pcrs if p not in BOOT_PCR_CHOICES]
    if bad or len(set(pcrs)) != len(pcrs):
        raise _fail(path, f"boot PCRs must be distinct values in 0-12, got {list(pcrs)}")
    return tuple(sorted(pcrs))


def _as_authorities(path: str, value: Any) -> tuple[Authority, ...]:
    if not isinstance(value, list) or len(value) > MAX_AUTHORITIES:
        raise _fail(path, f"expected a list of at most {MAX_AUTHORITIES} {{name, ed25519}}")
    out: list[Authority] = []
    for i, item in enumerate(value):
        where = f"{path}[{i}]"
        if not isinstance(item, dict):
            raise _fail(where, "expected a mapping with name and ed25519")
        unknown = sorted(show_key(k) for k in set(item) - {"name", "ed25519", "capabilities"})
        if unknown:
            raise _fail(f"{where}.{unknown[0]}", "unknown key")
        name = as_str(_at(f"{where}.name"), item.get("name"), pattern=_AUTHORITY)
        try:
            key = b64decode(item.get("ed25519"), "key")
        except Exception:
            raise _fail(f"{where}.ed25519", "expected a base64 Ed25519 public key") from None
        if len(key) != 32:
            raise _fail(f"{where}.ed25519", f"expected 32 bytes, got {len(key)}")
        if any(a.name == name for a in out):
            raise _fail(f"{where}.name", f"duplicate authority {name!r}")
        capabilities = _as_capabilities(f"{where}.capabilities", item.get("capabilities", []))
        for cap in capabilities:
            owner = next((a.name for a in out if cap in a.capabilities), None)
            if owner is not None:
                raise _fail(
                    f"{where}.capabilities",
                    f"capability {cap!r} is already owned by {owner!r} (one owner each)",
                )
        out.append(Authority(name, key, capabilities))
    return tuple(out)


def _as_capabilities(path: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > MAX_CAPABILITIES:
        raise _fail(path, f"expected a list of at most {MAX_CAPABILITIES} capability names")
    names = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or not CAPABILITY_PATTERN.fullmatch(item):
            raise _fail(f"{path}[{i}]", f"capability names match {CAPABILITY_PATTERN.pattern}")
        if item in names:
            raise _fail(f"{path}[{i}]", f"duplicate capability {item!r}")
        names.append(item)
    return tuple(sorted(names))


_LEVELS = ("debug", "info", "warning", "error")


def _as_level(path: str, value: Any) -> str:
    if value not in _LEVELS:
        raise _fail(path, f"expected one of {', '.join(_LEVELS)}, got {show_value(value)}")
    return str(value)


# String keys whose values have a shape of their own.
_PATTERNS: Mapping[str, re.Pattern[str]] = {
    "socket_group": _GROUP,
    "debug.failpoint": _FAILPOINT,
    "jobs.runtime": re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"),
    "jobs.user": re.compile(r"[1-9][0-9]{0,9}(?::[0-9]{1,10})?"),
}

_CONVERT: Mapping[str, Callable[[str, Any], Any]] = {
    "str": lambda p, v: None if v is None else as_str(_at(p), v, pattern=_PATTERNS.get(p)),
    "path": lambda p, v: _as_socket(p, v) if p == "socket" else Path(as_str(_at(p), v)),
    "int": lambda p, v: as_int(_at(p), v),
    "bool": lambda p, v: as_bool(_at(p), v),
    "str-list": lambda p, v: None if v is None else as_str_list(_at(p), v),
    "pcr": _as_pcr,
    "pcr-list": _as_pcr_list,
    "authorities": _as_authorities,
    "level": _as_level,
    "workload": lambda p, v: v,  # validated by embassy.workload.spec.parse_workload
}


def _flatten(tree: Mapping[str, Any], prefix: str, known: set[str]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if not isinstance(key, str):
            raise _fail(prefix or "<root>", f"keys must be strings, got {show_value(key)}")
        path = f"{prefix}{key}"
        if path in known:
            flat[path] = value
        elif isinstance(value, Mapping) and any(k.startswith(path + ".") for k in known):
            flat.update(_flatten(value, path + ".", known))
        else:
            raise _fail(f"{prefix}{show_key(key)}", "unknown key (see docs/config.md)")
    return flat


def parse_config(
    tree: Mapping[str, Any] | None,
    environ: Mapping[str, str] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Config:
    """Validate a parsed YAML tree (None: all defaults) into a :class:`Config`.

    ``metadata`` is the parsed ``workload_metadata`` file (None: not read) and ``environ`` the
    ``EMBASSY_WORKLOAD_*`` variables, both runtime metadata layered over the ``workload``
    section; :func:`load_config` reads them at the edge.
    """
    known = {k.path for k in SCHEMA}
    flat = _flatten(tree or {}, "", known)
    workload_tree = flat.pop("workload", None)
    # An explicit null is the same as an absent key, for the keys whose default is null.
    values: dict[str, Any] = {
        k.path: _CONVERT[k.kind](k.path, flat[k.path])
        if flat.get(k.path) is not None or (k.path in flat and k.default is not None)
        else _CONVERT[k.kind](k.path, k.default)
        if k.default is not None
        else None
        for k in SCHEMA
        if k.path != "workload"
    }
    layer = (
        None
        if metadata is None
        else (f"config: workload_metadata {values['workload_metadata']}: workload", metadata)
    )
    workload = parse_workload(workload_tree, environ or {}, metadata=layer)
    pcrs = PcrLayout(values["pcrs.embassy"], values["pcrs.log"], values["pcrs.boot"])
    if pcrs.embassy == pcrs.log:
        raise _fail("pcrs.log", f"must differ from pcrs.embassy ({pcrs.embassy})")
    if values["statement_log.checkpoint_every"] < 1:
        raise _fail("statement_log.checkpoint_every", "must be >= 1")
    if not 1024 <= values["http.max_body_bytes"] <= 1 << 30:
        raise _fail("http.max_body_bytes", "must be between 1 KiB and 1 GiB")
    if not 1 <= values["http.timeout_seconds"] <= 3600:
        raise _fail("http.timeout_seconds", "must be between 1 and 3600")
    http = HttpLimits(
        values["http.backlog"], values["http.workers"], values["http.max_connections"]
    )
    if not 1 <= http.backlog <= 65535:
        raise _fail("http.backlog", "must be between 1 and 65535")
    if not 1 <= http.workers <= 1024:
        raise _fail("http.workers", "must be between 1 and 1024")
    if not http.workers <= http.max_connections <= 65535:
        raise _fail("http.max_connections", "must be between http.workers and 65535")
    metering = Metering(
        values["metering.max_activation_bytes"],
        values["metering.max_files_per_session"],
        values["metering.drain_timeout_seconds"],
        values["metering.spool_bytes"],
        values["metering.spool_inodes"],
        values["metering.spool_gid"],
    )
    _check_metering(metering)
    jobs = _jobs(values)
    metrics_listen = _metrics_listen(values)
    if jobs is not None and values["socket_group"] is None:
        raise _fail(
            "socket_group",
            "job mode needs it: job processes are not root and reach the embassy through "
            "the socket, which is owner-only without a group",
        )
    return Config(
        socket=values["socket"],
        data_dir=values["data_dir"],
        log_level=values["log_level"],
        tpm_device=values["tpm.device"],
        pcrs=pcrs,
        checkpoint_every=values["statement_log.checkpoint_every"],
        max_body_bytes=values["http.max_body_bytes"],
        timeout_seconds=values["http.timeout_seconds"],
        http=http,
        socket_group=values["socket_group"],
        authorities=values["authorities"],
        failpoint=values["debug.failpoint"],
        workload=workload,
        workload_metadata=values["workload_metadata"],
        metering=metering,
        jobs=jobs,
        metrics_listen=metrics_listen,
    )


def _metrics_listen(values: Mapping[str, Any]) -> ListenAddress | None:
    text = values["metrics.listen"]
    if text is None:
        if values["metrics.allow_non_loopback"]:
            raise _fail("metrics.allow_non_loopback", "set only with metrics.listen")
        return None
    address = parse_listen(_at("metrics.listen"), text)
    if not address.loopback and not values["metrics.allow_non_loopback"]:
        raise _fail(
            "metrics.listen",
            f"{address} is not a loopback address; set metrics.allow_non_loopback to serve "
            "metrics beyond this machine",
        )
    return address


_JOB_BOUNDS: Mapping[str, tuple[int, int]] = {
    "pool_size": (0, 64),
    "deadline_seconds": (1, 86400),
    "memory": (6 << 20, 1 << 50),
    "cpus": (10, 4096 * 1000),
    "pids": (8, 1 << 22),
    "scratch_bytes": (1 << 20, 64 << 30),
    "max_input_bytes": (1, 64 << 30),
    "max_output_bytes": (1, 64 << 30),
    "max_concurrent": (1, 256),
}


def _jobs(values: Mapping[str, Any]) -> Jobs | None:
    """The ``jobs`` section, or None when ``jobs.image`` is not set (job mode off)."""
    image = values["jobs.image"]
    if image is None:
        others = [k.path for k in SCHEMA if k.path.startswith("jobs.") and k.path != "jobs.image"]
        given = [p for p in others if values[p] != next(k.default for k in SCHEMA if k.path == p)]
        if given:
            raise _fail(given[0], "set jobs.image to turn job mode on, or leave jobs.* out")
        return None
    for name, (lo, hi) in _JOB_BOUNDS.items():
        if not lo <= values[f"jobs.{name}"] <= hi:
            raise _fail(f"jobs.{name}", f"must be between {lo} and {hi}")
    uid = int(str(values["jobs.user"]).split(":")[0])
    if uid == 0:
        raise _fail("jobs.user", "job processes never run as root")
    return Jobs(
        image=image,
        command=values["jobs.command"],
        runtime=values["jobs.runtime"],
        **{name: values[f"jobs.{name}"] for name in ("user", *_JOB_BOUNDS)},
    )


def _check_metering(metering: Metering) -> None:
    if not 4096 <= metering.max_activation_bytes <= 1 << 30:
        raise _fail("metering.max_activation_bytes", "must be between 4 KiB and 1 GiB")
    if not 1 <= metering.max_files_per_session <= 1 << 20:
        raise _fail("metering.max_files_per_session", "must be between 1 and 1048576")
    if not 1 <= metering.drain_timeout_seconds <= 3600:
        raise _fail("metering.drain_timeout_seconds", "must be between 1 and 3600")
    if not 1 << 20 <= metering.spool_bytes <= 64 << 30:
        raise _fail("metering.spool_bytes", "must be between 1 MiB and 64 GiB")
    if metering.spool_bytes < metering.max_activation_bytes:
        raise _fail(
            "metering.spool_bytes",
            f"must be at least metering.max_activation_bytes ({metering.max_activation_bytes}):"
            " a valid activation file must fit in the spool",
        )
    if not 64 <= metering.spool_inodes <= 1 << 20:
        raise _fail("metering.spool_inodes", "must be between 64 and 1048576")
    if not 0 <= metering.spool_gid <= MAX_GID:
        raise _fail("metering.spool_gid", f"must be between 0 and {MAX_GID}")


def load_config(
    path: Path | None, environ: Mapping[str, str] | None = None, *, read_metadata: bool = True
) -> Config:
    """Read and validate a YAML config file (None: all defaults) and its metadata file.

    ``read_metadata=False`` skips the ``workload_metadata`` file: ``embassy measure`` needs
    only what is measured, and the workload is not (it is logged at launch).
    """
    if path is None:
        return parse_config(None, environ)
    text = _read_text(path, "config", f"config: cannot read {path}")
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config: {path} is not valid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"config: {path} is not valid YAML: nested too deeply") from None
    except ValueError:  # PyYAML's int() of more than 4,300 digits
        raise ConfigError(f"config: {path} is not valid YAML: an integer is too long") from None
    if tree is not None and not isinstance(tree, dict):
        raise ConfigError(f"config: {path}: top level must be a mapping")
    raw = tree.get("workload_metadata") if tree else None
    metadata = None
    if read_metadata and isinstance(raw, str) and raw:  # parse_config reports a bad value
        metadata = read_workload_metadata(Path(as_str(_at("workload_metadata"), raw)))
    return parse_config(tree, environ, metadata)


def _read_text(path: Path, what: str, cannot: str) -> str:
    """A file of at most MAX_CONFIG_BYTES, as UTF-8 text; ConfigError otherwise."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{cannot}: {exc.strerror}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{what}: {path} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what}: {path} is not UTF-8 (at byte {exc.start})") from None


def read_workload_metadata(path: Path) -> JsonObject:
    """The workload chosen at boot: one strict JSON object (the keys of ``workload:``).

    A configured file that is missing or unreadable stops the daemon: the operator said the
    workload comes from there, and launching another (or none) silently would fail open.
    """
    what = "config: workload_metadata"
    text = _read_text(path, what, f"{what}: cannot read {path}")
    try:
        return parse_json_object(text.encode("utf-8"), str(path))
    except WireFormatError as exc:
        detail = exc.message if exc.message.startswith(str(path)) else f"{path}: {exc.message}"
        raise ConfigError(f"{what}: {detail}") from None
    except ValueError:  # json's int() of more than 4,300 digits
        raise ConfigError(f"{what}: {path}: invalid JSON: an integer is too long") from None


def render_docs() -> str:
    """docs/config.md, generated from SCHEMA."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from `embassy.config.SCHEMA` by `scripts/gen_config_docs.py`; do not edit.",
        "",
        "| key | type | default | meaning |",
        "| --- | --- | --- | --- |",
    ]
    for k in SCHEMA:
        default = "null" if k.default is None else f"`{k.default}`"
        lines.append(f"| `{k.path}` | {k.kind} | {default} | {k.doc} |")
    lines += [
        "",
        "## The workload section",
        "",
        f"Each key may also come from the environment (`{ENV_PREFIX}<VAR>`), which wins, as a",
        "NixOS image passes runtime metadata at boot.",
        "",
        "| key | environment | meaning |",
        "| --- | --- | --- |",
    ]
    for w in WORKLOAD_SCHEMA:
        env = f"`{ENV_PREFIX}{w.env}`" if w.env else ""
        lines.append(f"| `workload.{w.name}` | {env} | {w.doc} |")
    return "\n".join(lines) + "\n"
