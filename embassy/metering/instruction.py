"""Authorities' instructions: what a session's activations are for (docs/protocol.md §5).

An instruction is a DSSE envelope (payloadType ``application/vnd.embassy.instruction+json``)
signed with the Ed25519 key the embassy's *measured* policy lists for the authority::

    {"v":1,"op":"write"|"update"|"read","authority":"<name>",
     "capabilities":["<capability>", ...],"polarity":"positive"|"negative"|null,
     "nonce":"<hex16>","embassy_keyid":"<hex32>","expires_unix":N,"reply_key":"<b64>"|null}

- ``write``: record this session's activations as signatures of ONE capability, as
  positive or negative samples (``polarity`` required).
- ``update``: meter this session's activations against the named capabilities.
- ``read``: return the named capabilities' meters (all the authority owns if the list is
  empty), encrypted to ``reply_key`` (raw X25519, 32 bytes).

Checks, in order, each with its own error: signed at all (``instruction-unsigned``), well
formed (``malformed``), by the key of the authority it names (``instruction-bad-signature``),
for this embassy and not expired (``instruction-expired``), only capabilities that authority
owns (``not-capability-owner``). That it is carried out once (``instruction-replayed``) is
the registry's durable nonce claim. Pure: the clock and the policy are arguments.
"""

from __future__ import annotations

import enum
import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from embassy.errors import (
    InstructionExpiredError,
    InstructionSignatureError,
    InstructionUnsignedError,
    NotOwnerError,
    SignatureError,
    WireFormatError,
)
from embassy.wire.codec import (
    JsonObject,
    b64decode,
    b64encode,
    canonical_json,
    field,
    hex_decode,
    only_fields,
    parse_json_object,
)
from embassy.wire.dsse import Envelope, parse_envelope, sign_envelope, verify_envelope

INSTRUCTION_PAYLOAD_TYPE = "application/vnd.embassy.instruction+json"
VERSION = 1
NONCE_LEN = 16
MAX_CAPABILITIES = 64
# Capability names are identifiers, not prose: they appear in statements and file names.
CAPABILITY_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")

_FIELDS = {
    "v",
    "op",
    "authority",
    "capabilities",
    "polarity",
    "nonce",
    "embassy_keyid",
    "expires_unix",
    "reply_key",
}


class Op(enum.Enum):
    WRITE = "write"
    UPDATE = "update"
    READ = "read"


class Polarity(enum.Enum):
    POSITIVE = "positive"
    NEGATIVE = "negative"


@dataclass(frozen=True, slots=True)
class Instruction:
    op: Op
    authority: str
    capabilities: tuple[str, ...]
    polarity: Polarity | None
    nonce: bytes
    embassy_keyid: str
    expires_unix: int
    reply_key: bytes | None
    # SHA-256 of the exact signed payload bytes: how statements name the instruction.
    digest: bytes = b""

    def to_json(self) -> JsonObject:
        return {
            "v": VERSION,
            "op": self.op.value,
            "authority": self.authority,
            "capabilities": list(self.capabilities),
            "polarity": None if self.polarity is None else self.polarity.value,
            "nonce": self.nonce.hex(),
            "embassy_keyid": self.embassy_keyid,
            "expires_unix": self.expires_unix,
            "reply_key": None if self.reply_key is None else b64encode(self.reply_key),
        }


def check_capability_name(name: object, what: str) -> str:
    if not isinstance(name, str) or not CAPABILITY_PATTERN.fullmatch(name):
        raise WireFormatError(f"{what}: capability names match {CAPABILITY_PATTERN.pattern}")
    return name


def _check_shape(
    op: Op, capabilities: Sequence[str], polarity: Polarity | None, reply_key: bytes | None
) -> None:
    """The fields each op needs, and only those: one reading of each instruction."""
    what = f"instruction ({op.value})"
    if len(set(capabilities)) != len(capabilities):
        raise WireFormatError(f"{what}: capabilities repeat")
    if len(capabilities) > MAX_CAPABILITIES:
        raise WireFormatError(f"{what}: more than {MAX_CAPABILITIES} capabilities")
    if op is Op.WRITE and len(capabilities) != 1:
        raise WireFormatError(f"{what}: names exactly one capability")
    if op is Op.UPDATE and not capabilities:
        raise WireFormatError(f"{what}: names at least one capability")
    if (op is Op.WRITE) != (polarity is not None):
        raise WireFormatError(f"{what}: polarity is required for write and only for write")
    if (op is Op.READ) != (reply_key is not None):
        raise WireFormatError(f"{what}: reply_key is required for read and only for read")
    if reply_key is not None and len(reply_key) != 32:
        raise WireFormatError(f"{what}: reply_key must be a raw X25519 key (32 bytes)")


