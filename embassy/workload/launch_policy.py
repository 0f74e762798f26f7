"""The launch policy: refuse (:class:`~embassy.errors.PolicyError`) anything that could lift
the seal (see DESIGN.md: host network, privileged, NET_ADMIN, the Docker socket) and any
override the image's ``org.embassy.allow-override`` label does not allow. Pure."""

from __future__ import annotations

from collections.abc import Mapping

from embassy.errors import PolicyError, WireFormatError
from embassy.workload.schema import (
    OVERRIDABLE,
    OVERRIDE_LABEL,
    RESERVED_TARGETS,
    WorkloadSpec,
    normalize_capability,
    normalize_path,
)

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


def _is_under(path: str, root: str) -> bool:
    return root in (path, "/") or path.startswith(root + "/")


def reserved_target_reason(target: str) -> str | None:
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
    path = normalize_path(source)
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
        reason = mount_source_refusal(mount.source) or reserved_target_reason(
            normalize_path(mount.target)
        )
        if reason:
            raise PolicyError(reason)
    allowed = allowed_overrides(image_labels)
    for what in _overrides(spec, defaults):
        if what not in allowed:
            raise PolicyError(
                f"the image does not allow overriding its {what} (label {OVERRIDE_LABEL})"
            )
