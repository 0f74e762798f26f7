"""The workload the embassy launches: its spec, its launch policy and its launch events.

Pure: no Docker, no I/O. ``docker_runtime`` turns a :class:`WorkloadSpec` into containers.

The spec comes from three layers: the ``workload:`` section of the YAML config, the runtime
metadata file named by ``workload_metadata`` (how a NixOS image is told its workload at boot),
and ``EMBASSY_WORKLOAD_*`` environment variables, each overriding the one before.
``WORKLOAD_SCHEMA`` lists every key once; unknown keys and bad values are refused with the
key's dotted path (``config: workload.ports[1]: ...``) or the variable's name
(``env EMBASSY_WORKLOAD_COMMAND: ...``).

:func:`check_launch_policy` refuses anything that could lift the seal (see DESIGN.md: host
network, privileged, NET_ADMIN, the Docker socket) and any override the image does not allow.
:func:`launch_events` are the typed events logged (and so extended into the log PCR) before
the workload starts; environment *values* never appear in them, only their SHA-256.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import posixpath
import re
import reprlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

from embassy.errors import ConfigError, PolicyError, WireFormatError
from embassy.log.entry import EntryType
from embassy.wire.codec import canonical_json

Protocol = Literal["tcp", "udp"]

# Where the embassy's two host directories appear inside the workload. Nothing else of the
# host is mounted unless the spec asks and the policy allows it.
SOCKET_TARGET = "/run/embassy"
ACTIVATIONS_TARGET = "/var/lib/embassy/activations"
RESERVED_TARGETS = (SOCKET_TARGET, ACTIVATIONS_TARGET)

ENV_PREFIX = "EMBASSY_WORKLOAD_"
OVERRIDE_LABEL = "org.embassy.allow-override"
OVERRIDABLE = ("command", "env", "mounts", "user")
EVENT_VERSION = 1
MIN_MEMORY_BYTES = 6 * 1024 * 1024  # Docker refuses less
MIN_NANO_CPUS = 10_000_000  # 0.01 CPU, Docker's minimum


@dataclass(frozen=True, slots=True)
class WorkloadKey:
    """One key of the ``workload:`` section: its YAML name, its variable, and its meaning."""

    name: str
    env: str | None
    doc: str


WORKLOAD_SCHEMA: tuple[WorkloadKey, ...] = (
    WorkloadKey("name", None, "Container name suffix (embassy-<id>-<name>); default 'workload'."),
    WorkloadKey("image", "IMAGE", "Local image reference (required); never pulled."),
    WorkloadKey(
        "command",
        "COMMAND",
        "Command as a list of strings (env: a JSON list); needs the "
        "image's allow-override label to include 'command'.",
    ),
    WorkloadKey(
        "env",
        "ENV",
        "Environment, a map of strings (env: a JSON object merged over it); "
        "values are logged only as SHA-256.",
    ),
    WorkloadKey(
        "ports",
        "PORTS",
        "Published ports: '8080:80/tcp', '127.0.0.1:8080:80/udp' or "
        "{container_port, host_port, protocol, host_ip} (env: comma list). Host port 0: any.",
    ),
    WorkloadKey("memory", "MEMORY", "Memory limit: bytes, or '512m', '2g' (binary units)."),
    WorkloadKey("cpus", "CPUS", "CPU limit, e.g. '1.5'."),
    WorkloadKey("pids", "PIDS", "Process limit (>= 1)."),
    WorkloadKey(
        "mounts", None, "Extra bind mounts: list of {source, target, read_only (default true)}."
    ),
    WorkloadKey("network_mode", None, "Null or 'bridge' (the embassy's network) or 'none'."),
    WorkloadKey("privileged", None, "Always refused when true."),
    WorkloadKey("cap_add", None, "Capabilities added after dropping ALL; a short allowlist."),
    WorkloadKey("user", None, "User (name, uid or uid:gid) the workload runs as."),
    WorkloadKey(
        "runtime",
        "RUNTIME",
        "Docker runtime the workload runs under: null (Docker's default, runc) or a runtime "
        'registered with dockerd, e.g. gVisor\'s runsc with runtimeArgs ["--network=host"] '
        "(its sentry then uses the kernel's stack in the namespace the embassy wires).",
    ),
)
_KEYS = frozenset(k.name for k in WORKLOAD_SCHEMA)
_ENV_VARS = {ENV_PREFIX + k.env: k.name for k in WORKLOAD_SCHEMA if k.env is not None}


@dataclass(frozen=True, slots=True)
class PortMapping:
    container_port: int
    protocol: Protocol
    host_ip: str
    host_port: int  # 0: Docker picks a free port


@dataclass(frozen=True, slots=True)
class Mount:
    source: str
    target: str
    read_only: bool


@dataclass(frozen=True, slots=True)
class Limits:
    memory_bytes: int | None = None
    nano_cpus: int | None = None
    pids: int | None = None


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    name: str
    image: str
    command: tuple[str, ...] | None = None
    env: tuple[tuple[str, str], ...] = ()  # sorted by name
    ports: tuple[PortMapping, ...] = ()
    limits: Limits = Limits()
    mounts: tuple[Mount, ...] = ()
    network_mode: str | None = None
    privileged: bool = False
    cap_add: tuple[str, ...] = ()
    user: str | None = None
    runtime: str | None = None


# --------------------------------------------------------------------------- parsing

# Every value is bounded before it is used: the config and the metadata file are fuzzed,
# and a parse error must be a ConfigError naming the key, never a traceback (an int() of a
# Unicode digit, a Decimal overflow, a 5,000-digit integer). Digits are ASCII only: str's
# isdigit() and regex \d accept other scripts, which int() then reads or refuses.
MAX_TEXT = 4096  # a name, path, image, user, ...
MAX_VALUE = 64 * 1024  # one command argument or environment value
MAX_ITEMS = 1024  # entries of command, env, ports
MAX_MOUNTS = 64
MAX_JSON_ENV = 1 << 20  # EMBASSY_WORKLOAD_COMMAND / _ENV as JSON
MAX_INT = 2**63 - 1  # what Docker's API carries
MAX_MEMORY_BYTES = 1 << 50
MAX_CPUS = 4096
MAX_PIDS = 1 << 22  # the kernel's PID_MAX_LIMIT
MAX_UID = 2**32 - 2
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_UINT = re.compile(r"[0-9]{1,20}")


class _BoundedRepr(reprlib.Repr):
    def __init__(self) -> None:
        super().__init__()
        self.maxstring = self.maxother = 80
        self.maxlist = self.maxtuple = self.maxdict = self.maxset = 6
        self.maxlevel = 3

    def repr_int(self, x: int, level: int) -> str:
        # repr() of an integer of more than 4,300 digits raises ValueError.
        if abs(x).bit_length() > 128:
            return f"<an integer of {abs(x).bit_length()} bits>"
        return repr(x)


_REPR = _BoundedRepr()


def show_value(value: Any) -> str:
    """A short, safe rendering of a bad value for an error message (never raises)."""
    try:
        return _REPR.repr(value)
    except Exception:  # a repr that fails is still no reason for a traceback
        return f"<a {type(value).__name__}>"


def show_key(key: Any) -> str:
    """A mapping key for a dotted path: as it is if short and printable, else shown."""
    if isinstance(key, str) and len(key) <= 128 and key.isprintable():
        return key
    return show_value(key)


def _fail(where: str, message: str) -> ConfigError:
    return ConfigError(f"{where}: {message}")


def _as_str(
    where: str,
    value: Any,
    *,
    allow_empty: bool = False,
    limit: int = MAX_TEXT,
    controls: bool = False,
) -> str:
    """A string that encodes to UTF-8, has no NUL, at most ``limit`` characters and (unless
    ``controls``) no control characters."""
    if not isinstance(value, str) or (not value and not allow_empty):
        raise _fail(where, f"expected a non-empty string, got {show_value(value)}")
    if len(value) > limit:
        raise _fail(where, f"longer than {limit} characters ({len(value)})")
    if "\x00" in value:
        raise _fail(where, "NUL characters are not allowed")
    if not controls and _CONTROL.search(value):
        raise _fail(where, "control characters are not allowed")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (YAML "\ud800", a non-UTF-8 environment)
        raise _fail(where, "not valid UTF-8 (a lone surrogate)") from None
    return value


def _as_int(where: str, value: Any, lo: int = -MAX_INT, hi: int = MAX_INT) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(where, f"expected an integer, got {show_value(value)}")
    if not lo <= value <= hi:
        raise _fail(where, f"{show_value(value)} is out of range ({lo}..{hi})")
    return value


def _as_uint_text(where: str, value: Any) -> Any:
    """A string of ASCII digits as an int (other values as they are, for _as_int)."""
    if isinstance(value, str):
        if not _UINT.fullmatch(value.strip()):
            raise _fail(where, f"expected an integer (ASCII digits), got {show_value(value)}")
        return int(value.strip())
    return value


def _as_bool(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(where, f"expected true or false, got {show_value(value)}")
    return value


_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}")


def _as_name(where: str, value: Any) -> str:
    name = _as_str(where, value)
    if not _NAME.fullmatch(name):
        raise _fail(
            where,
            f"expected a container name ([a-zA-Z0-9][a-zA-Z0-9_.-]*), got {show_value(name)}",
        )
    return name


def _as_image(where: str, value: Any) -> str:
    image = _as_str(where, value, limit=512)
    if any(c.isspace() for c in image):
        raise _fail(where, f"an image reference has no whitespace, got {show_value(image)}")
    return image


def _as_list(where: str, value: Any, limit: int, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise _fail(where, f"expected a {what}, got {show_value(value)}")
    if len(value) > limit:
        raise _fail(where, f"more than {limit} items ({len(value)})")
    return value


def _as_command(where: str, value: Any) -> tuple[str, ...]:
    items = _as_list(where, value, MAX_ITEMS, "non-empty list of strings")
    if not items:
        raise _fail(where, "expected a non-empty list of strings, got []")
    return tuple(
        _as_str(f"{where}[{i}]", v, allow_empty=True, limit=MAX_VALUE, controls=True)
        for i, v in enumerate(items)
    )


_ENV_NAME = re.compile(r"[^=\x00]{1,1024}")


def _as_env(where: str, value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise _fail(where, f"expected a mapping of names to strings, got {type(value).__name__}")
    if len(value) > MAX_ITEMS:
        raise _fail(where, f"more than {MAX_ITEMS} variables ({len(value)})")
    out: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not _ENV_NAME.fullmatch(key):
            raise _fail(where, f"bad variable name {show_value(key)} (1-1024, no '=' or NUL)")
        name = _as_str(where, key)
        if not isinstance(item, str):
            raise _fail(f"{where}.{name}", f"expected a string (quote it), got {show_value(item)}")
        out[name] = _as_str(
            f"{where}.{name}", item, allow_empty=True, limit=MAX_VALUE, controls=True
        )
    return out


def _as_port_number(where: str, value: Any, *, allow_zero: bool) -> int:
    port = _as_int(where, _as_uint_text(where, value))
    if not (0 if allow_zero else 1) <= port <= 65535:
        raise _fail(where, f"port {show_value(port)} out of range")
    return port


def _as_host_ip(where: str, value: Any) -> str:
    text = _as_str(where, value, limit=64)
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise _fail(where, f"expected an IP address, got {show_value(text)}") from None


def _as_protocol(where: str, value: Any) -> Protocol:
    if value == "tcp":
        return "tcp"
    if value == "udp":
        return "udp"
    raise _fail(where, f"protocol must be tcp or udp, got {show_value(value)}")


_PORT_TEXT = re.compile(
    r"(?:(?P<ip>\[[0-9a-fA-F:.]+\]|[0-9.]+):)?(?P<host>[0-9]+):(?P<container>[0-9]+)"
    r"(?:/(?P<proto>[A-Za-z0-9]+))?"
)


def _as_port(where: str, value: Any) -> PortMapping:
    if isinstance(value, str):
        match = _PORT_TEXT.fullmatch(_as_str(where, value, limit=128).strip())
        if match is None:
            raise _fail(
                where,
                f"expected HOST_PORT:CONTAINER_PORT[/tcp|udp] or "
                f"IP:HOST_PORT:CONTAINER_PORT[/tcp|udp], got {show_value(value)}",
            )
        ip = (match["ip"] or "0.0.0.0").strip("[]")  # noqa: S104 - Docker's default binding
        return PortMapping(
            container_port=_as_port_number(where, match["container"], allow_zero=False),
            protocol=_as_protocol(where, match["proto"] or "tcp"),
            host_ip=_as_host_ip(where, ip),
            host_port=_as_port_number(where, match["host"], allow_zero=True),
        )
    if isinstance(value, Mapping):
        allowed = {"container_port", "host_port", "protocol", "host_ip"}
        unknown = sorted(show_key(k) for k in set(value) - allowed)
        if unknown:
            raise _fail(f"{where}.{unknown[0]}", "unknown key")
        for required in ("container_port", "host_port"):
            if required not in value:
                raise _fail(f"{where}.{required}", "missing")
        return PortMapping(
            container_port=_as_port_number(
                f"{where}.container_port", value["container_port"], allow_zero=False
            ),
            protocol=_as_protocol(f"{where}.protocol", value.get("protocol", "tcp")),
            host_ip=_as_host_ip(f"{where}.host_ip", value.get("host_ip", "0.0.0.0")),  # noqa: S104
            host_port=_as_port_number(f"{where}.host_port", value["host_port"], allow_zero=True),
        )
    raise _fail(where, f"expected a port string or mapping, got {show_value(value)}")


def _check_ports(where: str, ports: list[PortMapping]) -> tuple[PortMapping, ...]:
    seen: set[tuple[str, int, str]] = set()
    for i, port in enumerate(ports):
        key = (port.host_ip, port.host_port, port.protocol)
        if port.host_port and key in seen:
            raise _fail(
                f"{where}[{i}]",
                f"host {port.protocol} port {port.host_ip}:{port.host_port} is bound twice",
            )
        seen.add(key)
    return tuple(
        sorted(ports, key=lambda p: (p.container_port, p.protocol, p.host_ip, p.host_port))
    )


def _as_ports(where: str, value: Any) -> tuple[PortMapping, ...]:
    items = _as_list(where, value, MAX_ITEMS, "list of ports")
    return _check_ports(where, [_as_port(f"{where}[{i}]", v) for i, v in enumerate(items)])


def _ports_from_env(where: str, text: str) -> tuple[PortMapping, ...]:
    items = [] if not text.strip() else text.split(",")
    if len(items) > MAX_ITEMS:
        raise _fail(where, f"more than {MAX_ITEMS} ports ({len(items)})")
    return _check_ports(where, [_as_port(f"{where}[{i}]", v) for i, v in enumerate(items)])


_UNITS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}
_MEMORY_TEXT = re.compile(r"(?P<n>[0-9]{1,20})\s*(?:(?P<unit>[kmgt])(?:i?b)?|b)?", re.IGNORECASE)


def _as_memory(where: str, value: Any) -> int:
    if isinstance(value, str):
        match = _MEMORY_TEXT.fullmatch(_as_str(where, value, limit=64).strip())
        if match is None:
            raise _fail(
                where, f"expected bytes or a size like '512m' or '2g', got {show_value(value)}"
            )
        size: int = int(match["n"]) * 1024 ** _UNITS[(match["unit"] or "").lower()]
    else:
        size = _as_int(where, value)
    if size < MIN_MEMORY_BYTES:
        raise _fail(where, f"memory limit {size} bytes is below Docker's minimum of 6 MiB")
    if size > MAX_MEMORY_BYTES:
        raise _fail(where, f"memory limit {size} bytes is over {MAX_MEMORY_BYTES} (1 PiB)")
    return size


_CPUS_TEXT = re.compile(r"[0-9]+(?:\.[0-9]+)?")
_NOT_FINITE = ("nan", "inf", "infinity")


def _as_cpus(where: str, value: Any) -> int:
    shown = show_value(value)
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise _fail(where, f"expected a number of CPUs like '1.5', got {shown}")
    if isinstance(value, float) and not math.isfinite(value):
        raise _fail(where, f"expected a finite number of CPUs, got {shown}")
    if isinstance(value, str):
        text = _as_str(where, value, allow_empty=True, limit=64).strip()
        if text.lower().lstrip("+-") in _NOT_FINITE:
            raise _fail(where, f"expected a finite number of CPUs, got {shown}")
        if not _CPUS_TEXT.fullmatch(text):  # ASCII only: Decimal reads other scripts' digits
            raise _fail(where, f"expected a number of CPUs like '1.5', got {shown}")
    elif isinstance(value, int) and abs(value) > MAX_CPUS:  # no str() of a huge int
        raise _fail(where, f"CPU limit must be at most {MAX_CPUS}, got {shown}")
    else:
        text = str(value)  # a float in range may read '1e-05': Decimal takes it exactly
    cpus = Decimal(text)
    # Compared before any arithmetic: nothing can overflow, and the exponent says exactly
    # how many decimals there are (a product would round at 28 digits).
    if cpus > MAX_CPUS:
        raise _fail(where, f"CPU limit must be at most {MAX_CPUS}, got {shown}")
    if cpus * 100 < 1:
        raise _fail(where, f"CPU limit must be at least 0.01, got {shown}")
    exponent = cpus.normalize().as_tuple().exponent
    if isinstance(exponent, int) and exponent < -9:
        raise _fail(where, f"expected a number of CPUs with at most 9 decimals, got {shown}")
    return int(cpus * 1_000_000_000)


def _as_pids(where: str, value: Any) -> int:
    pids = _as_int(where, _as_uint_text(where, value))
    if pids < 1:
        raise _fail(where, f"must be >= 1, got {pids}")
    if pids > MAX_PIDS:
        raise _fail(where, f"must be <= {MAX_PIDS}, got {show_value(pids)}")
    return pids


def _normalize_path(path: str) -> str:
    """Lexically normalize an absolute path ('//run/' and '/var/run/../run' are '/run')."""
    return posixpath.normpath("/" + path.lstrip("/"))


def _is_under(path: str, root: str) -> bool:
    return root in (path, "/") or path.startswith(root + "/")


def _as_mount(where: str, value: Any) -> Mount:
    if not isinstance(value, Mapping):
        raise _fail(where, "expected a mapping with source, target and read_only")
    unknown = sorted(show_key(k) for k in set(value) - {"source", "target", "read_only"})
    if unknown:
        raise _fail(f"{where}.{unknown[0]}", "unknown key")
    paths: dict[str, str] = {}
    for key in ("source", "target"):
        text = _as_str(f"{where}.{key}", value.get(key))
        if not text.startswith("/"):
            raise _fail(f"{where}.{key}", f"expected an absolute path, got {show_value(text)}")
        paths[key] = _normalize_path(text)
    reason = _reserved_target_reason(paths["target"])
    if reason:
        raise _fail(f"{where}.target", reason)
    read_only = _as_bool(f"{where}.read_only", value.get("read_only", True))
    return Mount(paths["source"], paths["target"], read_only)


def _as_mounts(where: str, value: Any) -> tuple[Mount, ...]:
    items = _as_list(where, value, MAX_MOUNTS, "list of {source, target, read_only}")
    mounts = [_as_mount(f"{where}[{i}]", v) for i, v in enumerate(items)]
    targets = [m.target for m in mounts]
    for i, target in enumerate(targets):
        if target in targets[:i]:
            raise _fail(f"{where}[{i}].target", f"{target} is mounted twice")
    return tuple(mounts)


def _as_network_mode(where: str, value: Any) -> str | None:
    return None if value is None else _as_str(where, value, limit=256)


_CAP = re.compile(r"[A-Z][A-Z0-9_]*")


def normalize_capability(name: str) -> str:
    """'cap_net_admin', 'CAP_NET_ADMIN' and 'net_admin' are all 'NET_ADMIN'."""
    upper = name.strip().upper()
    return upper.removeprefix("CAP_")


def _as_caps(where: str, value: Any) -> tuple[str, ...]:
    caps: set[str] = set()
    for i, item in enumerate(_as_list(where, value, MAX_MOUNTS, "list of capability names")):
        cap = normalize_capability(_as_str(f"{where}[{i}]", item, limit=64))
        if not _CAP.fullmatch(cap):
            raise _fail(f"{where}[{i}]", f"not a capability name: {show_value(item)}")
        caps.add(cap)
    return tuple(sorted(caps))


def _as_user(where: str, value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(_as_int(where, value, 0, MAX_UID))
    user = _as_str(where, value, limit=256)
    if any(c.isspace() for c in user) or user.count(":") > 1:
        raise _fail(where, f"expected a user name, uid or uid:gid, got {show_value(user)}")
    return user


_RUNTIME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}", re.ASCII)


def _as_runtime(where: str, value: Any) -> str | None:
    if value is None:
        return None
    runtime = _as_str(where, value, limit=64)
    if not _RUNTIME.fullmatch(runtime):
        raise _fail(where, f"expected a Docker runtime name, got {show_value(runtime)}")
    return runtime


_CONVERT: Mapping[str, Callable[[str, Any], Any]] = {
    "name": _as_name,
    "image": _as_image,
    "command": _as_command,
    "env": _as_env,
    "ports": _as_ports,
    "memory": _as_memory,
    "cpus": _as_cpus,
    "pids": _as_pids,
    "mounts": _as_mounts,
    "network_mode": _as_network_mode,
    "privileged": _as_bool,
    "cap_add": _as_caps,
    "user": _as_user,
    "runtime": _as_runtime,
}


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _json_env(where: str, text: str) -> Any:
    if len(text) > MAX_JSON_ENV:
        raise _fail(where, f"longer than {MAX_JSON_ENV} characters ({len(text)})")
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise _fail(where, f"invalid JSON: {exc.msg} at offset {exc.pos}") from None
    except RecursionError:
        raise _fail(where, "invalid JSON: nested too deeply") from None
    except ValueError:  # NaN/Infinity, or an integer of more than 4,300 digits
        raise _fail(where, "invalid JSON: a non-finite number or an integer too long") from None


def _from_environ(environ: Mapping[str, str]) -> dict[str, tuple[str, Any]]:
    """The EMBASSY_WORKLOAD_* overrides, converted; each with the name errors report."""
    out: dict[str, tuple[str, Any]] = {}
    for var in sorted(environ):
        if not var.startswith(ENV_PREFIX):
            continue
        where = f"env {show_key(var)}"
        key = _ENV_VARS.get(var)
        if key is None:
            raise _fail(where, f"unknown variable (known: {', '.join(sorted(_ENV_VARS))})")
        # Python decodes a non-UTF-8 environment with surrogates: refuse those here.
        text = _as_str(where, environ[var], allow_empty=True, limit=MAX_JSON_ENV, controls=True)
        value: Any
        if key == "command":
            value = _as_command(where, _json_env(where, text))
        elif key == "env":
            value = _as_env(where, _json_env(where, text))
        elif key == "ports":
            value = _ports_from_env(where, text)
        else:
            value = _CONVERT[key](where, text)
        out[key] = (where, value)
    return out


def parse_workload(
    tree: Mapping[str, Any] | None,
    environ: Mapping[str, str],
    path: str = "workload",
    metadata: tuple[str, Mapping[str, Any]] | None = None,
) -> WorkloadSpec | None:
    """Validate the ``workload:`` section and the runtime metadata layered over it.

    Three layers, each overriding the one before key by key (``env`` maps are merged): the
    config's ``workload:`` section, then ``metadata`` (``(name, mapping)``: the workload
    chosen at boot, read from the ``workload_metadata`` file), then the
    ``EMBASSY_WORKLOAD_*`` variables. None (no layer says anything) means the embassy runs
    no workload.
    """
    values: dict[str, Any] = {}
    where: dict[str, str] = {}
    layers = [(f"config: {path}", tree)]
    if metadata is not None:
        layers.append(metadata)
    for prefix, layer in layers:
        if layer is not None and not isinstance(layer, Mapping):
            raise _fail(prefix, f"expected a mapping, got {type(layer).__name__}")
        for key, value in (layer or {}).items():
            if key not in _KEYS:
                raise _fail(f"{prefix}.{show_key(key)}", "unknown key (see docs/config.md)")
            key_path = f"{prefix}.{key}"
            if value is not None:  # an explicit null is the same as an absent key
                converted = _CONVERT[key](key_path, value)
                if key == "env":
                    converted = {**values.get("env", {}), **converted}
                values[key] = converted
                where[key] = key_path
    overrides = _from_environ(environ)
    if tree is None and metadata is None and not overrides:
        return None
    for key, (var, value) in overrides.items():
        values[key] = {**values.get("env", {}), **value} if key == "env" else value
        where[key] = var
    if "image" not in values:
        raise _fail(
            f"config: {path}.image", f"required (or set {ENV_PREFIX}IMAGE) when a workload is given"
        )
    spec = WorkloadSpec(
        name=values.get("name", "workload"),
        image=values["image"],
        command=values.get("command"),
        env=tuple(sorted(values.get("env", {}).items())),
        ports=values.get("ports", ()),
        limits=Limits(values.get("memory"), values.get("cpus"), values.get("pids")),
        mounts=values.get("mounts", ()),
        network_mode=values.get("network_mode"),
        privileged=values.get("privileged", False),
        cap_add=values.get("cap_add", ()),
        user=values.get("user"),
        runtime=values.get("runtime"),
    )
    if spec.network_mode == "none" and spec.ports:
        raise _fail(where["ports"], "ports cannot be published with network_mode none")
    return spec


# --------------------------------------------------------------------------- launch policy

# Capabilities that could lift the seal, each with why.
SEAL_LIFTING_CAPS: Mapping[str, str] = {
    "NET_ADMIN": "changes the firewall rules of its own network namespace",
    "NET_RAW": "opens raw and packet sockets that send frames the seal's rules do not expect",
    "SYS_ADMIN": "mounts, unshares and enters namespaces, among much else",
    "SYS_MODULE": "loads kernel modules",
    "SYS_PTRACE": "injects code into other processes",
    "BPF": "loads BPF programs that see and redirect traffic beside netfilter",
    "ALL": "grants every capability, NET_ADMIN included",
}
# Anything not here is refused: an allowlist fails closed on capabilities added later.
ALLOWED_CAPS = frozenset(
    {
        "AUDIT_WRITE",
        "CHOWN",
        "DAC_OVERRIDE",
        "FOWNER",
        "FSETID",
        "IPC_LOCK",
        "KILL",
        "MKNOD",
        "NET_BIND_SERVICE",
        "SETFCAP",
        "SETGID",
        "SETPCAP",
        "SETUID",
        "SYS_CHROOT",
        "SYS_NICE",
    }
)
# Host paths no workload may mount, and the Docker (and other runtime) API sockets: with an
# API socket a workload can start an unsealed container, or one in its own namespace with
# NET_ADMIN, and remove its seal. A parent directory of a socket exposes it just the same.
RUNTIME_SOCKETS = (
    "/run/docker.sock",
    "/var/run/docker.sock",
    "/run/containerd/containerd.sock",
    "/var/run/containerd/containerd.sock",
    "/run/podman/podman.sock",
    "/var/run/podman/podman.sock",
    "/run/crio/crio.sock",
    "/var/run/crio/crio.sock",
)
RUNTIME_SOCKET_SUFFIXES = ("docker.sock", "containerd.sock", "podman.sock", "crio.sock")
RUNTIME_DIRS = ("/run/docker", "/var/run/docker", "/run/containerd", "/var/run/containerd")
KERNEL_DIRS = ("/proc", "/sys", "/dev")
_SAFE_NETWORK_MODES = (None, "bridge", "default", "none")


def _reserved_target_reason(target: str) -> str | None:
    for reserved in RESERVED_TARGETS:
        if _is_under(target, reserved) or (target != "/" and _is_under(reserved, target)):
            return f"mount target {target} would shadow the embassy's own mount {reserved}"
    if target == "/":
        return "mount target / would replace the workload's root filesystem"
    return None


def mount_source_refusal(source: str) -> str | None:
    """Why a host path may never be mounted into the workload (None if it may, by policy)."""
    if not source.startswith("/"):
        return f"mount source {source!r} is not an absolute host path"
    path = _normalize_path(source)
    if path == "/":
        return "mount source / is the host's root filesystem"
    if path.endswith(RUNTIME_SOCKET_SUFFIXES) or any(_is_under(path, d) for d in RUNTIME_DIRS):
        return (
            f"mount source {source} exposes a container runtime API (the Docker socket): the "
            "workload could start an unsealed container or remove its own seal"
        )
    for sock in RUNTIME_SOCKETS:
        if _is_under(sock, path):
            return (
                f"mount source {source} contains the container runtime socket {sock}: the "
                "workload could start an unsealed container or remove its own seal"
            )
    for kernel in KERNEL_DIRS:
        if _is_under(path, kernel) or _is_under(kernel, path):
            return f"mount source {source} exposes the host's {kernel}"
    return None


def allowed_overrides(image_labels: Mapping[str, str]) -> frozenset[str]:
    """What the image's ``org.embassy.allow-override`` label lets the operator override."""
    text = image_labels.get(OVERRIDE_LABEL, "")
    items = {item.strip().lower() for item in text.split(",") if item.strip()}
    unknown = sorted(items - set(OVERRIDABLE))
    if unknown:
        raise WireFormatError(
            f"image label {OVERRIDE_LABEL}: unknown override {unknown[0]!r} "
            f"(known: {', '.join(OVERRIDABLE)})"
        )
    return frozenset(items)


