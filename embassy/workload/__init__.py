"""The workload the embassy launches and owns.

``spec`` (pure) parses the ``workload:`` metadata, refuses seal-lifting configurations and
produces the launch events; ``docker_runtime`` (imports the Docker SDK) runs it. Importing
this package does not import Docker, so the verifier can use the pure parts.
"""

from __future__ import annotations

from embassy.workload.spec import (
    LAUNCH_EVENT_TYPES,
    Limits,
    Mount,
    PortMapping,
    WorkloadSpec,
    check_launch_policy,
    launch_config_digest,
    launch_events,
    parse_workload,
)

__all__ = [
    "LAUNCH_EVENT_TYPES",
    "Limits",
    "Mount",
    "PortMapping",
    "WorkloadSpec",
    "check_launch_policy",
    "launch_config_digest",
    "launch_events",
    "parse_workload",
]
