"""The embassy's artifacts checked by tools that share none of its code.

- DSSE: envelopes signed by securesystemslib's Ed25519 signer verify with the embassy's
  ``embassy.wire.dsse``; the embassy's envelopes (every entry a real daemon logged)
  verify with securesystemslib's ``Envelope.verify``. The keyid convention is part of
  the contract and is tested both ways: the embassy selects signatures by keyid = hex
  SHA-256 of the raw 32-byte Ed25519 public key (securesystemslib's default keyid, the
  SHA-256 of its own key dict, is a different string, and an envelope carrying it is
  refused as unsigned by that key); securesystemslib, too, matches by keyid, so it is given
  the embassy's keyid (``SSlibKey.from_crypto(key, keyid=...)``).
- Quotes: ``tpm2_checkquote`` (tpm2-tools) on every kind of quote a real daemon on a swtpm
  makes: every checkpoint it stored (a segment's closing quote and its anchor), the
  identity document's quote (over SHA-256 of the identity statement) and an evidence
  quote over a caller's nonce. Each is fed as the daemon serves it: the TPMS_ATTEST and
  TPMT_SIGNATURE bytes, the AK public as PEM, the PCR values; and each is refused by
  tpm2-tools once one byte of the attest, the signature or a PCR value is flipped, or with
  other qualifying data.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from embassy.attest.marshal import parse_public
from embassy.attest.types import ClockInfo, Quote, TpmMode
from embassy.client import call
from embassy.errors import SignatureError, WireFormatError
from embassy.log.entry import checkpoint_qualifying_data, parse_checkpoint_bytes
from embassy.log.event import EVENT_PAYLOAD_TYPE
from embassy.log.segment import parse_segment
from embassy.wire.codec import b64decode
from embassy.wire.dsse import (
    IN_TOTO_PAYLOAD_TYPE,
    keyid,
    parse_envelope,
    raw_public_key,
    sign_envelope,
    verify_envelope,
)
from embassy.wire.statement import (
    LIFECYCLE_V1,
    Header,
    Statement,
    embassy_subject,
    parse_statement,
)
from tests.integration.conftest import IN_CI, Daemon, require

pytestmark = pytest.mark.integration

if not IN_CI:
    pytest.importorskip("securesystemslib")

from securesystemslib.dsse import Envelope as SslibEnvelope  # noqa: E402
from securesystemslib.exceptions import VerificationError as SslibVerificationError  # noqa: E402
from securesystemslib.signer import CryptoSigner, SSlibKey  # noqa: E402

# -- DSSE with securesystemslib ------------------------------------------------------------

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))


def _statement_payload(key: Ed25519PrivateKey = KEY) -> bytes:
    header = Header(7, bytes(range(32)), ClockInfo(1234, 1, 0, True), TpmMode.SOFTWARE)
    subject = (embassy_subject(raw_public_key(key.public_key())),)
    return Statement(LIFECYCLE_V1, subject, header, {"event": "interop"}).encode()


def _sslib_key(key: Ed25519PrivateKey, *, embassy_keyid: bool = True) -> SSlibKey:
    public = key.public_key()
    return SSlibKey.from_crypto(public, keyid=keyid(public) if embassy_keyid else None)


def _sslib_sign(
    payload: bytes,
    key: Ed25519PrivateKey = KEY,
    *,
    embassy_keyid: bool = True,
    payload_type: str = IN_TOTO_PAYLOAD_TYPE,
) -> bytes:
    envelope = SslibEnvelope(payload, payload_type, {})
    envelope.sign(CryptoSigner(key, _sslib_key(key, embassy_keyid=embassy_keyid)))
    return json.dumps(envelope.to_dict()).encode()  # securesystemslib's own serialisation


def _sslib_verify(data: bytes, key: Ed25519PrivateKey, *, embassy_keyid: bool = True) -> None:
    envelope = SslibEnvelope.from_dict(json.loads(data))
    accepted = envelope.verify([_sslib_key(key, embassy_keyid=embassy_keyid)], 1)
    assert list(accepted) == [_sslib_key(key, embassy_keyid=embassy_keyid).keyid]


def test_securesystemslib_envelope_verifies_with_the_embassy() -> None:
    payload = _statement_payload()
    data = _sslib_sign(payload)
    assert verify_envelope(parse_envelope(data), KEY.public_key()) == payload
    statement = parse_statement(verify_envelope(parse_envelope(data), KEY.public_key()))
    assert statement.body == {"event": "interop"}


def test_securesystemslib_envelope_tampered_or_by_another_key_is_refused() -> None:
    payload = _statement_payload()
    obj = json.loads(_sslib_sign(payload))
    changed = payload.replace(b'"interop"', b'"interoP"')
    obj["payload"] = base64.b64encode(changed).decode()
    with pytest.raises(SignatureError, match="does not verify"):
        verify_envelope(parse_envelope(json.dumps(obj).encode()), KEY.public_key())
    # Signed by another key that claims the embassy's keyid.
    forged = SslibEnvelope(payload, IN_TOTO_PAYLOAD_TYPE, {})
    claimed = SSlibKey.from_crypto(OTHER.public_key(), keyid=keyid(KEY.public_key()))
    forged.sign(CryptoSigner(OTHER, claimed))
    with pytest.raises(SignatureError, match="does not verify"):
        verify_envelope(parse_envelope(json.dumps(forged.to_dict()).encode()), KEY.public_key())


def test_the_embassy_requires_its_keyid_convention() -> None:
    """securesystemslib's default keyid is not the embassy's: such a signature is not
    looked at (the embassy selects by keyid), and the envelope is refused as unsigned."""
    payload = _statement_payload()
    data = _sslib_sign(payload, embassy_keyid=False)
    assert json.loads(data)["signatures"][0]["keyid"] != keyid(KEY.public_key())
    with pytest.raises(SignatureError, match="no signature by key"):
        verify_envelope(parse_envelope(data), KEY.public_key())


def test_a_non_canonical_payload_signed_by_securesystemslib_is_refused() -> None:
    """The signature verifies; the statement does not, because the embassy signs and
    accepts only the canonical encoding."""
    loose = json.dumps(json.loads(_statement_payload()), indent=2).encode()
    payload = verify_envelope(parse_envelope(_sslib_sign(loose)), KEY.public_key())
    with pytest.raises(WireFormatError, match="statement: not canonical JSON"):
        parse_statement(payload)


def test_embassy_envelopes_verify_with_securesystemslib() -> None:
    data = sign_envelope(_statement_payload(), KEY)
    _sslib_verify(data, KEY)
    with pytest.raises(SslibVerificationError):
        _sslib_verify(data, OTHER)
    with pytest.raises(SslibVerificationError):  # it, too, matches signatures by keyid
        _sslib_verify(data, KEY, embassy_keyid=False)
    obj = json.loads(data)
    payload = base64.b64decode(obj["payload"])
    obj["payload"] = base64.b64encode(payload.replace(b"interop", b"interoP")).decode()
    with pytest.raises(SslibVerificationError):
        _sslib_verify(json.dumps(obj).encode(), KEY)


# -- a real daemon: its envelopes and its quotes -------------------------------------------


def _identity_body(identity: dict[str, Any]) -> dict[str, Any]:
    segment = parse_segment(identity["segment"])
    return dict(parse_statement(parse_envelope(segment.entries[-1].data).payload).body)


def _ak_pem(identity: dict[str, Any]) -> bytes:
    """The AK public (TPM2B_PUBLIC as the identity statement publishes it) as PEM."""
    ak_raw = base64.b64decode(_identity_body(identity)["tpm"]["ak_public"])
    return (
        parse_public(ak_raw)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def _signing_key(identity: dict[str, Any]) -> Any:
    """The embassy's public signing key, read from its identity statement."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    raw = base64.b64decode(_identity_body(identity)["keys"]["signing"]["public"])
    return Ed25519PublicKey.from_public_bytes(raw)


