"""The launch events: the typed events logged (and so extended into the log PCR) before the
workload starts, and the launch configuration digest a verifier recomputes from them.
Environment *values* never appear in them, only their SHA-256. Pure."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from embassy.errors import ConfigError
from embassy.log.entry import EntryType
from embassy.wire.codec import canonical_json
from embassy.workload.schema import EVENT_VERSION, WorkloadSpec, normalize_capability

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
