"""Fetch a model's weights key from the owner's key broker, through the embassy.

The embassy has no network, so the workload carries every message (docs/protocol.md,
"Weights-key release")::

    key = release_weights_key(EmbassyClient(), "https://broker.example:8443",
                              model_id="minilm-l6", key_id="k1", tenant="acme")
    model = load_encrypted(path, key, model_id="minilm-l6", key_id="k1", wipe_key=True)

1. ``POST {broker}/v1/nonce`` -> the broker's nonce;
2. ``POST /v1/weights/request`` to the embassy -> a release request (the key request and
   fresh evidence over it);
3. ``POST {broker}/v1/release`` with it -> a release (200) or a signed denial (403, or 400
   with the denial beside the error);
4. a release goes to the embassy (``POST /v1/weights/key``), which opens it for its own
   pending request, states it, and answers the key; a denial goes there too (it is stated,
   and the request is answered), then :class:`KeyDenied` is raised with the broker's reason.

Every message is bound end to end (the evidence to the broker's nonce and this embassy, the
wrapped key to the request, decision and policy), so this code only carries bytes: it checks
shapes, not signatures. Standard library only; no redirects are followed. Do it before the
first session: the embassy releases no weights key while the workload is sealed.
"""

from __future__ import annotations

import http.client
import json
import re
import ssl
import urllib.parse
from collections.abc import Mapping
from typing import Any

from workload_sdk.client import EmbassyClient
from workload_sdk.errors import EmbassyError
from workload_sdk.transport import UnixHTTPConnection

RELEASE_TYPE = "embassy-weights-release"
DENIAL_TYPE = "embassy-weights-denial"
MAX_BROKER_REPLY_BYTES = 1 << 20
_NONCE = re.compile(r"[0-9a-f]{64}")


class BrokerError(EmbassyError):
    """The key broker could not be reached, failed, or answered something unusable."""


class KeyDenied(BrokerError):
    """The broker denied the key; ``code`` (and ``reason``) is its reason code, e.g.
    ``image-not-allowed``; ``decision_id`` names its logged decision."""

    def __init__(
        self,
        message: str,
        *,
        code: str,
        status: int | None = None,
        decision_id: str | None = None,
        statement: bytes | None = None,
    ) -> None:
        super().__init__(message, code=code, status=status)
        self.reason = code
        self.decision_id = decision_id
        # The embassy's weights-key-denied statement (None if relaying the denial failed).
        self.statement = statement


def _encode(body: Mapping[str, Any]) -> bytes:
    return json.dumps(dict(body), sort_keys=True, separators=(",", ":")).encode("utf-8")


class _Broker:
    """JSON over HTTP(S) to one broker base URL, a fresh connection per request;
    ``unix:///path/broker.sock`` for a broker socket the operator mounted in."""

    def __init__(self, url: str, timeout: float, context: ssl.SSLContext | None) -> None:
        parts = urllib.parse.urlsplit(url)
        self._unix = parts.path if parts.scheme == "unix" and not parts.netloc else None
        if self._unix is None and (parts.scheme not in ("http", "https") or not parts.hostname):
            raise ValueError(
                f"the broker URL must be http(s)://host[:port][/path] or unix:///socket, not "
                f"{url!r}"
            )
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError("the broker URL takes no query, fragment or credentials")
        self._https = parts.scheme == "https"
        self._host = parts.hostname or "broker"
        self._port = parts.port
        self._base = "" if self._unix is not None else parts.path.rstrip("/")
        self._timeout = timeout
        self._context = context
        self.url = url

    def post(self, path: str, body: bytes) -> tuple[int, Any]:
        conn: http.client.HTTPConnection
        if self._unix is not None:
            conn = UnixHTTPConnection(self._unix, self._timeout, host="broker")
        elif self._https:
            conn = http.client.HTTPSConnection(
                self._host,
                self._port,
                timeout=self._timeout,
                context=self._context or ssl.create_default_context(),
            )
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
        target = self._base + path
        try:
            conn.request(
                "POST",
                target,
                body=body,
                headers={"Content-Type": "application/json", "Accept": "application/json"},
            )
            response = conn.getresponse()
            raw = response.read(MAX_BROKER_REPLY_BYTES + 1)
        except (OSError, http.client.HTTPException) as exc:
            raise BrokerError(
                f"no answer from the broker to POST {target}: {exc!r}", code="broker-unavailable"
            ) from exc
        finally:
            conn.close()
        if len(raw) > MAX_BROKER_REPLY_BYTES:
            raise BrokerError(
                f"the broker's answer to {target} is over {MAX_BROKER_REPLY_BYTES} bytes",
                code="broker-bad-response",
                status=response.status,
            )
        try:
            return response.status, json.loads(raw)
        except ValueError:
            return response.status, None