def parse_instruction_payload(payload: bytes) -> Instruction:
    """Strictly parse the signed payload (the signature is checked by the caller)."""
    what = "instruction"
    obj = parse_json_object(payload, what)
    only_fields(obj, _FIELDS, what)
    version = field(obj, "v", int, what)
    if version != VERSION:
        raise WireFormatError(f"{what}: unsupported version {version}")
    try:
        op = Op(field(obj, "op", str, what))
    except ValueError:
        raise WireFormatError(f"{what}.op: one of write, update, read") from None
    authority = field(obj, "authority", str, what)
    caps = field(obj, "capabilities", list, what)
    capabilities = tuple(
        check_capability_name(c, f"{what}.capabilities[{i}]") for i, c in enumerate(caps)
    )
    polarity_text = obj.get("polarity")
    if polarity_text is None:
        polarity = None
    else:
        try:
            polarity = Polarity(polarity_text)
        except ValueError:
            raise WireFormatError(f"{what}.polarity: positive, negative or null") from None
    nonce = hex_decode(field(obj, "nonce", str, what), f"{what}.nonce", size=NONCE_LEN)
    embassy = field(obj, "embassy_keyid", str, what)
    hex_decode(embassy, f"{what}.embassy_keyid", size=32)
    expires = field(obj, "expires_unix", int, what)
    if not 0 <= expires < 2**63:
        raise WireFormatError(f"{what}.expires_unix: out of range")
    reply_text = obj.get("reply_key")
    reply_key = None if reply_text is None else b64decode(reply_text, f"{what}.reply_key")
    if "polarity" not in obj or "reply_key" not in obj:
        raise WireFormatError(f"{what}: polarity and reply_key must be present (null if unused)")
    _check_shape(op, capabilities, polarity, reply_key)
    return Instruction(
        op,
        authority,
        capabilities,
        polarity,
        nonce,
        embassy,
        expires,
        reply_key,
        hashlib.sha256(payload).digest(),
    )


def make_instruction(
    key: Ed25519PrivateKey,
    *,
    op: Op,
    authority: str,
    capabilities: Sequence[str],
    embassy_keyid: str,
    expires_unix: int,
    polarity: Polarity | None = None,
    reply_key: bytes | None = None,
) -> bytes:
    """The authority's side: a fresh, signed instruction (DSSE envelope bytes)."""
    for i, name in enumerate(capabilities):
        check_capability_name(name, f"capabilities[{i}]")
    _check_shape(op, capabilities, polarity, reply_key)
    unsigned = Instruction(
        op,
        authority,
        tuple(capabilities),
        polarity,
        os.urandom(NONCE_LEN),
        embassy_keyid,
        expires_unix,
        reply_key,
    )
    return sign_envelope(canonical_json(unsigned.to_json()), key, INSTRUCTION_PAYLOAD_TYPE)


@dataclass(frozen=True, slots=True)
class AuthorityPolicy:
    """What the measured policy says of one authority."""

    name: str
    key: Ed25519PublicKey
    capabilities: frozenset[str]


def _envelope(data: bytes) -> Envelope:
    try:
        return parse_envelope(data)
    except WireFormatError as exc:
        if "no signatures" in exc.message:
            raise InstructionUnsignedError("instruction: carries no signature") from None
        raise


def verify_instruction(
    data: bytes,
    authorities: Mapping[str, AuthorityPolicy],
    *,
    own_keyid: str,
    now: int,
) -> Instruction:
    """Return the instruction if it may be carried out here and now; raise otherwise."""
    envelope = _envelope(data)
    if envelope.payload_type != INSTRUCTION_PAYLOAD_TYPE:
        raise WireFormatError(f"instruction: payloadType {envelope.payload_type!r}")
    instruction = parse_instruction_payload(envelope.payload)
    policy = authorities.get(instruction.authority)
    if policy is None:
        raise InstructionSignatureError(
            f"instruction: no authority {instruction.authority!r} in this embassy's policy"
        )
    try:
        verify_envelope(envelope, policy.key, INSTRUCTION_PAYLOAD_TYPE)
    except SignatureError as exc:
        raise InstructionSignatureError(
            f"instruction: not signed by authority {policy.name!r}: {exc.message}"
        ) from None
    if instruction.embassy_keyid != own_keyid:
        raise InstructionExpiredError(
            f"instruction: for embassy {instruction.embassy_keyid[:16]}…, not this one"
        )
    if instruction.expires_unix <= now:
        raise InstructionExpiredError(f"instruction: expired at {instruction.expires_unix}")
    foreign = sorted(set(instruction.capabilities) - policy.capabilities)
    if foreign:
        raise NotOwnerError(f"instruction: authority {policy.name!r} does not own {foreign}")
    return instruction
