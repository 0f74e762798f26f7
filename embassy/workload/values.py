"""Parsers of the workload spec's values (ports, memory, CPUs, mounts, capabilities, ...),
one per key of :data:`~embassy.workload.schema.WORKLOAD_SCHEMA`, in :data:`CONVERT`. Each
takes the value's dotted path (or variable name) for its errors. Pure."""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

from embassy.validate import as_bool, as_int, as_list, as_str, fail, show_key, show_value
from embassy.workload.launch_policy import reserved_target_reason
from embassy.workload.schema import (
    MIN_MEMORY_BYTES,
    Mount,
    PortMapping,
    Protocol,
    normalize_capability,
    normalize_path,
)

# Every value is bounded before it is used: the config and the metadata file are fuzzed,
# and a parse error must be a ConfigError naming the key, never a traceback (an int() of a
# Unicode digit, a Decimal overflow, a 5,000-digit integer). Digits are ASCII only: str's
# isdigit() and regex \d accept other scripts, which int() then reads or refuses.
MAX_VALUE = 64 * 1024  # one command argument or environment value
MAX_ITEMS = 1024  # entries of command, env, ports
MAX_MOUNTS = 64
MAX_JSON_ENV = 1 << 20  # EMBASSY_WORKLOAD_COMMAND / _ENV as JSON
MAX_MEMORY_BYTES = 1 << 50
MAX_CPUS = 4096
MAX_PIDS = 1 << 22  # the kernel's PID_MAX_LIMIT
MAX_UID = 2**32 - 2
_UINT = re.compile(r"[0-9]{1,20}")


def _as_uint_text(where: str, value: Any) -> Any:
    """A string of ASCII digits as an int (other values as they are, for as_int)."""
    if isinstance(value, str):
        if not _UINT.fullmatch(value.strip()):
            raise fail(where, f"expected an integer (ASCII digits), got {show_value(value)}")
        return int(value.strip())
    return value


_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}")


def _as_name(where: str, value: Any) -> str:
    name = as_str(where, value)
    if not _NAME.fullmatch(name):
        raise fail(
            where,
            f"expected a container name ([a-zA-Z0-9][a-zA-Z0-9_.-]*), got {show_value(name)}",
        )
    return name


def _as_image(where: str, value: Any) -> str:
    image = as_str(where, value, limit=512)
    if any(c.isspace() for c in image):
        raise fail(where, f"an image reference has no whitespace, got {show_value(image)}")
    return image


def as_command(where: str, value: Any) -> tuple[str, ...]:
    items = as_list(where, value, MAX_ITEMS, "non-empty list of strings")
    if not items:
        raise fail(where, "expected a non-empty list of strings, got []")
    return tuple(
        as_str(f"{where}[{i}]", v, allow_empty=True, limit=MAX_VALUE, controls=True)
        for i, v in enumerate(items)
    )


_ENV_NAME = re.compile(r"[^=\x00]{1,1024}")


