"""The embassy's answers that the SDK's unit tests script: one session, its seal statement
(a DSSE envelope whose only part the SDK reads is the log sequence), its unseal, and a
payload envelope whose fields the SDK passes through without opening."""

from __future__ import annotations

import base64
import json
from typing import Any

SESSION = "5e" * 16
TOKEN = base64.b64encode(b"t" * 32).decode()
INPUT_KEY = bytes(range(100, 132))
PAYLOAD_ID = bytes(range(16))
SEAL_SEQ = 5
SEAL = json.dumps(
    {
        "payload": base64.b64encode(
            json.dumps({"predicate": {"header": {"log": {"seq": SEAL_SEQ}}}}).encode()
        ).decode(),
        "payloadType": "application/vnd.in-toto+json",
        "signatures": [],
    }
).encode()
UNSEAL = b'{"payloadType":"unseal","signatures":[]}'
ENVELOPE: dict[str, Any] = {
    "v": 1,
    "payload_id": PAYLOAD_ID.hex(),
    "expires_unix": 1_800_000_000,
    "embassy_keyid": "ab" * 32,
    "suite": "x25519",
    "has_action_key": False,
    "wrapped": base64.b64encode(b"hpke").decode(),
}
