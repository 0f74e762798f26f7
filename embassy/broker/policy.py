"""The broker's release policy: Rego, evaluated in-process by ``regopy`` (ADR 0012).

The policy is one Rego module and one JSON data document. The broker asks two questions
of package ``embassy.weights``::

    data.embassy.weights.allow         must be exactly ``true`` to release
    data.embassy.weights.deny_reason   optional: a reason code (``[a-z0-9-]``) for a denial

Deny by default, whatever goes wrong: an evaluation error (conflicting rules, a runtime
error), an undefined ``allow``, a non-boolean ``allow``, or an evaluation that outlives its
time budget all deny, each with its own reason (``policy-error``, ``policy-undefined``,
``policy-timeout``). An ``allow`` of ``true`` together with a ``deny_reason`` denies too: a
policy that names a reason has not made up its mind to release.

The policy's digest, which every decision names, is SHA-256 of
``b"embassy-broker-policy-v1\\0"``, the policy text's length (8 bytes, big-endian), the
policy text (UTF-8) and the canonical JSON of the data document (docs/protocol.md, "Key
broker"). The input handed to Rego is canonical JSON, so its digest is well defined too.
"""

from __future__ import annotations

import hashlib
import json
import queue
import re
import struct
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

from embassy.errors import ConfigError, WireFormatError
from embassy.wire.codec import JsonObject, canonical_json, parse_json_object

PACKAGE = "embassy.weights"
ALLOW_QUERY = f"data.{PACKAGE}.allow"
REASON_QUERY = f"data.{PACKAGE}.deny_reason"
# Bound to a variable: a bare query whose value is ``false`` reads as undefined in regopy.
_BOUND = "value"
DIGEST_PREFIX = b"embassy-broker-policy-v1\0"
MAX_POLICY_BYTES = 1 << 20
DEFAULT_TIMEOUT_S = 2.0
# What a policy's own deny_reason may look like (it goes into signed denials and the log).
_REASON = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")

REASON_POLICY_ERROR = "policy-error"
REASON_POLICY_UNDEFINED = "policy-undefined"
REASON_POLICY_TIMEOUT = "policy-timeout"
REASON_POLICY_DENIED = "policy-denied"  # allow is false and the policy named no reason


def policy_digest(text: str, data: Mapping[str, Any]) -> bytes:
    """SHA-256 naming exactly this policy text and data document."""
    raw = text.encode("utf-8")
    return hashlib.sha256(
        DIGEST_PREFIX + struct.pack(">Q", len(raw)) + raw + canonical_json(data)
    ).digest()


@dataclass(frozen=True, slots=True)
class PolicyOutcome:
    """The policy's answer: ``allow`` only if Rego said exactly ``true`` and no reason."""

    allow: bool
    reason: str | None
    message: str
    seconds: float


class _Undefined:
    pass


_UNDEFINED = _Undefined()


class _EvaluationError(Exception):
    pass


def _interpreter(text: str, data_json: str, name: str) -> Any:
    from regopy import Interpreter

    rego = Interpreter()
    rego.add_module(name, text)
    rego.add_data_json(data_json)
    return rego


def _query(rego: Any, query: str) -> object:
    """One query's single value, or ``_UNDEFINED``; raises ``_EvaluationError``.

    Only the output's string form is read: regopy's ``expressions()`` aborts the whole
    process (a C++ exception) on an undefined or failed output.
    """
    output = rego.query(f"{_BOUND} := {query}")
    if not output.ok():
        raise _EvaluationError(f"{query}: the evaluation failed")
    text = str(output)
    if text == "undefined":
        return _UNDEFINED
    try:
        value = json.loads(text)
    except ValueError:
        raise _EvaluationError(f"{query}: unreadable output") from None
    bindings = value.get("bindings") if isinstance(value, dict) else None
    if not isinstance(bindings, dict) or set(bindings) != {_BOUND}:
        raise _EvaluationError(f"{query}: expected one value")
    return bindings[_BOUND]