def as_env(where: str, value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise fail(where, f"expected a mapping of names to strings, got {type(value).__name__}")
    if len(value) > MAX_ITEMS:
        raise fail(where, f"more than {MAX_ITEMS} variables ({len(value)})")
    out: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not _ENV_NAME.fullmatch(key):
            raise fail(where, f"bad variable name {show_value(key)} (1-1024, no '=' or NUL)")
        name = as_str(where, key)
        if not isinstance(item, str):
            raise fail(f"{where}.{name}", f"expected a string (quote it), got {show_value(item)}")
        out[name] = as_str(
            f"{where}.{name}", item, allow_empty=True, limit=MAX_VALUE, controls=True
        )
    return out


def _as_port_number(where: str, value: Any, *, allow_zero: bool) -> int:
    port = as_int(where, _as_uint_text(where, value))
    if not (0 if allow_zero else 1) <= port <= 65535:
        raise fail(where, f"port {show_value(port)} out of range")
    return port


def _as_host_ip(where: str, value: Any) -> str:
    text = as_str(where, value, limit=64)
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise fail(where, f"expected an IP address, got {show_value(text)}") from None


def _as_protocol(where: str, value: Any) -> Protocol:
    if value == "tcp":
        return "tcp"
    if value == "udp":
        return "udp"
    raise fail(where, f"protocol must be tcp or udp, got {show_value(value)}")


_PORT_TEXT = re.compile(
    r"(?:(?P<ip>\[[0-9a-fA-F:.]+\]|[0-9.]+):)?(?P<host>[0-9]+):(?P<container>[0-9]+)"
    r"(?:/(?P<proto>[A-Za-z0-9]+))?"
)


def _as_port(where: str, value: Any) -> PortMapping:
    if isinstance(value, str):
        match = _PORT_TEXT.fullmatch(as_str(where, value, limit=128).strip())
        if match is None:
            raise fail(
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
            raise fail(f"{where}.{unknown[0]}", "unknown key")
        for required in ("container_port", "host_port"):
            if required not in value:
                raise fail(f"{where}.{required}", "missing")
        return PortMapping(
            container_port=_as_port_number(
                f"{where}.container_port", value["container_port"], allow_zero=False
            ),
            protocol=_as_protocol(f"{where}.protocol", value.get("protocol", "tcp")),
            host_ip=_as_host_ip(f"{where}.host_ip", value.get("host_ip", "0.0.0.0")),  # noqa: S104
            host_port=_as_port_number(f"{where}.host_port", value["host_port"], allow_zero=True),
        )
    raise fail(where, f"expected a port string or mapping, got {show_value(value)}")


def _check_ports(where: str, ports: list[PortMapping]) -> tuple[PortMapping, ...]:
    seen: set[tuple[str, int, str]] = set()
    for i, port in enumerate(ports):
        key = (port.host_ip, port.host_port, port.protocol)
        if port.host_port and key in seen:
            raise fail(
                f"{where}[{i}]",
                f"host {port.protocol} port {port.host_ip}:{port.host_port} is bound twice",
            )
        seen.add(key)
    return tuple(
        sorted(ports, key=lambda p: (p.container_port, p.protocol, p.host_ip, p.host_port))
    )


def _as_ports(where: str, value: Any) -> tuple[PortMapping, ...]:
    items = as_list(where, value, MAX_ITEMS, "list of ports")
    return _check_ports(where, [_as_port(f"{where}[{i}]", v) for i, v in enumerate(items)])


def ports_from_env(where: str, text: str) -> tuple[PortMapping, ...]:
    items = [] if not text.strip() else text.split(",")
    if len(items) > MAX_ITEMS:
        raise fail(where, f"more than {MAX_ITEMS} ports ({len(items)})")
    return _check_ports(where, [_as_port(f"{where}[{i}]", v) for i, v in enumerate(items)])


_UNITS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}
_MEMORY_TEXT = re.compile(r"(?P<n>[0-9]{1,20})\s*(?:(?P<unit>[kmgt])(?:i?b)?|b)?", re.IGNORECASE)


def _as_memory(where: str, value: Any) -> int:
    if isinstance(value, str):
        match = _MEMORY_TEXT.fullmatch(as_str(where, value, limit=64).strip())
        if match is None:
            raise fail(
                where, f"expected bytes or a size like '512m' or '2g', got {show_value(value)}"
            )
        size: int = int(match["n"]) * 1024 ** _UNITS[(match["unit"] or "").lower()]
    else:
        size = as_int(where, value)
    if size < MIN_MEMORY_BYTES:
        raise fail(where, f"memory limit {size} bytes is below Docker's minimum of 6 MiB")
    if size > MAX_MEMORY_BYTES:
        raise fail(where, f"memory limit {size} bytes is over {MAX_MEMORY_BYTES} (1 PiB)")
    return size


_CPUS_TEXT = re.compile(r"[0-9]+(?:\.[0-9]+)?")
_NOT_FINITE = ("nan", "inf", "infinity")


def _as_cpus(where: str, value: Any) -> int:
    shown = show_value(value)
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise fail(where, f"expected a number of CPUs like '1.5', got {shown}")
    if isinstance(value, float) and not math.isfinite(value):
        raise fail(where, f"expected a finite number of CPUs, got {shown}")
    if isinstance(value, str):
        text = as_str(where, value, allow_empty=True, limit=64).strip()
        if text.lower().lstrip("+-") in _NOT_FINITE:
            raise fail(where, f"expected a finite number of CPUs, got {shown}")
        if not _CPUS_TEXT.fullmatch(text):  # ASCII only: Decimal reads other scripts' digits
            raise fail(where, f"expected a number of CPUs like '1.5', got {shown}")
    elif isinstance(value, int) and abs(value) > MAX_CPUS:  # no str() of a huge int
        raise fail(where, f"CPU limit must be at most {MAX_CPUS}, got {shown}")
    else:
        text = str(value)  # a float in range may read '1e-05': Decimal takes it exactly
    cpus = Decimal(text)
    # Compared before any arithmetic: nothing can overflow, and the exponent says exactly
    # how many decimals there are (a product would round at 28 digits).
    if cpus > MAX_CPUS:
        raise fail(where, f"CPU limit must be at most {MAX_CPUS}, got {shown}")
    if cpus * 100 < 1:
        raise fail(where, f"CPU limit must be at least 0.01, got {shown}")
    exponent = cpus.normalize().as_tuple().exponent
    if isinstance(exponent, int) and exponent < -9:
        raise fail(where, f"expected a number of CPUs with at most 9 decimals, got {shown}")
    return int(cpus * 1_000_000_000)


def _as_pids(where: str, value: Any) -> int:
    pids = as_int(where, _as_uint_text(where, value))
    if pids < 1:
        raise fail(where, f"must be >= 1, got {pids}")
    if pids > MAX_PIDS:
        raise fail(where, f"must be <= {MAX_PIDS}, got {show_value(pids)}")
    return pids


def _as_mount(where: str, value: Any) -> Mount:
    if not isinstance(value, Mapping):
        raise fail(where, "expected a mapping with source, target and read_only")
    unknown = sorted(show_key(k) for k in set(value) - {"source", "target", "read_only"})
    if unknown:
        raise fail(f"{where}.{unknown[0]}", "unknown key")
    paths: dict[str, str] = {}
    for key in ("source", "target"):
        text = as_str(f"{where}.{key}", value.get(key))
        if not text.startswith("/"):
            raise fail(f"{where}.{key}", f"expected an absolute path, got {show_value(text)}")
        paths[key] = normalize_path(text)
    reason = reserved_target_reason(paths["target"])
    if reason:
        raise fail(f"{where}.target", reason)
    read_only = as_bool(f"{where}.read_only", value.get("read_only", True))
    return Mount(paths["source"], paths["target"], read_only)


def _as_mounts(where: str, value: Any) -> tuple[Mount, ...]:
    items = as_list(where, value, MAX_MOUNTS, "list of {source, target, read_only}")
    mounts = [_as_mount(f"{where}[{i}]", v) for i, v in enumerate(items)]
    targets = [m.target for m in mounts]
    for i, target in enumerate(targets):
        if target in targets[:i]:
            raise fail(f"{where}[{i}].target", f"{target} is mounted twice")
    return tuple(mounts)


def _as_network_mode(where: str, value: Any) -> str | None:
    return None if value is None else as_str(where, value, limit=256)


_CAP = re.compile(r"[A-Z][A-Z0-9_]*")


def _as_caps(where: str, value: Any) -> tuple[str, ...]:
    caps: set[str] = set()
    for i, item in enumerate(as_list(where, value, MAX_MOUNTS, "list of capability names")):
        cap = normalize_capability(as_str(f"{where}[{i}]", item, limit=64))
        if not _CAP.fullmatch(cap):
            raise fail(f"{where}[{i}]", f"not a capability name: {show_value(item)}")
        caps.add(cap)
    return tuple(sorted(caps))


def _as_user(where: str, value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(as_int(where, value, 0, MAX_UID))
    user = as_str(where, value, limit=256)
    if any(c.isspace() for c in user) or user.count(":") > 1:
        raise fail(where, f"expected a user name, uid or uid:gid, got {show_value(user)}")
    return user


_RUNTIME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}", re.ASCII)


def _as_runtime(where: str, value: Any) -> str | None:
    if value is None:
        return None
    runtime = as_str(where, value, limit=64)
    if not _RUNTIME.fullmatch(runtime):
        raise fail(where, f"expected a Docker runtime name, got {show_value(runtime)}")
    return runtime


CONVERT: Mapping[str, Callable[[str, Any], Any]] = {
    "name": _as_name,
    "image": _as_image,
    "command": as_command,
    "env": as_env,
    "ports": _as_ports,
    "memory": _as_memory,
    "cpus": _as_cpus,
    "pids": _as_pids,
    "mounts": _as_mounts,
    "network_mode": _as_network_mode,
    "privileged": as_bool,
    "cap_add": _as_caps,
    "user": _as_user,
    "runtime": _as_runtime,
}
