"""`embassy audit`: a self-contained HTML report of a verified log.

Verification comes first and is the embassy's own (:class:`embassy.verify.Verifier`): a
log that does not verify raises before anything is built. The report model
(:mod:`embassy.audit.model`) is made only from the verified values, the page
(:mod:`embassy.audit.render`, :mod:`embassy.audit.charts`) only from the model. Like the
verifier, this package needs no TPM, root, Docker or network (a unit test checks its
imports).
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from embassy.audit.model import Report, build_report
from embassy.audit.readings import OpenedReadings, open_log_readings
from embassy.audit.render import render_html
from embassy.verify.api import Verifier
from embassy.verify.evidence import VerifiedEvidence
from embassy.verify.identity import VerifiedIdentity
from embassy.verify.logs import VerifiedLog

__all__ = [
    "OpenedReadings",
    "Report",
    "audit_report",
    "build_report",
    "open_log_readings",
    "render_html",
]


def audit_report(
    verifier: Verifier,
    identity: VerifiedIdentity,
    segments: Sequence[bytes],
    *,
    complete_with: VerifiedEvidence | None = None,
    authority_key: Ed25519PrivateKey | None = None,
    reading_files: Sequence[tuple[str, bytes]] | None = None,
) -> tuple[VerifiedLog, Report]:
    """Verify ``segments`` (raising why not), then build the report of what they proved;
    with ``authority_key``, the authority's meter readings in them are opened."""
    log = verifier.log(identity, *segments, complete_with=complete_with)
    opened = OpenedReadings((), ())
    if authority_key is not None:
        opened = open_log_readings(identity, log, authority_key, reading_files)
    return log, build_report(identity, log, opened.readings, opened.notes)