def _overrides(spec: WorkloadSpec, defaults: WorkloadSpec | None) -> list[str]:
    """What the spec changes relative to the image's own defaults (all it sets, if None)."""
    changed: list[str] = []
    if spec.command is not None and (defaults is None or spec.command != defaults.command):
        changed.append("command")
    base_env = set(defaults.env) if defaults is not None else set()
    if any(item not in base_env for item in spec.env):
        changed.append("env")
    if spec.mounts:
        changed.append("mounts")
    if spec.user is not None and (defaults is None or spec.user != defaults.user):
        changed.append("user")
    return changed


def check_launch_policy(
    spec: WorkloadSpec, image_labels: Mapping[str, str], defaults: WorkloadSpec | None = None
) -> None:
    """Refuse (PolicyError) a workload that could lift its seal or overrides what it may not.

    ``defaults`` is the image's own configuration (its command, environment and user): a
    spec that repeats them overrides nothing. Without it, anything the spec sets counts.
    The workload's network namespace is the embassy's to wire: ``container:`` and ``ns:``
    network modes, which name another namespace, are always refused.
    """
    mode = spec.network_mode
    if mode is not None:
        lowered = mode.strip().lower()
        if lowered == "host":
            raise PolicyError(
                "network_mode host shares the host's network namespace: the seal could not "
                "confine the workload"
            )
        if lowered.startswith(("container:", "ns:", "service:")):
            raise PolicyError(
                f"network_mode {mode!r} shares a network namespace the operator names: the "
                "workload's namespace is one the embassy makes the only link of, and gates"
            )
        if mode not in _SAFE_NETWORK_MODES:
            raise PolicyError(
                f"network_mode {mode!r}: the workload may only use the embassy's own bridge "
                "network (null or 'bridge') or none"
            )
    if spec.privileged:
        raise PolicyError(
            "privileged: a privileged container can change its own firewall rules and lift the seal"
        )
    for raw in spec.cap_add:
        cap = normalize_capability(raw)
        if cap in SEAL_LIFTING_CAPS:
            raise PolicyError(
                f"cap_add {raw}: {cap} {SEAL_LIFTING_CAPS[cap]}, which could lift the seal"
            )
        if cap not in ALLOWED_CAPS:
            raise PolicyError(
                f"cap_add {raw}: not on the embassy's capability allowlist "
                f"({', '.join(sorted(ALLOWED_CAPS))})"
            )
    for mount in spec.mounts:
        reason = mount_source_refusal(mount.source) or _reserved_target_reason(
            _normalize_path(mount.target)
        )
        if reason:
            raise PolicyError(reason)
    allowed = allowed_overrides(image_labels)
    for what in _overrides(spec, defaults):
        if what not in allowed:
            raise PolicyError(
                f"the image does not allow overriding its {what} (label {OVERRIDE_LABEL})"
            )