class RegoPolicy:
    """A compiled policy. Thread-safe: each evaluation borrows an interpreter of its own
    from a pool (regopy's interpreters hold their input, so they are not shared)."""

    def __init__(
        self,
        text: str,
        data: Mapping[str, Any],
        *,
        name: str = "policy.rego",
        timeout_s: float = DEFAULT_TIMEOUT_S,
        workers: int = 4,
    ) -> None:
        if len(text.encode("utf-8")) > MAX_POLICY_BYTES:
            raise ConfigError(f"{name}: over {MAX_POLICY_BYTES} bytes")
        try:
            self._data_json = canonical_json(data).decode("utf-8")
        except TypeError as exc:
            raise ConfigError(f"{name}: data document: {exc}") from None
        self._text = text
        self._name = name
        self._timeout = timeout_s
        self.sha256 = policy_digest(text, data)
        self._pool: queue.SimpleQueue[Any] = queue.SimpleQueue()
        try:
            first = _interpreter(text, self._data_json, name)
        except Exception as exc:  # regopy.RegoError: a module that does not compile
            raise ConfigError(f"{name}: the Rego module does not compile: {exc}") from None
        self._pool.put(first)
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rego")
        self._closed = threading.Event()

    @classmethod
    def from_files(
        cls, policy_path: str, data_path: str | None, *, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> RegoPolicy:
        try:
            with open(policy_path, encoding="utf-8") as f:
                text = f.read(MAX_POLICY_BYTES + 1)
            data: JsonObject = {}
            if data_path is not None:
                with open(data_path, "rb") as fb:
                    data = parse_json_object(
                        fb.read(MAX_POLICY_BYTES + 1), data_path, integers_only=True
                    )
        except OSError as exc:
            raise ConfigError(f"{exc.filename}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{policy_path}: not UTF-8") from None
        except WireFormatError as exc:
            raise ConfigError(f"{data_path}: {exc.message}") from None
        return cls(text, data, name=policy_path.rsplit("/", 1)[-1], timeout_s=timeout_s)

    def _borrow(self) -> Any:
        try:
            return self._pool.get_nowait()
        except queue.Empty:
            return _interpreter(self._text, self._data_json, self._name)

    def _run(self, input_json: str) -> tuple[object, object]:
        rego = self._borrow()
        rego.set_input_term(input_json)
        allow = _query(rego, ALLOW_QUERY)
        reason = _query(rego, REASON_QUERY)
        # Returned to the pool only after a whole, successful evaluation.
        self._pool.put(rego)
        return allow, reason

    def evaluate(self, policy_input: Mapping[str, Any]) -> PolicyOutcome:
        """The policy's decision on ``policy_input`` (canonical JSON: no floats)."""
        started = time.perf_counter()
        input_json = canonical_json(policy_input).decode("utf-8")
        try:
            future = self._executor.submit(self._run, input_json)
            allow, reason = future.result(timeout=self._timeout)
        except FutureTimeout:
            # The evaluation cannot be interrupted; its interpreter is abandoned with it.
            return PolicyOutcome(
                False,
                REASON_POLICY_TIMEOUT,
                f"the policy did not decide within {self._timeout} s",
                time.perf_counter() - started,
            )
        except _EvaluationError as exc:
            return PolicyOutcome(
                False, REASON_POLICY_ERROR, str(exc), time.perf_counter() - started
            )
        except Exception as exc:  # a RegoError from the engine itself
            return PolicyOutcome(
                False,
                REASON_POLICY_ERROR,
                f"the Rego engine failed: {type(exc).__name__}",
                time.perf_counter() - started,
            )
        return _outcome(allow, reason, time.perf_counter() - started)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _outcome(allow: object, reason: object, seconds: float) -> PolicyOutcome:
    if allow is _UNDEFINED:
        return PolicyOutcome(False, REASON_POLICY_UNDEFINED, f"{ALLOW_QUERY} is undefined", seconds)
    if not isinstance(allow, bool):
        return PolicyOutcome(
            False,
            REASON_POLICY_ERROR,
            f"{ALLOW_QUERY} is a {type(allow).__name__}, not a boolean",
            seconds,
        )
    if reason is not _UNDEFINED and reason is not None:
        if not isinstance(reason, str) or not _REASON.fullmatch(reason):
            return PolicyOutcome(
                False,
                REASON_POLICY_ERROR,
                f"{REASON_QUERY} is not a reason code ([a-z0-9-], at most 64)",
                seconds,
            )
        return PolicyOutcome(False, reason, f"the policy denied: {reason}", seconds)
    if allow is True:
        return PolicyOutcome(True, None, "the policy allowed the release", seconds)
    return PolicyOutcome(
        False, REASON_POLICY_DENIED, "the policy did not allow the release", seconds
    )
