"""The workload's side of the socket API (docs/protocol.md §3).

A workload receives, from its user, a payload envelope and an encrypted input stream. Only
the embassy can open the envelope, and it does so only after sealing the workload::

    client = EmbassyClient()
    with client.open(envelope) as session:        # sealed from here on
        for chunk in session.decrypt(stream):     # authenticated plaintext, chunk by chunk
            ...
        result = session.finish(output)           # unseals, certifying SHA-256(output)
    reply = {"output": ..., **result.to_json()}   # what the user verifies

Leaving the ``with`` block without :meth:`Session.finish` (an exception, or a plain return)
closes the session with ``output_sha256: null``: the seal is lifted and nothing is
certified. The input key is zeroed in the session object when the session ends (best
effort: Python may hold other copies, e.g. in the decryptor while it runs).

Only the standard library is needed here; :meth:`Session.decrypt` loads
``workload_sdk.stream`` (and so ``cryptography``) on first use. Each request uses its own
connection, closed after the answer; a busy embassy (full listen backlog) is waited for up
to the client's timeout (``workload_sdk.transport``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import http.client
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    from workload_sdk.activations import ActivationWriter
from workload_sdk.errors import (
    EmbassyError,
    PayloadRejected,
    SessionError,
    Unavailable,
    error_from_response,
)
from workload_sdk.transport import UnixHTTPConnection

DEFAULT_SOCKET = "/run/embassy/embassy.sock"
# Where the embassy mounts the shared activation directory into the workload.
DEFAULT_ACTIVATION_DIR = "/var/lib/embassy/activations"
KEY_SIZE = 32
DIGEST_SIZE = 32
PAYLOAD_ID_SIZE = 16
MAX_REPLY_BYTES = 16 * 1024 * 1024


def _bad_reply(what: str) -> EmbassyError:
    return EmbassyError(f"the embassy's reply is not usable: {what}", code="bad-response")


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise _bad_reply(f"{what} is not a string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise _bad_reply(f"{what} is not base64") from None


def _payload_id(envelope: Mapping[str, Any]) -> bytes:
    """The envelope's payload id: the stream must carry the same one."""
    if not isinstance(envelope, Mapping):
        raise PayloadRejected("the payload envelope is not a JSON object", code="malformed")
    text = envelope.get("payload_id")
    try:
        payload_id = bytes.fromhex(text) if isinstance(text, str) else None
    except ValueError:
        payload_id = None
    if payload_id is None:
        raise PayloadRejected("the payload envelope has no hex 'payload_id'", code="malformed")
    if len(payload_id) != PAYLOAD_ID_SIZE:
        raise PayloadRejected(
            f"payload_id must be {PAYLOAD_ID_SIZE} bytes, got {len(payload_id)}", code="malformed"
        )
    return payload_id


@dataclass(frozen=True, slots=True)
class Result:
    """What the workload returns to its user next to the output bytes."""

    seal_statement: bytes
    unseal_statement: bytes
    output_sha256: bytes
    log: dict[str, Any] | None = None  # a log segment from the seal to after the unseal

    def to_json(self) -> dict[str, str]:
        return {
            "seal_statement": base64.b64encode(self.seal_statement).decode("ascii"),
            "unseal_statement": base64.b64encode(self.unseal_statement).decode("ascii"),
            "output_sha256": self.output_sha256.hex(),
        }

    def bundle(self, output: bytes) -> dict[str, Any]:
        """The result bundle a user checks with ``embassy verify result`` (protocol.md §4)."""
        if hashlib.sha256(output).digest() != self.output_sha256:
            raise ValueError("this is not the output the session certified")
        return {
            "v": 1,
            "type": "embassy-result",
            "output": base64.b64encode(output).decode("ascii"),
            "seal_statement": base64.b64encode(self.seal_statement).decode("ascii"),
            "unseal_statement": base64.b64encode(self.unseal_statement).decode("ascii"),
            "log": self.log,
        }


