"""The workload the embassy launches: its spec, its launch policy and its launch events.

Pure: no Docker, no I/O. ``docker_runtime`` turns a :class:`WorkloadSpec` into containers.
This module is the one import for their users; the parts live beside it:

- :mod:`~embassy.workload.schema`: every key once (``WORKLOAD_SCHEMA``) and the frozen
  objects a spec is (:class:`WorkloadSpec`, :class:`PortMapping`, :class:`Mount`, ...).
- :mod:`~embassy.workload.parse` (with :mod:`~embassy.workload.values`, one parser per key):
  the spec from its three layers, the ``workload:`` section of the YAML config, the runtime
  metadata file named by ``workload_metadata`` and ``EMBASSY_WORKLOAD_*`` variables, each
  overriding the one before; unknown keys and bad values are refused with the key's dotted
  path (``config: workload.ports[1]: ...``) or the variable's name.
- :mod:`~embassy.workload.launch_policy`: :func:`check_launch_policy` refuses anything that
  could lift the seal (see DESIGN.md: host network, privileged, NET_ADMIN, the Docker
  socket) and any override the image does not allow.
- :mod:`~embassy.workload.launch_events`: :func:`launch_events` are the typed events logged
  (and so extended into the log PCR) before the workload starts; environment *values* never
  appear in them, only their SHA-256.
"""

from __future__ import annotations

from embassy.workload.launch_events import (
    LAUNCH_EVENT_TYPES,
    launch_config_digest,
    launch_events,
)
from embassy.workload.launch_policy import (
    ALLOWED_CAPS,
    SEAL_LIFTING_CAPS,
    allowed_overrides,
    check_launch_policy,
    mount_source_refusal,
)
from embassy.workload.parse import parse_workload
from embassy.workload.schema import (
    ACTIVATIONS_TARGET,
    ENV_PREFIX,
    OVERRIDE_LABEL,
    RESERVED_TARGETS,
    SOCKET_TARGET,
    WORKLOAD_SCHEMA,
    Limits,
    Mount,
    PortMapping,
    WorkloadKey,
    WorkloadSpec,
    normalize_capability,
)

__all__ = [
    "ACTIVATIONS_TARGET",
    "ALLOWED_CAPS",
    "ENV_PREFIX",
    "LAUNCH_EVENT_TYPES",
    "OVERRIDE_LABEL",
    "RESERVED_TARGETS",
    "SEAL_LIFTING_CAPS",
    "SOCKET_TARGET",
    "WORKLOAD_SCHEMA",
    "Limits",
    "Mount",
    "PortMapping",
    "WorkloadKey",
    "WorkloadSpec",
    "allowed_overrides",
    "check_launch_policy",
    "launch_config_digest",
    "launch_events",
    "mount_source_refusal",
    "normalize_capability",
    "parse_workload",
]
