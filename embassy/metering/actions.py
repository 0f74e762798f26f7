"""The actions of a payload: authorities' instructions, sealed under its action key.

The user (or an authority acting as one) makes a payload with an action key and seals the
signed instructions under it; the workload relays the opaque blob with the envelope::

    blob      = nonce (12 bytes) || AES-256-GCM(k, nonce, plaintext, aad)
    k         = HKDF-SHA256(action_key, salt=none, info=b"embassy-actions-v1", 32 bytes)
    aad       = b"embassy-actions-v1\\0" || payload_id (16 bytes)
    plaintext = canonical JSON {"v":1,"instructions":["<b64 DSSE envelope>", ...],
                                "unmetered_ok":false}

The payload id in the AAD ties the actions to one payload, and the envelope's
``has_action_key`` (bound into the HPKE wrapping) tells the embassy whether actions must be
present: a relay can neither drop, swap nor replay them. ``unmetered_ok`` is the user's
choice for when an instruction is refused: false (the default) aborts the session; true
runs it unmetered, the refusal recorded in a signed statement either way.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from embassy.errors import BadPayloadError, WireFormatError
from embassy.wire.codec import (
    b64decode,
    b64encode,
    canonical_json,
    field,
    only_fields,
    parse_json_object,
)

VERSION = 1
LABEL = b"embassy-actions-v1"
NONCE_LEN = 12
MAX_INSTRUCTIONS = 16
MAX_ACTIONS_BYTES = 256 * 1024


@dataclass(frozen=True, slots=True)
class Actions:
    instructions: tuple[bytes, ...]  # each the exact DSSE envelope bytes, checked later
    unmetered_ok: bool


def _key(action_key: bytes) -> AESGCM:
    if len(action_key) != 32:
        raise ValueError("action key must be 32 bytes")
    derived = HKDF(hashes.SHA256(), 32, salt=None, info=LABEL).derive(action_key)
    return AESGCM(derived)


def _aad(payload_id: bytes) -> bytes:
    return LABEL + b"\0" + payload_id


def seal_actions(
    action_key: bytes, payload_id: bytes, instructions: Sequence[bytes], *, unmetered_ok: bool
) -> bytes:
    """User side: seal signed instructions for one payload."""
    if len(instructions) > MAX_INSTRUCTIONS:
        raise ValueError(f"at most {MAX_INSTRUCTIONS} instructions per payload")
    plaintext = canonical_json(
        {
            "v": VERSION,
            "instructions": [b64encode(i) for i in instructions],
            "unmetered_ok": unmetered_ok,
        }
    )
    nonce = os.urandom(NONCE_LEN)
    return nonce + _key(action_key).encrypt(nonce, plaintext, _aad(payload_id))


def open_actions(action_key: bytes, payload_id: bytes, blob: bytes) -> Actions:
    """Embassy side: decrypt and strictly parse, or raise ``bad-payload`` / ``malformed``."""
    if len(blob) > MAX_ACTIONS_BYTES:
        raise WireFormatError(f"actions: {len(blob)} bytes exceeds {MAX_ACTIONS_BYTES}")
    if len(blob) < NONCE_LEN + 16:
        raise BadPayloadError("actions: too short to be sealed under the action key")
    try:
        plaintext = _key(action_key).decrypt(blob[:NONCE_LEN], blob[NONCE_LEN:], _aad(payload_id))
    except InvalidTag:
        raise BadPayloadError(
            "actions: do not open under this payload's action key (tampered, or another payload's)"
        ) from None
    what = "actions"
    obj = parse_json_object(plaintext, what)
    only_fields(obj, {"v", "instructions", "unmetered_ok"}, what)
    version = field(obj, "v", int, what)
    if version != VERSION:
        raise WireFormatError(f"{what}: unsupported version {version}")
    items = field(obj, "instructions", list, what)
    if len(items) > MAX_INSTRUCTIONS:
        raise WireFormatError(f"{what}: more than {MAX_INSTRUCTIONS} instructions")
    instructions = tuple(
        b64decode(item, f"{what}.instructions[{i}]") for i, item in enumerate(items)
    )
    return Actions(instructions, field(obj, "unmetered_ok", bool, what))
