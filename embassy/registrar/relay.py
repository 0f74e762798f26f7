"""Enrolment relayed through the host, for a registrar that is not on the embassy's machine.

The embassy has no network, so the registrar's challenge and the TPM's answer travel as
files the host carries (``embassy registrar challenge`` → ``answer`` on the host →
``issue``). The host learns nothing that helps it: the challenge is encrypted to the EK,
and the secret that checks the answer stays in the registrar's directory (0600, one use,
an hour at most) until the answer comes back.

::

    challenge: {"v":1,"type":"embassy-registrar-challenge","id":"<hex16>","ak_name":"<hex>",
                "credential_blob":"<b64>","encrypted_secret":"<b64>"}
    answer:    {"v":1,"type":"embassy-registrar-answer","id":"<hex16>","secret":"<b64>"}
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from embassy.daemon.atomic import write_atomic
from embassy.errors import ConfigError
from embassy.registrar.enroll import Challenge
from embassy.wire.codec import (
    JsonObject,
    b64decode,
    b64encode,
    canonical_json,
    field,
    hex_decode,
    parse_json_object,
    parse_typed_object,
)

CHALLENGE_TYPE = "embassy-registrar-challenge"
ANSWER_TYPE = "embassy-registrar-answer"
PENDING_DIR = "pending"
PENDING_TTL_SECONDS = 3600


def challenge_json(challenge_id: bytes, challenge: Challenge) -> JsonObject:
    return {
        "v": 1,
        "type": CHALLENGE_TYPE,
        "id": challenge_id.hex(),
        "ak_name": challenge.ak_name.hex(),
        "credential_blob": b64encode(challenge.credential_blob),
        "encrypted_secret": b64encode(challenge.encrypted_secret),
    }


@dataclass(frozen=True, slots=True)
class RelayedChallenge:
    id: bytes
    credential_blob: bytes
    encrypted_secret: bytes


def parse_challenge(data: bytes) -> RelayedChallenge:
    obj = parse_typed_object(
        data,
        CHALLENGE_TYPE,
        {"id", "ak_name", "credential_blob", "encrypted_secret"},
        CHALLENGE_TYPE,
    )
    return RelayedChallenge(
        hex_decode(field(obj, "id", str, CHALLENGE_TYPE), "id", size=16),
        b64decode(obj.get("credential_blob"), "credential_blob"),
        b64decode(obj.get("encrypted_secret"), "encrypted_secret"),
    )


def answer_json(challenge_id: bytes, secret: bytes) -> JsonObject:
    return {"v": 1, "type": ANSWER_TYPE, "id": challenge_id.hex(), "secret": b64encode(secret)}


def parse_answer(data: bytes) -> tuple[bytes, bytes]:
    obj = parse_typed_object(data, ANSWER_TYPE, {"id", "secret"}, ANSWER_TYPE)
    return (
        hex_decode(field(obj, "id", str, ANSWER_TYPE), "id", size=16),
        b64decode(obj.get("secret"), "secret"),
    )


@dataclass(frozen=True, slots=True)
class Pending:
    """What the registrar keeps between challenge and answer."""

    ak_public: bytes
    ek_public: bytes
    ek_certificate: bytes
    secret: bytes


class PendingStore:
    """One file per open challenge in the registrar's directory; taken once."""

    def __init__(self, registrar_dir: Path) -> None:
        self._dir = registrar_dir / PENDING_DIR

    def put(self, challenge: Challenge) -> bytes:
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        challenge_id = os.urandom(16)
        body = {
            "created_unix": int(time.time()),
            "ak_public": b64encode(challenge.ak_public),
            "ek_public": b64encode(challenge.ek_public),
            "ek_certificate": b64encode(challenge.ek_certificate),
            "secret": b64encode(challenge.secret),
        }
        write_atomic(self._dir / f"{challenge_id.hex()}.json", canonical_json(body), 0o600)
        return challenge_id

    def take(self, challenge_id: bytes, *, now: float) -> Pending:
        """The pending challenge ``challenge_id``, removed: an answer is checked once."""
        path = self._dir / f"{challenge_id.hex()}.json"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ConfigError(
                f"no open challenge {challenge_id.hex()} in {self._dir} (already answered, "
                "or made by another registrar)"
            ) from None
        path.unlink()
        obj = parse_json_object(data, str(path))
        created = field(obj, "created_unix", int, str(path))
        if not 0 <= now - created <= PENDING_TTL_SECONDS:
            raise ConfigError(
                f"challenge {challenge_id.hex()} is older than {PENDING_TTL_SECONDS} s: "
                "make a new one"
            )
        return Pending(
            b64decode(obj.get("ak_public"), "ak_public"),
            b64decode(obj.get("ek_public"), "ek_public"),
            b64decode(obj.get("ek_certificate"), "ek_certificate"),
            b64decode(obj.get("secret"), "secret"),
        )
