"""Authorities' instructions, the actions sealed under the action key, meter readings."""

from __future__ import annotations

import base64
import json
import os

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from embassy.errors import (
    BadPayloadError,
    InstructionExpiredError,
    InstructionSignatureError,
    InstructionUnsignedError,
    KeyBindingError,
    NotOwnerError,
    SignatureError,
    VerificationError,
    WireFormatError,
)
from embassy.metering.actions import open_actions, seal_actions
from embassy.metering.instruction import (
    INSTRUCTION_PAYLOAD_TYPE,
    AuthorityPolicy,
    Op,
    Polarity,
    make_instruction,
    verify_instruction,
)
from embassy.metering.reading import (
    Meter,
    Reading,
    open_reading,
    reading_predicate,
    reply_public_bytes,
)
from embassy.wire.codec import canonical_json
from embassy.wire.dsse import keyid, sign_envelope
from embassy.wire.statement import METER_READING_V1, SEAL_V1, Header, Statement, Subject
from tests.fakes import FakeTpm

NOW = 1_800_000_000
AISI = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
EMBASSY = Ed25519PrivateKey.from_private_bytes(bytes(range(2, 34)))
EMBASSY_ID = keyid(EMBASSY.public_key())
POLICY = {
    "aisi": AuthorityPolicy("aisi", AISI.public_key(), frozenset({"exploit-design", "bio"})),
    "rights": AuthorityPolicy("rights", OTHER.public_key(), frozenset({"lyrics"})),
}


def instr(key: Ed25519PrivateKey = AISI, **kw: object) -> bytes:
    args: dict[str, object] = {
        "op": Op.WRITE,
        "authority": "aisi",
        "capabilities": ["exploit-design"],
        "embassy_keyid": EMBASSY_ID,
        "expires_unix": NOW + 60,
        "polarity": Polarity.POSITIVE,
    }
    args.update(kw)
    return make_instruction(key, **args)  # type: ignore[arg-type]


def verify(data: bytes, now: int = NOW) -> object:
    return verify_instruction(data, POLICY, own_keyid=EMBASSY_ID, now=now)


def test_each_op_verifies() -> None:
    w = verify_instruction(instr(), POLICY, own_keyid=EMBASSY_ID, now=NOW)
    assert (w.op, w.capabilities, w.polarity) == (Op.WRITE, ("exploit-design",), Polarity.POSITIVE)
    u = verify_instruction(
        instr(op=Op.UPDATE, capabilities=["bio", "exploit-design"], polarity=None),
        POLICY,
        own_keyid=EMBASSY_ID,
        now=NOW,
    )
    assert u.op is Op.UPDATE
    assert u.polarity is None
    reply = reply_public_bytes(AISI)
    r = verify_instruction(
        instr(op=Op.READ, capabilities=[], polarity=None, reply_key=reply),
        POLICY,
        own_keyid=EMBASSY_ID,
        now=NOW,
    )
    assert r.reply_key == reply
    assert len(r.digest) == 32


def test_two_instructions_never_share_a_nonce() -> None:
    a = verify_instruction(instr(), POLICY, own_keyid=EMBASSY_ID, now=NOW)
    b = verify_instruction(instr(), POLICY, own_keyid=EMBASSY_ID, now=NOW)
    assert a.nonce != b.nonce
    assert a.digest != b.digest


def _resign(data: bytes, edit: object, key: Ed25519PrivateKey = AISI) -> bytes:
    env = json.loads(data)
    payload = json.loads(base64.b64decode(env["payload"]))
    assert callable(edit)
    edit(payload)
    return sign_envelope(canonical_json(payload), key, INSTRUCTION_PAYLOAD_TYPE)


def test_unsigned_refused() -> None:
    env = json.loads(instr())
    env["signatures"] = []
    with pytest.raises(InstructionUnsignedError):
        verify(json.dumps(env).encode())


def test_signed_by_another_authority_refused() -> None:
    with pytest.raises(InstructionSignatureError):
        verify(instr(key=OTHER))


def test_signature_over_other_bytes_refused() -> None:
    env = json.loads(instr())
    payload = json.loads(base64.b64decode(env["payload"]))
    payload["polarity"] = "negative"
    env["payload"] = base64.b64encode(canonical_json(payload)).decode()
    with pytest.raises(InstructionSignatureError):
        verify(json.dumps(env).encode())


def test_unknown_authority_refused() -> None:
    with pytest.raises(InstructionSignatureError, match="no authority 'mallory'"):
        verify(instr(authority="mallory"))


def test_expired_and_other_embassy_refused() -> None:
    with pytest.raises(InstructionExpiredError, match="expired"):
        verify(instr(), now=NOW + 60)
    with pytest.raises(InstructionExpiredError, match="not this one"):
        verify(instr(embassy_keyid="00" * 32))


