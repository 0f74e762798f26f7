"""What the embassy's refusals look like to a workload.

The embassy answers an error with ``{"error": {"code", "message"}}`` and an HTTP status
(``embassy.daemon.http``). :func:`error_from_response` turns that into one exception whose
class says what the workload should do, chosen by the code and, for a code this SDK does
not know, by the status::

    EmbassyError                 anything else (bad-request, policy-refused, ...)
    ├── PayloadRejected          the user's payload will not open: tell the user
    ├── SealFailed (NotSealed)   the embassy could not seal: do not touch the input
    ├── SessionError             the session is gone, not ours, or in the wrong state
    ├── WeightsKeyRefused        the embassy would not ask for or hand out a weights key
    └── Unavailable              no embassy answered, or it failed (5xx): retry later

Every instance carries the embassy's ``status`` (``None`` when no HTTP answer came),
``code`` and ``message``, so the reason reaches the user unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class EmbassyError(Exception):
    """A refusal or failure reported by (or on the way to) the embassy."""

    def __init__(
        self, message: str, *, code: str = "embassy-error", status: int | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status

    def __str__(self) -> str:
        where = "" if self.status is None else f" (HTTP {self.status})"
        return f"{self.code}{where}: {self.message}"

    def to_json(self) -> dict[str, str]:
        """The ``{"code", "message"}`` a workload can relay to its caller."""
        return {"code": self.code, "message": self.message}


class PayloadRejected(EmbassyError):
    """The payload envelope was refused: expired, replayed, not for this embassy, ..."""


class SealFailed(EmbassyError):
    """The embassy could not put the workload in the sealed state; nothing was unwrapped."""


NotSealed = SealFailed


class SessionError(EmbassyError):
    """The session is unknown, the token is wrong, or it was already closed or aborted."""


class Unavailable(EmbassyError):
    """The embassy could not be reached, or failed on its side (a 5xx)."""


class WeightsKeyRefused(EmbassyError):
    """A weights-key request or release the embassy refused: asked while sealed, a
    release for no pending request (unknown, expired, used), or one that is not for it
    (another model or key, another embassy's, changed on the way)."""


PAYLOAD_CODES = frozenset(
    {
        "payload-expired",
        "payload-replayed",
        "wrong-embassy",
        "payload-wrong-measurement",
        "payload-wrong-workload",
        "payload-unbound",
        "unsupported-suite",
        "bad-payload",
        "malformed",
        # An authority's instruction among the payload's actions, refused.
        "instruction-refused",
        "instruction-unsigned",
        "instruction-bad-signature",
        "instruction-expired",
        "instruction-replayed",
        "not-capability-owner",
    }
)
SEAL_CODES = frozenset({"seal-failed"})
WEIGHTS_CODES = frozenset(
    {
        "weights-workload-sealed",
        "weights-request-refused",
        "weights-request-unknown",
        "weights-request-expired",
        "weights-request-used",
        "weights-release-refused",
        "weights-release-mismatch",
        "weights-release-unwrap",
    }
)
SESSION_CODES = frozenset({"forbidden", "not-found", "conflict"})
# Known codes that say the request itself was wrong: not a session's fault.
GENERIC_CODES = frozenset(
    {"bad-request", "method-not-allowed", "payload-too-large", "policy-refused"}
)


_BY_CODE: dict[str, type[EmbassyError]] = {
    **dict.fromkeys(PAYLOAD_CODES, PayloadRejected),
    **dict.fromkeys(SEAL_CODES, SealFailed),
    **dict.fromkeys(SESSION_CODES, SessionError),
    **dict.fromkeys(WEIGHTS_CODES, WeightsKeyRefused),
    **dict.fromkeys(GENERIC_CODES, EmbassyError),
}


def error_class(code: str, status: int | None) -> type[EmbassyError]:
    """The exception class for ``code``; for an unknown code, the one ``status`` implies."""
    known = _BY_CODE.get(code)
    if known is not None:
        return known
    if status is None or status >= 500:
        return Unavailable
    if status in (403, 404, 409):
        return SessionError
    return EmbassyError


def error_from_response(status: int, body: Any) -> EmbassyError:
    """The exception for an error reply; tolerates a body that is not the embassy's shape."""
    code, message = f"http-{status}", "the embassy answered without an error body"
    error = body.get("error") if isinstance(body, Mapping) else None
    if isinstance(error, Mapping):
        if isinstance(error.get("code"), str) and error["code"]:
            code = error["code"]
        if isinstance(error.get("message"), str):
            message = error["message"]
    return error_class(code, status)(message, code=code, status=status)