@dataclass(slots=True)
class WeightsKey:
    """A model's weights key as the embassy released it, and its weights-key-released
    statement. ``key`` is a bytearray so it can be zeroed (:meth:`wipe`); best effort:
    the JSON reply it came in, and its base64 text, are freed but not overwritten."""

    key: bytearray
    statement: bytes

    def wipe(self) -> None:
        self.key[:] = bytes(len(self.key))

    def __repr__(self) -> str:
        return f"WeightsKey(key=<{len(self.key)} bytes>, statement=<{len(self.statement)} bytes>)"


def _log_seq(statement: bytes) -> int:
    """The log position a DSSE-wrapped embassy statement was signed for."""
    payload = json.loads(base64.b64decode(json.loads(statement)["payload"]))
    return int(payload["predicate"]["header"]["log"]["seq"])


class EmbassyClient:
    """The embassy's socket API, as a workload sees it (inside its container)."""

    def __init__(self, socket_path: str = DEFAULT_SOCKET, timeout: float = 30.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"EmbassyClient(socket_path={self.socket_path!r}, timeout={self.timeout!r})"

    def health(self) -> dict[str, Any]:
        """``GET /v1/health``: liveness, TPM mode, log head."""
        return self.request("GET", "/v1/health")

    def open(
        self,
        envelope: Mapping[str, Any],
        deadline_seconds: int = 300,
        *,
        actions: bytes | None = None,
    ) -> Session:
        """Seal the workload and unwrap the user's payload: ``POST /v1/sessions``.

        ``actions`` is the opaque blob the user sealed under the payload's action key
        (authorities' instructions); relay it exactly as received. Meter readings the
        instructions asked for come back in :attr:`Session.readings`.

        Raises :class:`PayloadRejected` if the embassy refuses the envelope (expired,
        replayed, for another embassy, ...), :class:`SealFailed` if it could not seal,
        :class:`Unavailable` if it did not answer. If the request went out but no answer
        came back, a session may be open on the embassy's side; its deadline aborts it.
        """
        payload_id = _payload_id(envelope)
        if (
            isinstance(deadline_seconds, bool)
            or not isinstance(deadline_seconds, int)
            or deadline_seconds <= 0
        ):
            raise ValueError(f"deadline_seconds must be a positive int, got {deadline_seconds!r}")
        body: dict[str, Any] = {"payload": dict(envelope), "deadline_seconds": deadline_seconds}
        if actions is not None:
            body["actions"] = base64.b64encode(actions).decode("ascii")
        reply = self.request("POST", "/v1/sessions", body)
        return Session._from_reply(self, reply, payload_id)

    def weights_request(
        self,
        *,
        model_id: str,
        key_id: str,
        tenant: str,
        nonce: str,
        operation: str = "decrypt-for-load",
    ) -> dict[str, Any]:
        """Ask for a model's weights key: ``POST /v1/weights/request``.

        ``nonce`` is the key broker's (hex, from its ``/v1/nonce``). Returns the release
        request to send to the broker as it is: the embassy's key request with fresh
        evidence over it. The embassy keeps it pending for a short while (two minutes by
        default). Not while a session is open (``WeightsKeyRefused``
        ``weights-workload-sealed``): load the model before the first session.
        """
        body = {
            "model_id": model_id,
            "key_id": key_id,
            "tenant": tenant,
            "operation": operation,
            "nonce": nonce,
        }
        return self.request("POST", "/v1/weights/request", body)

    def weights_key(self, release: Mapping[str, Any]) -> WeightsKey:
        """Hand the broker's release to the embassy: ``POST /v1/weights/key``.

        The embassy opens it only for its own pending request, once, and states it
        (weights-key-released) before answering. Raises ``WeightsKeyRefused`` if the release
        is not for it (unknown, expired or used request, changed, another embassy's).
        Wipe the key (:meth:`WeightsKey.wipe`, or the loader's ``wipe_key``) once the model
        is loaded.
        """
        reply = self.request("POST", "/v1/weights/key", {"release": dict(release)})
        key = bytearray(_b64(reply.get("key"), "key"))
        if len(key) != KEY_SIZE:
            raise _bad_reply(f"key is {len(key)} bytes, not {KEY_SIZE}")
        return WeightsKey(key, _b64(reply.get("statement"), "statement"))

    def weights_denied(self, denial: Mapping[str, Any]) -> bytes:
        """Relay the broker's denial to the embassy, which states it (weights-key-denied)
        and takes the request; returns the statement (DSSE envelope bytes)."""
        reply = self.request("POST", "/v1/weights/key", {"denial": dict(denial)})
        return _b64(reply.get("statement"), "statement")

    def request(
        self, method: str, path: str, body: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """One JSON request on a fresh connection; an error reply raises its exception."""
        data = None
        headers = {"Accept": "application/json"}
        if body is not None:
            data = json.dumps(dict(body), sort_keys=True, separators=(",", ":")).encode("utf-8")
            headers["Content-Type"] = "application/json"
        conn = UnixHTTPConnection(self.socket_path, self.timeout)
        try:
            try:
                conn.connect()
            except OSError as exc:
                raise Unavailable(
                    f"cannot connect to the embassy at {self.socket_path}: {exc}",
                    code="unavailable",
                ) from exc
            try:
                conn.request(method, path, body=data, headers=headers)
                response = conn.getresponse()
                raw = response.read(MAX_REPLY_BYTES + 1)
            except (OSError, http.client.HTTPException) as exc:
                raise Unavailable(
                    f"no answer from the embassy to {method} {path}: {exc!r}", code="no-answer"
                ) from exc
        finally:
            conn.close()
        status = response.status
        parsed: Any = None
        if len(raw) <= MAX_REPLY_BYTES:
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = None
        if status >= 400:
            raise error_from_response(status, parsed)
        if not isinstance(parsed, dict):
            raise _bad_reply(f"{method} {path} answered {status} without a JSON object")
        return parsed


class Session:
    """An open session: the workload is sealed until :meth:`finish` or :meth:`close`."""

    __slots__ = (
        "_client",
        "_closed",
        "_key",
        "_key_live",
        "_token",
        "deadline_unix",
        "payload_id",
        "readings",
        "seal_statement",
        "session_id",
    )

    def __init__(
        self,
        client: EmbassyClient,
        *,
        session_id: str,
        token: str,
        input_key: bytes,
        seal_statement: bytes,
        deadline_unix: int,
        payload_id: bytes,
        readings: tuple[bytes, ...] = (),
    ) -> None:
        self._client = client
        self._token = token
        self._key = bytearray(input_key)
        self._key_live = True
        self._closed = False
        self.session_id = session_id
        self.seal_statement = seal_statement
        self.deadline_unix = deadline_unix
        self.payload_id = payload_id
        self.readings = readings

    @classmethod
    def _from_reply(
        cls, client: EmbassyClient, reply: Mapping[str, Any], payload_id: bytes
    ) -> Session:
        session_id, token = reply.get("session"), reply.get("token")
        if not isinstance(session_id, str) or not isinstance(token, str):
            raise _bad_reply("no session or token")
        try:
            deadline = reply.get("deadline_unix")
            if isinstance(deadline, bool) or not isinstance(deadline, int):
                raise _bad_reply("deadline_unix is not an integer")
            key = _b64(reply.get("input_key"), "input_key")
            if len(key) != KEY_SIZE:
                raise _bad_reply(f"input_key is {len(key)} bytes, not {KEY_SIZE}")
            statement = _b64(reply.get("statement"), "statement")
            raw_readings = reply.get("readings", [])
            if not isinstance(raw_readings, list):
                raise _bad_reply("readings is not a list")
            readings = tuple(_b64(r, "readings[]") for r in raw_readings)
        except EmbassyError as exc:
            # The session is open on the embassy's side: end it rather than wait for its
            # deadline, certifying nothing.
            try:
                client.request(
                    "POST",
                    "/v1/sessions/close",
                    {"session": session_id, "token": token, "output_sha256": None},
                )
            except EmbassyError as close_error:
                exc.add_note(f"closing session {session_id} also failed: {close_error}")
            raise
        return cls(
            client,
            session_id=session_id,
            token=token,
            input_key=key,
            seal_statement=statement,
            deadline_unix=deadline,
            payload_id=payload_id,
            readings=readings,
        )

    def activations(self, directory: str = DEFAULT_ACTIVATION_DIR) -> ActivationWriter:
        """A writer of this session's activation files into the shared directory.

        Write them before :meth:`finish`: closing the session makes the embassy handle
        every file it has, and files for a closed session are rejected.
        """
        from workload_sdk.activations import ActivationWriter  # numpy only when used

        return ActivationWriter(Path(directory), bytes.fromhex(self.session_id))

    def __repr__(self) -> str:
        return (
            f"Session(session_id={self.session_id!r}, deadline_unix={self.deadline_unix}, "
            f"payload_id={self.payload_id.hex()!r}, closed={self._closed})"
        )

    __str__ = __repr__

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if not self._closed:
                try:
                    self.close()
                except EmbassyError as close_error:
                    if exc is None:
                        raise
                    exc.add_note(f"closing session {self.session_id} also failed: {close_error}")
        finally:
            self._wipe()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def input_key(self) -> bytes:
        """The 32-byte input key; gone once the session is finishing or closed."""
        if not self._key_live:
            raise SessionError(
                f"session {self.session_id} has ended: its input key was wiped",
                code="session-ended",
            )
        return bytes(self._key)

    def decrypt(self, src: BinaryIO) -> Iterator[bytes]:
        """Decrypt the user's stream from ``src``, chunk by chunk (protocol.md §1).

        Each chunk is authenticated before it is yielded; a truncated, reordered or altered
        stream, or one for another payload, raises ``workload_sdk.stream.StreamError``.
        """
        from workload_sdk.stream import decrypt_stream

        return decrypt_stream(self.input_key, src, expected_payload_id=self.payload_id)

    def finish(self, output: bytes | None = None, *, output_sha256: bytes | None = None) -> Result:
        """Close the session, certifying SHA-256(``output``) (or the given digest).

        The input key is wiped first: the input is done with once the output exists.
        """
        if (output is None) == (output_sha256 is None):
            raise ValueError("give exactly one of the output and its SHA-256 (output_sha256=)")
        digest = hashlib.sha256(output).digest() if output is not None else output_sha256
        assert digest is not None
        if len(digest) != DIGEST_SIZE:
            raise ValueError(f"output_sha256 must be {DIGEST_SIZE} bytes, got {len(digest)}")
        self._ensure_open()
        self._wipe()
        log_from = _log_seq(self.seal_statement)
        reply = self._close_reply(bytes(digest), log_from)
        unseal = _b64(reply.get("statement"), "statement")
        segment = reply.get("segment")
        if segment is None:  # an embassy that answers the close alone
            segment = self._client.request("GET", f"/v1/log?from={log_from}").get("segment")
        return Result(self.seal_statement, unseal, bytes(digest), segment)

    def close(self) -> bytes | None:
        """Close without certifying any output (``output_sha256: null``).

        The seal is lifted; the unseal statement (returned) says nothing was produced.
        Returns ``None`` if the session was already closed.
        """
        if self._closed:
            return None
        self._wipe()
        return self._close(None)

    def _ensure_open(self) -> None:
        if self._closed:
            raise SessionError(f"session {self.session_id} is already closed", code="closed")

    def _wipe(self) -> None:
        self._key_live = False
        self._key[:] = bytes(len(self._key))

    def _close(self, digest: bytes | None) -> bytes:
        return _b64(self._close_reply(digest).get("statement"), "statement")

    def _close_reply(self, digest: bytes | None, log_from: int | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "session": self.session_id,
            "token": self._token,
            "output_sha256": None if digest is None else digest.hex(),
        }
        if log_from is not None:
            body["log_from"] = log_from  # the result's log segment comes with the answer
        reply = self._client.request("POST", "/v1/sessions/close", body)
        self._closed = True
        return reply