def _error_of(status: int, body: Any, what: str) -> BrokerError:
    code, message = f"broker-http-{status}", f"the broker answered {what} with HTTP {status}"
    error = body.get("error") if isinstance(body, Mapping) else None
    if isinstance(error, Mapping):
        if isinstance(error.get("code"), str) and error["code"]:
            code = error["code"]
        if isinstance(error.get("message"), str):
            message = f"{message}: {error['message']}"
    return BrokerError(message, code=code, status=status)


def _nonce(broker: _Broker) -> str:
    status, body = broker.post("/v1/nonce", b"{}")
    if status != 200:
        raise _error_of(status, body, "/v1/nonce")
    nonce = body.get("nonce") if isinstance(body, Mapping) else None
    if not isinstance(nonce, str) or not _NONCE.fullmatch(nonce):
        raise BrokerError(
            "the broker's /v1/nonce answer has no 32-byte lower-case hex 'nonce'",
            code="broker-bad-response",
            status=status,
        )
    return nonce


def _denied(
    client: EmbassyClient, denial: Mapping[str, Any], status: int, extra: str = ""
) -> KeyDenied:
    """Relay ``denial`` to the embassy (it states it), and the error to raise."""
    reason = denial.get("reason")
    decision = denial.get("decision_id")
    message = denial.get("message")
    code = reason if isinstance(reason, str) and reason else "broker-denied"
    statement = None
    note = None
    try:
        statement = client.weights_denied(denial)
    except EmbassyError as exc:
        note = f"relaying the denial to the embassy failed: {exc}"
    error = KeyDenied(
        f"the broker denied the key ({code})"
        + (f": {message}" if isinstance(message, str) and message else "")
        + extra,
        code=code,
        status=status,
        decision_id=decision if isinstance(decision, str) else None,
        statement=statement,
    )
    if note is not None:
        error.add_note(note)
    return error


def release_weights_key(
    client: EmbassyClient,
    broker_url: str,
    model_id: str,
    key_id: str,
    tenant: str,
    *,
    operation: str = "decrypt-for-load",
    timeout: float = 30.0,
    ssl_context: ssl.SSLContext | None = None,
) -> bytearray:
    """The model's weights key, released by the broker at ``broker_url`` to this embassy.

    Returns a 32-byte ``bytearray``: zero it once the model is loaded (the loader's
    ``wipe_key=True`` does). Raises :class:`KeyDenied` (with the broker's reason code)
    when the broker denies it, :class:`BrokerError` when the broker cannot be reached or
    answers nonsense, and the embassy's errors (``WeightsKeyRefused``, ``Unavailable``,
    ...) when the embassy refuses its part.
    """
    broker = _Broker(broker_url, timeout, ssl_context)
    nonce = _nonce(broker)
    release_request = client.weights_request(
        model_id=model_id, key_id=key_id, tenant=tenant, nonce=nonce, operation=operation
    )
    status, body = broker.post("/v1/release", _encode(release_request))
    answer = body if isinstance(body, Mapping) else {}
    kind = answer.get("type")
    if status == 200 and kind == RELEASE_TYPE:
        return client.weights_key(answer).key
    if kind == DENIAL_TYPE:
        raise _denied(client, answer, status)
    nested = answer.get("denial")
    if isinstance(nested, Mapping) and nested.get("type") == DENIAL_TYPE:
        # A request the broker could not parse, refused and logged as a denial.
        error = _error_of(status, answer, "/v1/release")
        raise _denied(client, nested, status, f" ({error.code}: {error.message})")
    if status == 200:
        raise BrokerError(
            "the broker answered /v1/release with neither a release nor a denial",
            code="broker-bad-response",
            status=status,
        )
    raise _error_of(status, body, "/v1/release")
