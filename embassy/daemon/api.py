"""Routes of the socket API: parse a request into typed arguments, call the service.

Routes (all JSON):

- ``GET  /v1/health``: liveness, TPM mode, log head.
- ``GET  /v1/identity``: the identity document.
- ``GET  /v1/evidence?nonce=<hex, 16-64 bytes>``: a log segment closed by a fresh quote
  whose qualifying data is exactly the caller's nonce.
- ``GET  /v1/log?from=<seq>``: the current boot's log from ``seq`` (or the checkpoint just
  before it), closed by a new checkpoint.
- ``POST /v1/attestation/activate-credential``: ``{"credential_blob", "encrypted_secret"}``
  (base64); returns ``{"secret"}``, proving the AK lives in the TPM holding the EK.
- ``POST /v1/attestation/ak-certificate``: ``{"ak_certificates": [<b64 DER>, ...]}``, the
  AK's certificate chain (leaf first) from a registrar or a vTPM; checked against the AK
  and served in the identity document from then on. Not from the workload's processes.
- ``GET  /metrics``: Prometheus' text format (``text/plain; version=0.0.4``), for the host
  only: not the workload's processes, not a job's (docs/operations.md).

Session routes answer only the workload's own processes (the peer's credentials, read from
the socket, name a process in the workload container's cgroup): anything else gets 403.

- ``POST /v1/sessions``: ``{"deadline_seconds", "payload"?, "actions"?}``; seals the
  workload, then returns ``{"session", "token", "deadline_unix", "statement"}`` (the seal
  statement, base64), with a payload its ``input_key``, and with read instructions among
  the actions their ``readings`` (meter-reading statements, base64).
- ``POST /v1/sessions/close``: ``{"session", "token", "output_sha256"|null, "log_from"?}``;
  returns ``{"statement"}`` (the unseal statement, base64), and with ``log_from`` the
  ``segment`` from that position on (as ``GET /v1/log`` would: one round trip less for the
  result bundle); unseals after the last open session.
- ``GET  /v1/seal``: the seal's state, read from the kernel: the gate, the link, the layer-3
  rules, the workload's namespace, any quarantine, and whether a key release would pass now.

Job routes (docs/adr/0014-jobs.md): ``POST /v1/jobs`` from the host only (not the workload,
not a job); the ``self`` routes from a job container's own processes only:

- ``POST /v1/jobs``: ``{"payload": <envelope with reply_key>, "input": "<b64 ciphertext>"}``
  returns ``{"job", "state", "deadline_unix"}`` (201).
- ``POST /v1/jobs/self/key``: waits (10 s) for a job; ``{"assigned": false}`` or, once,
  ``{"assigned": true, "job", "input_key", "result_key", "statement"}`` (job-started).
- ``POST /v1/jobs/self/commit``: ``{"output_sha256"}`` of the result in its spool.
- ``GET  /v1/jobs/<id>?wait=<s>``: ``{"job", "state", "result"?, "error"?}``.

Weights-key routes (docs/protocol.md §11) answer only the workload's own processes too;
a release or denial is taken only while the workload is not sealed:

- ``POST /v1/weights/request``: ``{"model_id", "key_id", "tenant", "operation", "nonce"}``
  (the broker's 32-byte nonce, hex); returns the release request for the broker.
- ``POST /v1/weights/key``: ``{"release": <the broker's release>}`` returns ``{"key",
  "statement"}`` (weights-key-released); ``{"denial": <the broker's denial>}`` returns
  ``{"reason", "statement"}`` (weights-key-denied).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Protocol

from embassy.daemon.http import Request, Response, ascii_decimal
from embassy.daemon.http_server import Peer
from embassy.errors import MethodNotAllowedError, NotFoundError, RequestError, WireFormatError
from embassy.weights.release import (
    NONCE_LEN,
    Denial,
    Release,
    parse_denial,
    parse_release,
)
from embassy.wire.codec import (
    b64_list,
    b64decode,
    b64encode,
    canonical_json,
    field,
    hex_decode,
    only_fields,
    parse_json_object,
)

MIN_NONCE, MAX_NONCE = 16, 64
JOB_PREFIX = "/v1/jobs/"
MAX_JOB_WAIT = 60
_JOB_ID = re.compile(r"[0-9a-f]{32}")
# Hex as the nonce is written: pairs of ASCII hex digits and nothing else (bytes.fromhex
# would also take spaces and newlines).
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})+")


class Service(Protocol):
    def health(self) -> dict[str, Any]: ...
    def identity_document(self) -> dict[str, Any]: ...
    def evidence(self, nonce: bytes) -> dict[str, Any]: ...
    def log_segment(self, from_seq: int) -> dict[str, Any]: ...
    def activate_credential(self, blob: bytes, secret: bytes) -> bytes: ...
    def install_ak_chain(self, chain: list[bytes], peer: Peer | None) -> dict[str, Any]: ...
    def open_session(
        self,
        deadline_seconds: int,
        payload: dict[str, Any] | None = None,
        actions: bytes | None = None,
    ) -> dict[str, Any]: ...
    def close_session(
        self,
        session: bytes,
        token: bytes,
        output_sha256: bytes | None,
        log_from: int | None = None,
    ) -> dict[str, Any]: ...
    def seal_status(self) -> dict[str, Any]: ...
    def authorize_session(self, peer: Peer | None) -> None: ...
    def weights_request(
        self,
        peer: Peer | None,
        *,
        model_id: str,
        key_id: str,
        tenant: str,
        operation: str,
        nonce: bytes,
    ) -> dict[str, Any]: ...
    def weights_key(self, peer: Peer | None, release: Release) -> dict[str, Any]: ...
    def weights_denied(self, peer: Peer | None, denial: Denial) -> dict[str, Any]: ...
    def submit_job(
        self, peer: Peer | None, payload: dict[str, Any], ciphertext: bytes
    ) -> dict[str, Any]: ...
    def job_keys(self, peer: Peer | None) -> dict[str, Any]: ...
    def job_commit(
        self, peer: Peer | None, output_sha256: bytes | None, problem: str
    ) -> dict[str, Any]: ...
    def job_status(self, job_id: bytes, wait_seconds: float) -> dict[str, Any]: ...
    def metrics_text(self, peer: Peer | None) -> tuple[str, bytes]: ...


def _one(request: Request, name: str) -> str:
    values = request.query.get(name)
    if not values:
        raise RequestError(f"missing query parameter {name!r}")
    if len(values) > 1:
        raise RequestError(f"query parameter {name!r} given more than once")
    return values[0]


def _nonce(request: Request) -> bytes:
    text = _one(request, "nonce")
    if len(text) > 2 * MAX_NONCE + 2 or not _HEX.fullmatch(text):
        raise RequestError(f"nonce must be {MIN_NONCE} to {MAX_NONCE} bytes of hex")
    nonce = bytes.fromhex(text)
    if not MIN_NONCE <= len(nonce) <= MAX_NONCE:
        raise RequestError(f"nonce must be {MIN_NONCE} to {MAX_NONCE} bytes, got {len(nonce)}")
    return nonce


def _from_seq(request: Request) -> int:
    if "from" not in request.query:
        return 0
    seq = ascii_decimal(_one(request, "from"))
    if seq is None:
        raise RequestError("'from' must be a non-negative integer of at most 18 ASCII digits")
    return seq


def _check_credential_shape(blob: bytes, secret: bytes) -> None:
    """Refuse what cannot be a MakeCredential output before it reaches the TPM.

    ``blob`` is TPM2B_DIGEST(integrity HMAC) || encrypted identity; ``secret`` is an
    RSA-2048 OAEP ciphertext or an ECC point, both within 2..512 bytes.
    """
    if len(blob) < 2:
        raise RequestError("credential_blob: too short")
    hmac_size = int.from_bytes(blob[:2], "big")
    if hmac_size not in (32, 48, 64) or len(blob) < 2 + hmac_size + 3:
        raise RequestError("credential_blob: not a TPM2B_ID_OBJECT payload (HMAC || identity)")
    if not 2 <= len(secret) <= 512:
        raise RequestError("encrypted_secret: must be 2 to 512 bytes")


class Api:
    def __init__(self, service: Service) -> None:
        self._service = service
        self._routes: dict[str, tuple[str, Callable[[Request], Response]]] = {
            "/v1/health": ("GET", lambda r: Response(200, service.health())),
            "/v1/identity": ("GET", lambda r: Response(200, service.identity_document())),
            "/v1/evidence": ("GET", lambda r: Response(200, service.evidence(_nonce(r)))),
            "/v1/log": ("GET", lambda r: Response(200, service.log_segment(_from_seq(r)))),
            "/v1/attestation/activate-credential": ("POST", self._activate),
            "/v1/attestation/ak-certificate": ("POST", self._install_ak_chain),
            "/v1/sessions": ("POST", self._open),
            "/v1/sessions/close": ("POST", self._close),
            "/v1/seal": ("GET", lambda r: Response(200, service.seal_status())),
            "/v1/weights/request": ("POST", self._weights_request),
            "/v1/weights/key": ("POST", self._weights_key),
            "/v1/jobs": ("POST", self._submit_job),
            "/v1/jobs/self/key": ("POST", lambda r: Response(200, service.job_keys(r.peer))),
            "/v1/jobs/self/commit": ("POST", self._job_commit),
            "/metrics": ("GET", lambda r: Response(200, raw=service.metrics_text(r.peer))),
        }

    def _activate(self, request: Request) -> Response:
        body = parse_json_object(request.body, "request body")
        only_fields(body, {"credential_blob", "encrypted_secret"}, "request body")
        blob = b64decode(field(body, "credential_blob", str, "request body"), "credential_blob")
        secret = b64decode(field(body, "encrypted_secret", str, "request body"), "encrypted_secret")
        _check_credential_shape(blob, secret)
        return Response(200, {"secret": b64encode(self._service.activate_credential(blob, secret))})

    def _install_ak_chain(self, request: Request) -> Response:
        what = "request body"
        body = parse_json_object(request.body, what)
        only_fields(body, {"ak_certificates"}, what)
        chain = b64_list(field(body, "ak_certificates", list, what), "ak_certificates", most=4)
        if not chain:
            raise RequestError("ak_certificates: at least one certificate (the AK's, first)")
        return Response(200, self._service.install_ak_chain(chain, request.peer))

    def _open(self, request: Request) -> Response:
        self._service.authorize_session(request.peer)
        body = parse_json_object(request.body or b"{}", "request body")
        only_fields(body, {"deadline_seconds", "payload", "actions"}, "request body")
        deadline = field(body, "deadline_seconds", int, "request body")
        payload = field(body, "payload", dict, "request body") if "payload" in body else None
        actions = None
        if body.get("actions") is not None:
            actions = b64decode(field(body, "actions", str, "request body"), "actions")
        if actions is not None and payload is None:
            raise RequestError("actions ride with a payload (sealed under its action key)")
        return Response(201, self._service.open_session(deadline, payload, actions))

    def _close(self, request: Request) -> Response:
        self._service.authorize_session(request.peer)
        body = parse_json_object(request.body, "request body")
        what = "request body"
        only_fields(body, {"session", "token", "output_sha256", "log_from"}, what)
        session = hex_decode(field(body, "session", str, what), "session", size=16)
        token = b64decode(field(body, "token", str, what), "token")
        output = body.get("output_sha256")
        output_sha256 = None if output is None else hex_decode(output, "output_sha256", size=32)
        log_from = None
        if body.get("log_from") is not None:
            log_from = field(body, "log_from", int, what)
            if log_from < 0:
                raise RequestError("log_from must be a log position (>= 0)")
        return Response(200, self._service.close_session(session, token, output_sha256, log_from))

    def _weights_request(self, request: Request) -> Response:
        self._service.authorize_session(request.peer)  # before the body is even read
        what = "request body"
        body = parse_json_object(request.body, what)
        fields = ("model_id", "key_id", "tenant", "operation", "nonce")
        only_fields(body, set(fields), what)
        model_id, key_id, tenant, operation, nonce = (field(body, f, str, what) for f in fields)
        return Response(
            200,
            self._service.weights_request(
                request.peer,
                model_id=model_id,
                key_id=key_id,
                tenant=tenant,
                operation=operation,
                nonce=hex_decode(nonce, "nonce", size=NONCE_LEN),
            ),
        )

    def _weights_key(self, request: Request) -> Response:
        self._service.authorize_session(request.peer)
        what = "request body"
        body = parse_json_object(request.body, what)
        only_fields(body, {"release", "denial"}, what)
        if len(body) != 1:
            raise RequestError("request body: exactly one of 'release' and 'denial'")
        # The broker signed canonical fields, not these bytes; the embassy checks the
        # release by unwrapping it (every field is in the HPKE info), not by its encoding.
        if "release" in body:
            release = parse_release(canonical_json(field(body, "release", dict, what)))
            return Response(200, self._service.weights_key(request.peer, release))
        denial = parse_denial(canonical_json(field(body, "denial", dict, what)))
        return Response(200, self._service.weights_denied(request.peer, denial))

    def _submit_job(self, request: Request) -> Response:
        what = "request body"
        body = parse_json_object(request.body, what)
        only_fields(body, {"payload", "input"}, what)
        payload = field(body, "payload", dict, what)
        ciphertext = b64decode(field(body, "input", str, what), "input")
        return Response(201, self._service.submit_job(request.peer, payload, ciphertext))

    def _job_commit(self, request: Request) -> Response:
        # A commit that does not parse still ends the job (bad commit, stated): the
        # service checks the caller is a job before anything else.
        try:
            body = parse_json_object(request.body, "request body")
            only_fields(body, {"output_sha256"}, "request body")
            text = field(body, "output_sha256", str, "request body")
            digest = hex_decode(text, "output_sha256", size=32)
        except (RequestError, WireFormatError) as exc:
            return Response(200, self._service.job_commit(request.peer, None, exc.message))
        return Response(200, self._service.job_commit(request.peer, digest, ""))

    def _job_status(self, request: Request, job: str) -> Response:
        if request.method != "GET":
            raise MethodNotAllowedError(f"/v1/jobs/<id> takes GET, not {request.method}")
        if not _JOB_ID.fullmatch(job):
            raise NotFoundError("no such job")
        wait = 0
        if "wait" in request.query:
            wait = ascii_decimal(_one(request, "wait")) or 0
            if wait > MAX_JOB_WAIT:
                raise RequestError(f"wait is at most {MAX_JOB_WAIT} seconds")
        return Response(200, self._service.job_status(bytes.fromhex(job), float(wait)))

    @property
    def routes(self) -> frozenset[str]:
        """The route paths: the only paths the server's log may name."""
        return frozenset(self._routes)

    def __call__(self, request: Request) -> Response:
        route = self._routes.get(request.path)
        if route is None and request.path.startswith(JOB_PREFIX):
            return self._job_status(request, request.path[len(JOB_PREFIX) :])
        if route is None:
            # Not echoed: the path is the caller's bytes.
            raise NotFoundError("no such route")
        method, handler = route
        if request.method != method:
            raise MethodNotAllowedError(f"{request.path} takes {method}, not {request.method}")
        return handler(request)
