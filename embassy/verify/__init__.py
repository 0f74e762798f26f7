"""The auditor's verifier: pure Python, no TPM, no root, no Docker, no yaml.

The stable API is :class:`Verifier` (``embassy.verify.api``) with a :class:`TrustPolicy`;
every method returns a frozen value describing what was proved, or raises a precise
:class:`embassy.errors.VerificationError` (or ``WireFormatError`` for unparsable input).
See docs/verifying.md.
"""

from embassy.verify.api import VerifiedStatement, Verifier
from embassy.verify.evidence import VerifiedEvidence
from embassy.verify.identity import VerifiedIdentity
from embassy.verify.logs import VerifiedLog
from embassy.verify.policy import TrustPolicy
from embassy.verify.result import VerifiedResult
from embassy.verify.window import StatementTime, TimeWindow
from embassy.verify.workload import Workload

__all__ = [
    "StatementTime",
    "TimeWindow",
    "TrustPolicy",
    "VerifiedEvidence",
    "VerifiedIdentity",
    "VerifiedLog",
    "VerifiedResult",
    "VerifiedStatement",
    "Verifier",
    "Workload",
]