def test_capability_of_another_authority_refused() -> None:
    with pytest.raises(NotOwnerError, match="lyrics"):
        verify(instr(capabilities=["lyrics"]))
    with pytest.raises(NotOwnerError):
        verify(instr(op=Op.UPDATE, capabilities=["bio", "lyrics"], polarity=None))


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda p: p.update(v=2), "version"),
        (lambda p: p.update(op="delete"), "op"),
        (lambda p: p.update(capabilities=["Exploit Design"]), "capability names"),
        (lambda p: p.update(capabilities=["a", "b"]), "exactly one"),
        (lambda p: p.update(polarity=None), "polarity"),
        (lambda p: p.update(reply_key=base64.b64encode(bytes(32)).decode()), "reply_key"),
        (lambda p: p.update(nonce="00"), "nonce"),
        (lambda p: p.update(extra=1), "extra"),
        (lambda p: p.pop("reply_key"), "present"),
    ],
)
def test_malformed_instructions_refused(edit: object, match: str) -> None:
    with pytest.raises(WireFormatError, match=match):
        verify(_resign(instr(), edit))


def test_wrong_payload_type_refused() -> None:
    env = json.loads(instr())
    data = sign_envelope(base64.b64decode(env["payload"]), AISI)
    with pytest.raises(WireFormatError, match="payloadType"):
        verify(data)


def test_actions_round_trip_and_binding() -> None:
    key, pid = os.urandom(32), os.urandom(16)
    blob = seal_actions(key, pid, [instr(), b"anything"], unmetered_ok=True)
    actions = open_actions(key, pid, blob)
    assert len(actions.instructions) == 2
    assert actions.instructions[1] == b"anything"
    assert actions.unmetered_ok
    with pytest.raises(BadPayloadError, match="another payload"):
        open_actions(key, os.urandom(16), blob)
    with pytest.raises(BadPayloadError):
        open_actions(os.urandom(32), pid, blob)
    flipped = bytearray(blob)
    flipped[-1] ^= 1
    with pytest.raises(BadPayloadError):
        open_actions(key, pid, bytes(flipped))
    with pytest.raises(BadPayloadError, match="too short"):
        open_actions(key, pid, b"x")


def _reading_statement(reading: Reading, reply: bytes, signer: Ed25519PrivateKey) -> bytes:
    subjects, body = reading_predicate(reading, reply, EMBASSY_ID)
    tpm = FakeTpm()
    header = Header(seq=9, prev=bytes(32), clock=tpm.clock(), tpm_mode=tpm.mode)
    payload = Statement(METER_READING_V1, tuple(subjects), header, body).encode()
    return sign_envelope(payload, signer)


READING = Reading(
    "aisi",
    bytes(range(32)),
    "embassy-cosine-margin-v1",
    8,
    (Meter("bio", 12, 1, 7), Meter("exploit-design", 0, 0, None)),
)


def test_reading_round_trip() -> None:
    data = _reading_statement(READING, reply_public_bytes(AISI), EMBASSY)
    got = open_reading(
        data,
        embassy_key=EMBASSY.public_key(),
        embassy_keyid=EMBASSY_ID,
        signing_key=AISI,
        authority="aisi",
        instruction_sha256=bytes(range(32)),
    )
    assert got.meters == READING.meters
    assert got.as_of_seq == 8
    assert got.header is not None
    assert got.header.seq == 9


def test_reading_is_opaque_and_padded() -> None:
    small = _reading_statement(READING, reply_public_bytes(AISI), EMBASSY)
    more = Reading("aisi", bytes(32), "f", 8, tuple(Meter(f"c{i}", i, i, i) for i in range(5)))
    big = _reading_statement(more, reply_public_bytes(AISI), EMBASSY)
    assert b"exploit-design" not in base64.b64decode(json.loads(small)["payload"])
    assert len(small) == len(big)


def test_reading_refused_to_others_and_when_forged() -> None:
    data = _reading_statement(READING, reply_public_bytes(AISI), EMBASSY)
    kwargs = {"embassy_keyid": EMBASSY_ID, "authority": "aisi"}
    with pytest.raises(KeyBindingError, match="decrypt"):
        open_reading(data, embassy_key=EMBASSY.public_key(), signing_key=OTHER, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(SignatureError):
        open_reading(data, embassy_key=OTHER.public_key(), signing_key=AISI, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(KeyBindingError, match="another instruction"):
        open_reading(
            data,
            embassy_key=EMBASSY.public_key(),
            signing_key=AISI,
            instruction_sha256=bytes(32),
            **kwargs,  # type: ignore[arg-type]
        )
    forged = _reading_statement(READING, reply_public_bytes(AISI), OTHER)
    with pytest.raises(SignatureError):
        open_reading(forged, embassy_key=EMBASSY.public_key(), signing_key=AISI, **kwargs)  # type: ignore[arg-type]


def test_statement_of_another_kind_is_not_a_reading() -> None:
    tpm = FakeTpm()
    header = Header(seq=1, prev=bytes(32), clock=tpm.clock(), tpm_mode=tpm.mode)
    subject = (Subject("session:00", bytes(32)),)
    data = sign_envelope(Statement(SEAL_V1, subject, header, {}).encode(), EMBASSY)
    with pytest.raises(VerificationError, match="not a meter reading"):
        open_reading(
            data,
            embassy_key=EMBASSY.public_key(),
            embassy_keyid=EMBASSY_ID,
            signing_key=AISI,
            authority="aisi",
        )