class CheckQuote:
    """tpm2_checkquote in a directory of its own, on one AK."""

    def __init__(self, workdir: Path, ak_pem: bytes) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "ak.pem").write_bytes(ak_pem)
        self.runs = 0
        self.passed: dict[str, set[bytes]] = {}  # kind (first word of ``what``): attests

    def __call__(
        self, attest: bytes, signature: bytes, pcrs: dict[int, bytes], qualifying: bytes
    ) -> subprocess.CompletedProcess[str]:
        self.runs += 1
        (self.workdir / "msg").write_bytes(attest)
        (self.workdir / "sig").write_bytes(signature)
        (self.workdir / "pcrs").write_bytes(b"".join(pcrs[i] for i in sorted(pcrs)))
        selection = "sha256:" + ",".join(str(i) for i in sorted(pcrs))
        argv = ["tpm2_checkquote", "-u", "ak.pem", "-m", "msg", "-s", "sig", "-f", "pcrs"]
        argv += ["-l", selection, "-g", "sha256", "-q", qualifying.hex()]
        return subprocess.run(
            argv,
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        )

    def check(self, what: str, quote: Quote, qualifying: bytes) -> None:
        """The quote passes as served; each one-byte change, and other qualifying data, fail."""
        ok = self(quote.attest, quote.signature, quote.pcrs, qualifying)
        assert ok.returncode == 0, f"{what}: tpm2_checkquote refused it: {ok.stderr}"
        self.passed.setdefault(what.split(maxsplit=1)[0], set()).add(quote.attest)

        def flip(data: bytes, at: int) -> bytes:
            out = bytearray(data)
            out[at] ^= 0x01
            return bytes(out)

        first = min(quote.pcrs)
        hostile = {
            "attest byte": (flip(quote.attest, len(quote.attest) // 2), quote.signature,
                            quote.pcrs, qualifying),
            "signature byte": (quote.attest, flip(quote.signature, len(quote.signature) - 8),
                               quote.pcrs, qualifying),
            "PCR value": (quote.attest, quote.signature,
                          {**quote.pcrs, first: flip(quote.pcrs[first], 0)}, qualifying),
            "qualifying data": (quote.attest, quote.signature, quote.pcrs,
                                flip(qualifying, 0)),
        }  # fmt: skip
        for change, args in hostile.items():
            bad = self(*args)
            assert bad.returncode != 0, f"{what}: tpm2_checkquote accepted a changed {change}"


def _quote(obj: dict[str, Any]) -> Quote:
    return Quote(
        attest=b64decode(obj["attest"], "attest"),
        signature=b64decode(obj["signature"], "signature"),
        pcrs={int(k): bytes.fromhex(v) for k, v in obj["pcrs"].items()},
    )


def test_every_kind_of_quote_passes_tpm2_checkquote(
    daemon_factory: type[Daemon], tmp_path: Path
) -> None:
    require("tpm2_checkquote")
    daemon = daemon_factory()
    daemon.start()
    # A crash and a restart in the same TPM boot: a second start and identity, so the log
    # holds several checkpoints and a segment from a later position has an anchor.
    daemon.stop(signal.SIGKILL)
    daemon.start()
    identity = call(daemon.socket, "GET", "/v1/identity")
    check = CheckQuote(tmp_path / "checkquote", _ak_pem(identity))

    # The identity quote: over SHA-256 of the identity statement's payload.
    segment = parse_segment(identity["segment"])
    payload = parse_envelope(segment.entries[-1].data).payload
    check.check("identity quote", segment.head.quote, hashlib.sha256(payload).digest())

    # An evidence quote: over the caller's nonce.
    nonce = secrets.token_bytes(32)
    evidence = call(daemon.socket, "GET", f"/v1/evidence?nonce={nonce.hex()}")
    check.check("evidence quote", _quote(evidence["segment"]["head"]["quote"]), nonce)

    # A log segment from a later position: its closing checkpoint and its anchor.
    head_seq = call(daemon.socket, "GET", "/v1/health")["log_head"]
    log = parse_segment(call(daemon.socket, "GET", f"/v1/log?from={head_seq}")["segment"])
    assert log.anchor is not None, "a segment from the head should start at an anchor"
    for what, cp in (
        ("checkpoint closing a segment", log.head),
        ("checkpoint anchoring it", log.anchor),
    ):
        check.check(what, cp.quote, checkpoint_qualifying_data(cp.seq, cp.head))

    # Every checkpoint the daemon stored.
    stored = (daemon.data_dir / "checkpoints.jsonl").read_bytes().splitlines()
    assert len(stored) >= 2
    for line in stored:
        cp = parse_checkpoint_bytes(line)
        check.check(
            f"checkpoint stored at seq {cp.seq}",
            cp.quote,
            checkpoint_qualifying_data(cp.seq, cp.head),
        )
    counts = {kind: len(attests) for kind, attests in check.passed.items()}
    assert counts.keys() == {"identity", "evidence", "checkpoint"}
    print(
        f"tpm2_checkquote: {sum(counts.values())} distinct quotes passed {counts}; "
        f"{check.runs} runs, the changed ones all refused"
    )


def test_every_envelope_a_daemon_logged_verifies_with_securesystemslib(
    shared_daemon: Daemon,
) -> None:
    identity = call(shared_daemon.socket, "GET", "/v1/identity")
    public = _signing_key(identity)
    key = SSlibKey.from_crypto(public, keyid=keyid(public))
    log = parse_segment(call(shared_daemon.socket, "GET", "/v1/log?from=0")["segment"])
    types: dict[str, int] = {}
    for entry in log.entries:
        envelope = SslibEnvelope.from_dict(json.loads(entry.data))
        assert envelope.verify([key], 1) == {key.keyid: key}
        types[envelope.payload_type] = types.get(envelope.payload_type, 0) + 1
        # And a changed byte of the payload is refused by it, too.
        envelope.payload = envelope.payload[:-1] + bytes([envelope.payload[-1] ^ 1])
        with pytest.raises(SslibVerificationError):
            envelope.verify([key], 1)
    assert set(types) == {IN_TOTO_PAYLOAD_TYPE, EVENT_PAYLOAD_TYPE}
