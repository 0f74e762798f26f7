"""The workload spec's shape: every key of the ``workload:`` section once
(:data:`WORKLOAD_SCHEMA`, from which the parser, docs/config.md and the NixOS options derive),
the frozen objects it parses into, and where the embassy's own directories appear inside the
workload. Pure."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Literal

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


def normalize_capability(name: str) -> str:
    """'cap_net_admin', 'CAP_NET_ADMIN' and 'net_admin' are all 'NET_ADMIN'."""
    upper = name.strip().upper()
    return upper.removeprefix("CAP_")


def normalize_path(path: str) -> str:
    """Lexically normalize an absolute path ('//run/' and '/var/run/../run' are '/run')."""
    return posixpath.normpath("/" + path.lstrip("/"))