# --------------------------------------------------------------------------- launch events

# The event names are the log's entry types: defined once, in embassy.log.entry.
LAUNCH_IMAGE = EntryType.LAUNCH_IMAGE.value
LAUNCH_COMMAND = EntryType.LAUNCH_COMMAND.value
LAUNCH_ENV = EntryType.LAUNCH_ENV.value
LAUNCH_PORTS = EntryType.LAUNCH_PORTS.value
LAUNCH_LIMITS = EntryType.LAUNCH_LIMITS.value
LAUNCH_OPTIONS = EntryType.LAUNCH_OPTIONS.value
LAUNCH_SEAL_POLICY = EntryType.LAUNCH_SEAL_POLICY.value
LAUNCH_SEPARATOR = EntryType.LAUNCH_SEPARATOR.value
LAUNCH_EVENT_TYPES = (
    LAUNCH_IMAGE,
    LAUNCH_COMMAND,
    LAUNCH_ENV,
    LAUNCH_PORTS,
    LAUNCH_LIMITS,
    LAUNCH_OPTIONS,
    LAUNCH_SEAL_POLICY,
    LAUNCH_SEPARATOR,
)


def _spec_bodies(spec: WorkloadSpec, image_digest: str) -> list[tuple[str, dict[str, Any]]]:
    v = {"v": EVENT_VERSION}
    return [
        (LAUNCH_IMAGE, {**v, "name": spec.name, "image": spec.image, "digest": image_digest}),
        (LAUNCH_COMMAND, {**v, "command": None if spec.command is None else list(spec.command)}),
        (
            LAUNCH_ENV,
            {
                **v,
                # Values may be secrets: only their SHA-256. A low-entropy value can still be
                # guessed from it, so secrets belong in the embassy's session, not env.
                "env": [
                    {"name": name, "sha256": hashlib.sha256(value.encode("utf-8")).hexdigest()}
                    for name, value in spec.env
                ],
            },
        ),
        (
            LAUNCH_PORTS,
            {
                **v,
                "ports": [
                    {
                        "container_port": p.container_port,
                        "protocol": p.protocol,
                        "host_ip": p.host_ip,
                        "host_port": p.host_port,
                    }
                    for p in spec.ports
                ],
            },
        ),
        (
            LAUNCH_LIMITS,
            {
                **v,
                "memory_bytes": spec.limits.memory_bytes,
                "nano_cpus": spec.limits.nano_cpus,
                "pids": spec.limits.pids,
            },
        ),
        (
            LAUNCH_OPTIONS,
            {
                **v,
                "mounts": [
                    {"source": m.source, "target": m.target, "read_only": m.read_only}
                    for m in spec.mounts
                ],
                "network_mode": spec.network_mode,
                "privileged": spec.privileged,
                "cap_add": sorted(normalize_capability(c) for c in spec.cap_add),
                "user": spec.user,
                # Only when set: a spec without one keeps the launch digest it always had.
                **({"runtime": spec.runtime} if spec.runtime is not None else {}),
            },
        ),
    ]


def launch_events(
    spec: WorkloadSpec, image_digest: str, seal_policy: Mapping[str, Any]
) -> list[tuple[str, bytes]]:
    """The typed events logged, in this order, before the workload starts."""
    events = [(kind, canonical_json(body)) for kind, body in _spec_bodies(spec, image_digest)]
    try:
        policy = canonical_json(dict(seal_policy))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"seal policy: cannot be encoded canonically: {exc}") from None
    events.append((LAUNCH_SEAL_POLICY, policy))
    events.append((LAUNCH_SEPARATOR, canonical_json({})))
    return events


def launch_config_digest(spec: WorkloadSpec, image_digest: str) -> bytes:
    """SHA-256 of the workload's launch configuration: the workload identity's config digest.

    It is the digest of the canonical JSON object mapping each spec-derived launch event
    type (image, command, env, ports, limits, options) to its body, so a verifier holding
    the logged events recomputes it from their bodies.
    """
    return hashlib.sha256(canonical_json(dict(_spec_bodies(spec, image_digest)))).digest()
