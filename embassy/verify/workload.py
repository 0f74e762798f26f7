"""The workload beside the embassy, as its launch events prove it, and the auditor's pins.

Before the workload starts, the embassy logs its launch inputs as signed events extended
into the embassy PCR, in this order, after the start event of its run: ``launch-image``
(name, image reference, image ``digest``: the image ID it is created from), ``launch-command``,
``launch-env`` (variable names and the SHA-256 of each value), ``launch-ports``,
``launch-limits``, ``launch-options``, ``launch-seal-policy`` and ``launch-separator``. The
*launch digest* is SHA-256 of the canonical JSON object mapping each of the first six event
types to its body, exactly as the daemon computes it for the container it creates
(``embassy.workload.spec.launch_config_digest``); the seal statements name it.

A digest is enough to pin a workload: the host need not publish its code, only the image
ID (``docker image inspect --format '{{.Id}}'``) and the launch configuration's digest,
which anyone holding the image and the config recomputes.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from embassy.errors import LogIntegrityError, WireFormatError, WorkloadMismatchError
from embassy.log.entry import EntryType, LogEntry
from embassy.log.event import Event
from embassy.log.verify_entry import authenticate_entry
from embassy.wire.codec import JsonObject, canonical_json, field, hex_decode

# The launch events whose bodies make the launch digest, then the two that close a launch.
SPEC_EVENTS = (
    EntryType.LAUNCH_IMAGE,
    EntryType.LAUNCH_COMMAND,
    EntryType.LAUNCH_ENV,
    EntryType.LAUNCH_PORTS,
    EntryType.LAUNCH_LIMITS,
    EntryType.LAUNCH_OPTIONS,
)
LAUNCH_EVENTS = (*SPEC_EVENTS, EntryType.LAUNCH_SEAL_POLICY, EntryType.LAUNCH_SEPARATOR)
# Every entry type extended into the embassy PCR: a start and the launches of a run.
EMBASSY_PCR_EVENTS = frozenset({EntryType.EMBASSY_START, *LAUNCH_EVENTS})


@dataclass(frozen=True, slots=True)
class Workload:
    """The workload an embassy run launched, from its authenticated launch events."""

    name: str
    image: str
    image_digest: str
    launch_digest: bytes
    seal_policy: Mapping[str, Any]
    first_seq: int
    last_seq: int

    def to_json(self) -> JsonObject:
        return {
            "name": self.name,
            "image": self.image,
            "image_digest": self.image_digest,
            "launch_digest": self.launch_digest.hex(),
            "seal_policy": dict(self.seal_policy),
            "launch_entries": [self.first_seq, self.last_seq],
        }


def launch_digest(bodies: Mapping[EntryType, Mapping[str, Any]]) -> bytes:
    """SHA-256 of the canonical JSON of the spec-derived launch events' bodies."""
    return hashlib.sha256(
        canonical_json({kind.value: dict(bodies[kind]) for kind in SPEC_EVENTS})
    ).digest()


def workload_from_entries(
    entries: tuple[LogEntry, ...], start_seq: int, signing_key: Ed25519PublicKey
) -> Workload | None:
    """The workload launched after the start event at ``start_seq``, or None if none was.

    ``entries`` are a verified segment's (chained, replayed to a quote); each launch event
    is authenticated here. The run's launch must be whole and in order, exactly once:
    anything else in the embassy PCR after the start event is refused.
    """
    launches = [e for e in entries if e.seq > start_seq and e.type in EMBASSY_PCR_EVENTS]
    if not launches:
        return None
    kinds = tuple(e.type for e in launches)
    if kinds != LAUNCH_EVENTS:
        raise LogIntegrityError(
            f"the launch events after start entry seq {start_seq} are "
            f"{', '.join(k.value for k in kinds)}; expected one whole launch "
            f"({', '.join(k.value for k in LAUNCH_EVENTS)})"
        )
    bodies: dict[EntryType, JsonObject] = {}
    for entry in launches:
        event = authenticate_entry(entry, signing_key)
        assert isinstance(event, Event)  # not a statement: its type is a launch event's
        bodies[entry.type] = event.body
    image = bodies[EntryType.LAUNCH_IMAGE]
    what = "launch-image event"
    return Workload(
        name=field(image, "name", str, what),
        image=field(image, "image", str, what),
        image_digest=field(image, "digest", str, what),
        launch_digest=launch_digest(bodies),
        seal_policy=bodies[EntryType.LAUNCH_SEAL_POLICY],
        first_seq=launches[0].seq,
        last_seq=launches[-1].seq,
    )


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def check_pins(
    workload: Workload | None,
    *,
    expected_image_digest: str | None,
    expected_launch_digest: bytes | None,
) -> list[str]:
    """Check the auditor's workload pins; return the checks that passed, or raise."""
    if expected_image_digest is None and expected_launch_digest is None:
        return []
    if workload is None:
        raise WorkloadMismatchError(
            "workload: this embassy run launched no workload, but one is pinned"
        )
    checks = []
    if expected_image_digest is not None:
        if not _same(workload.image_digest, expected_image_digest):
            raise WorkloadMismatchError(
                f"workload image digest is {workload.image_digest}, expected "
                f"{expected_image_digest}"
            )
        checks.append("workload-image")
    if expected_launch_digest is not None:
        if not hmac.compare_digest(workload.launch_digest, expected_launch_digest):
            raise WorkloadMismatchError(
                f"workload launch digest is {workload.launch_digest.hex()}, expected "
                f"{expected_launch_digest.hex()}"
            )
        checks.append("workload-launch")
    return checks


def check_statement_workload(claimed: object, workload: Workload | None, what: str) -> None:
    """A seal, unseal or abort statement's ``workload`` must be the identity's workload."""
    if workload is None:
        raise WorkloadMismatchError(
            f"the {what} statement names a workload, but the identity's run launched none"
        )
    if not isinstance(claimed, dict):
        raise WireFormatError(f"{what} statement.workload: expected an object")
    image = field(claimed, "image_digest", str, f"{what} statement.workload")
    launch = hex_decode(
        field(claimed, "launch_digest", str, f"{what} statement.workload"),
        f"{what} statement.workload.launch_digest",
        size=32,
    )
    if not _same(image, workload.image_digest):
        raise WorkloadMismatchError(
            f"{what} statement.workload.image_digest is {image}, but the identity's workload "
            f"is {workload.image_digest}: the result is from another workload"
        )
    if not hmac.compare_digest(launch, workload.launch_digest):
        raise WorkloadMismatchError(
            f"{what} statement.workload.launch_digest is {launch.hex()}, but the identity's "
            f"workload is {workload.launch_digest.hex()}: the result is from another workload"
        )


def workload_of_run(
    entries: tuple[LogEntry, ...], signing_key: Ed25519PublicKey
) -> Workload | None:
    """The workload launched by the run of the latest start event in ``entries``."""
    starts = [e.seq for e in entries if e.type is EntryType.EMBASSY_START]
    if not starts:
        raise LogIntegrityError("no start event: the segment does not show an embassy run")
    return workload_from_entries(entries, starts[-1], signing_key)
