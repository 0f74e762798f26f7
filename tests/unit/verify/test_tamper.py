"""Tamper with what a real (in-process) embassy serves, one way at a time, and check the
verifier refuses each with the right error and a message that names the right reason."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from dataclasses import replace
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from embassy.attest.types import ClockInfo, TpmMode
from embassy.daemon.runtime import Embassy
from embassy.errors import (
    CertificateError,
    ClockError,
    FreshnessError,
    LogIntegrityError,
    MeasurementMismatchError,
    PcrMismatchError,
    QuoteError,
    SignatureError,
    SoftwareTpmError,
)
from embassy.log.entry import (
    GENESIS,
    EntryType,
    checkpoint_qualifying_data,
    encode_entry,
    quote_to_json,
)
from embassy.log.event import EVENT_PAYLOAD_TYPE, encode_event
from embassy.log.segment import parse_segment
from embassy.verify.identity import VerifiedIdentity, verify_identity_document
from embassy.verify.policy import TrustPolicy
from embassy.verify.report import verify_segments
from embassy.verify.segment import VerifiedSegment, verify_segment
from embassy.wire.codec import b64encode, canonical_json
from embassy.wire.dsse import parse_envelope, raw_public_key, sign_envelope, verify_envelope
from embassy.wire.statement import LIFECYCLE_V1, Header, Statement, embassy_subject
from tests.fakes import FakeTpm
from tests.unit.conftest import policy_for

Doc = dict[str, Any]


# -- helpers ------------------------------------------------------------------------------


def identity(embassy: Embassy, policy: TrustPolicy) -> VerifiedIdentity:
    return verify_identity_document(canonical_json(embassy.identity_document()), policy)


def check_doc(doc: Doc, policy: TrustPolicy) -> VerifiedIdentity:
    return verify_identity_document(canonical_json(doc), policy)


def check_log(segment_file: Doc, ident: VerifiedIdentity) -> VerifiedSegment:
    return verify_segment(
        parse_segment(segment_file["segment"]), ident.segment_keys, allow_software_tpm=True
    )


def with_statements(embassy: Embassy, count: int = 5) -> list[bytes]:
    """Append ``count`` lifecycle statements (seq 2.. on a fresh embassy)."""
    return [
        embassy.log.append_statement(LIFECYCLE_V1, [], {"event": "test", "n": n}).envelope
        for n in range(count)
    ]


def raw_entries(segment_file: Doc) -> list[bytes]:
    return [base64.b64decode(e) for e in segment_file["segment"]["entries"]]


def with_entries(segment_file: Doc, entries: list[bytes]) -> Doc:
    out = copy.deepcopy(segment_file)
    out["segment"]["entries"] = [b64encode(e) for e in entries]
    return out


def rechain(entries: list[bytes], from_index: int) -> list[bytes]:
    """Renumber and re-link entries from ``from_index`` on, as an attacker would."""
    out = entries[:from_index]
    for raw in entries[from_index:]:
        obj = json.loads(raw)
        obj["seq"] = json.loads(out[-1])["seq"] + 1
        obj["prev"] = hashlib.sha256(out[-1]).hexdigest()
        out.append(canonical_json(obj))
    return out


def signed(
    key: Ed25519PrivateKey, *, seq: int, prev: bytes, clock_ms: int, reset_count: int = 1
) -> bytes:
    header = Header(seq, prev, ClockInfo(clock_ms, reset_count, 0, True), TpmMode.SOFTWARE)
    subject = (embassy_subject(raw_public_key(key.public_key())),)
    return sign_envelope(Statement(LIFECYCLE_V1, subject, header, {"event": "x"}).encode(), key)


def start_event(embassy: Embassy) -> bytes:
    """The embassy-start event at seq 0 as the embassy signs it (events are signed too)."""
    payload = encode_event(EntryType.EMBASSY_START.value, 0, GENESIS, embassy.measurement.to_json())
    return sign_envelope(payload, embassy.keys.signing, EVENT_PAYLOAD_TYPE)


def forge(tpm: FakeTpm, start: bytes, envelopes: list[bytes], quote_ms: int = 10_000) -> Doc:
    """A boot's log (start event, then ``envelopes``) extended into ``tpm`` and closed by a
    genuine checkpoint quote: what an attacker who can extend and quote the TPM produces."""
    items = [(EntryType.EMBASSY_START, 13, start)]
    items += [(EntryType.STATEMENT, 14, env) for env in envelopes]
    prev, entries = GENESIS, []
    for seq, (kind, pcr, data) in enumerate(items):
        entry = encode_entry(
            seq=seq, prev=prev, reset_count=tpm.reset_count, pcr=pcr, type=kind, data=data
        )
        tpm.extend(pcr, entry.digest)
        entries.append(entry)
        prev = entry.digest
    tpm.ms = quote_ms
    head = entries[-1]
    quote = tpm.quote((4, 11, 12, 13, 14), checkpoint_qualifying_data(head.seq, head.digest))
    return {
        "v": 1,
        "type": "embassy-log-segment",
        "segment": {
            "v": 1,
            "anchor": None,
            "entries": [b64encode(e.raw) for e in entries],
            "head": {"v": 1, "seq": head.seq, "head": head.digest.hex(), **quote_to_json(quote)},
        },
    }


def entry_digest(raw: bytes) -> bytes:
    return hashlib.sha256(raw).digest()


@pytest.fixture
def full_log(embassy: Embassy) -> Doc:
    """Entries 0 (start), 1 (identity), 2..6 (statements), closed by a checkpoint."""
    with_statements(embassy)
    return embassy.log_segment(0)


@pytest.fixture
def ident(embassy: Embassy, policy: TrustPolicy) -> VerifiedIdentity:
    return identity(embassy, policy)


# -- the untampered baseline ----------------------------------------------------------------


def test_untampered_log_verifies(full_log: Doc, ident: VerifiedIdentity) -> None:
    verified = check_log(full_log, ident)
    assert [e.seq for e in verified.entries] == list(range(7))
    assert [s.statement.body.get("n") for s in verified.statements] == [None, 0, 1, 2, 3, 4]


def test_anchored_segment_verifies(embassy: Embassy, ident: VerifiedIdentity) -> None:
    with_statements(embassy)  # seq 2..6, a checkpoint at seq 4
    segment_file = embassy.log_segment(5)
    assert segment_file["segment"]["anchor"]["seq"] == 4
    verified = check_log(segment_file, ident)
    assert [e.seq for e in verified.entries] == [5, 6]
    assert "anchor-quote" in verified.checks


# -- signatures ---------------------------------------------------------------------------


def test_changed_payload_byte_breaks_the_envelope_signature(embassy: Embassy) -> None:
    envelope = json.loads(with_statements(embassy, 1)[0])
    payload = base64.b64decode(envelope["payload"])
    envelope["payload"] = b64encode(payload.replace(b'"n":0', b'"n":1'))
    with pytest.raises(SignatureError, match="does not verify"):
        verify_envelope(parse_envelope(canonical_json(envelope)), embassy.keys.signing.public_key())


def test_changed_identity_payload_byte_breaks_its_signature(
    embassy: Embassy, policy: TrustPolicy
) -> None:
    doc = copy.deepcopy(embassy.identity_document())
    entries = doc["segment"]["entries"]
    entry = json.loads(base64.b64decode(entries[-1]))
    envelope = json.loads(base64.b64decode(entry["data"]))
    payload = base64.b64decode(envelope["payload"])
    envelope["payload"] = b64encode(payload.replace(b'"embassy"', b'"embasy!"', 1))
    entry["data"] = b64encode(canonical_json(envelope))
    entries[-1] = b64encode(canonical_json(entry))
    with pytest.raises(SignatureError, match="does not verify"):
        check_doc(doc, policy)


def test_envelope_signed_by_another_key(embassy: Embassy) -> None:
    envelope = parse_envelope(with_statements(embassy, 1)[0])
    other = Ed25519PrivateKey.from_private_bytes(bytes(32))
    forged = parse_envelope(sign_envelope(envelope.payload, other))
    with pytest.raises(SignatureError, match="carries no signature by key"):
        verify_envelope(forged, embassy.keys.signing.public_key())


def test_statement_by_another_key_in_a_replayed_log(
    embassy: Embassy, ident: VerifiedIdentity
) -> None:
    attacker = FakeTpm(b"seed")  # the same TPM, in a boot the attacker drives
    other = Ed25519PrivateKey.from_private_bytes(bytes(32))
    start = encode_entry(
        seq=0, prev=GENESIS, reset_count=1, pcr=13, type=EntryType.EMBASSY_START,
        data=start_event(embassy),
    )  # fmt: skip
    forged = forge(
        attacker, start_event(embassy), [signed(other, seq=1, prev=start.digest, clock_ms=2000)]
    )
    with pytest.raises(SignatureError, match="carries no signature by key"):
        check_log(forged, ident)


# -- quotes and PCRs ------------------------------------------------------------------------


def test_quote_swapped_from_another_document(
    make_embassy: Any, tpm: FakeTpm, policy: TrustPolicy
) -> None:
    first = make_embassy(tpm)
    doc = copy.deepcopy(first.identity_document())
    make_embassy.crash(first)
    second = make_embassy(tpm)  # same TPM and AK, another identity statement
    doc["segment"]["head"]["quote"] = second.identity_document()["segment"]["head"]["quote"]
    with pytest.raises(QuoteError, match=r"qualifying data is .* expected"):
        check_doc(doc, policy)


def test_pcr_value_altered_in_the_quote(embassy: Embassy, policy: TrustPolicy) -> None:
    doc = copy.deepcopy(embassy.identity_document())
    doc["segment"]["head"]["quote"]["pcrs"]["14"] = "ab" * 32
    with pytest.raises(PcrMismatchError, match="do not hash to its pcrDigest"):
        check_doc(doc, policy)


def test_forged_log_replays_to_other_pcrs(full_log: Doc, ident: VerifiedIdentity) -> None:
    """An attacker who re-chains a changed entry and its successors, and moves the closing
    checkpoint's seq/head along, still cannot make the quoted PCRs match."""
    entries = raw_entries(full_log)
    obj = json.loads(entries[6])
    obj["data"] = b64encode(base64.b64decode(obj["data"]) + b" ")
    entries[6] = canonical_json(obj)
    forged = with_entries(full_log, entries)
    forged["segment"]["head"]["head"] = entry_digest(entries[6]).hex()
    with pytest.raises(QuoteError, match="qualifying data"):
        check_log(forged, ident)


# -- the log's order ------------------------------------------------------------------------


def test_forged_entry_inserted(full_log: Doc, ident: VerifiedIdentity, embassy: Embassy) -> None:
    entries = raw_entries(full_log)
    fake = signed(embassy.keys.signing, seq=4, prev=entry_digest(entries[3]), clock_ms=1)
    forged = json.loads(entries[4])
    forged["data"] = b64encode(fake)
    entries = rechain([*entries[:4], canonical_json(forged), *entries[4:]], 4)
    with pytest.raises(LogIntegrityError, match="dropped from or added to its end"):
        check_log(with_entries(full_log, entries), ident)


def test_dropped_entry_in_the_middle(full_log: Doc, ident: VerifiedIdentity) -> None:
    entries = raw_entries(full_log)
    with pytest.raises(LogIntegrityError, match="entry seq 4 follows seq 2: 1 entries missing"):
        check_log(with_entries(full_log, entries[:3] + entries[4:]), ident)


def test_dropped_last_entry(full_log: Doc, ident: VerifiedIdentity) -> None:
    entries = raw_entries(full_log)
    with pytest.raises(
        LogIntegrityError, match=r"closing quote is for entry seq 6.* ends at seq 5"
    ):
        check_log(with_entries(full_log, entries[:-1]), ident)


def test_reordered_entries(full_log: Doc, ident: VerifiedIdentity) -> None:
    entries = raw_entries(full_log)
    swapped = [*entries[:3], entries[4], entries[3], *entries[5:]]
    with pytest.raises(LogIntegrityError, match="entry seq 4 follows seq 2"):
        check_log(with_entries(full_log, swapped), ident)


def test_reordered_entries_renumbered(full_log: Doc, ident: VerifiedIdentity) -> None:
    """Swap two entries and renumber/re-link everything: the chain is whole, but the
    last entry's digest no longer matches the closing checkpoint."""
    entries = raw_entries(full_log)
    swapped = rechain([*entries[:3], entries[4], entries[3], *entries[5:]], 3)
    # Same seq, another entry: the message names the digest, not the seq, as what differs.
    with pytest.raises(
        LogIntegrityError,
        match=r"head\.head: the closing quote is for entry seq 6 with digest [0-9a-f]{64}, "
        r"but the segment's entry seq 6 has digest [0-9a-f]{64}",
    ):
        check_log(with_entries(full_log, swapped), ident)


def test_duplicated_entry(full_log: Doc, ident: VerifiedIdentity) -> None:
    entries = raw_entries(full_log)
    with pytest.raises(LogIntegrityError, match=r"entry seq 3 appears twice \(duplicate\)"):
        check_log(with_entries(full_log, [*entries[:4], entries[3], *entries[4:]]), ident)


def test_changed_statement_breaks_the_chain(full_log: Doc, ident: VerifiedIdentity) -> None:
    entries = raw_entries(full_log)
    obj = json.loads(entries[3])
    envelope = json.loads(base64.b64decode(obj["data"]))
    payload = base64.b64decode(envelope["payload"])
    assert b'"n":1' in payload
    envelope["payload"] = b64encode(payload.replace(b'"n":1', b'"n":9'))
    obj["data"] = b64encode(canonical_json(envelope))
    entries[3] = canonical_json(obj)
    with pytest.raises(LogIntegrityError, match="seq 4 does not chain to its predecessor"):
        check_log(with_entries(full_log, entries), ident)


def test_statement_moved_to_another_position(embassy: Embassy, ident: VerifiedIdentity) -> None:
    """Statements signed for positions 1 and 2, swapped by an attacker who re-chains and
    extends the TPM to match: only the position signed into each statement catches it."""
    key = embassy.keys.signing
    start = encode_entry(
        seq=0, prev=GENESIS, reset_count=1, pcr=13, type=EntryType.EMBASSY_START,
        data=start_event(embassy),
    )  # fmt: skip
    first = signed(key, seq=1, prev=start.digest, clock_ms=2000)
    first_entry = encode_entry(
        seq=1, prev=start.digest, reset_count=1, pcr=14, type=EntryType.STATEMENT, data=first
    )
    second = signed(key, seq=2, prev=first_entry.digest, clock_ms=3000)
    honest = forge(FakeTpm(b"seed"), start_event(embassy), [first, second])
    assert len(check_log(honest, ident).statements) == 2  # the forging itself is sound
    moved = forge(FakeTpm(b"seed"), start_event(embassy), [second, first])
    with pytest.raises(LogIntegrityError, match="signed for log position 2 sits at seq 1"):
        check_log(moved, ident)


def test_statement_signed_after_another_entry(embassy: Embassy, ident: VerifiedIdentity) -> None:
    """Signed for seq 1 after another predecessor (from another log): the seq matches, so
    the message names the digest it was signed to follow, and the one it follows."""
    start = encode_entry(
        seq=0, prev=GENESIS, reset_count=1, pcr=13, type=EntryType.EMBASSY_START,
        data=start_event(embassy),
    )  # fmt: skip
    elsewhere = signed(embassy.keys.signing, seq=1, prev=b"\x07" * 32, clock_ms=2000)
    moved = forge(FakeTpm(b"seed"), start_event(embassy), [elsewhere])
    with pytest.raises(
        LogIntegrityError,
        match=f"log.prev: entry seq 1 was signed to follow an entry with digest {'07' * 32}, "
        f"but the entry before it has digest {start.digest.hex()}",
    ):
        check_log(moved, ident)


# -- clocks ----------------------------------------------------------------------------------


def _clock_log(embassy: Embassy, clocks: list[int], quote_ms: int) -> Doc:
    key, prev = embassy.keys.signing, None
    envelopes = []
    start = encode_entry(
        seq=0, prev=GENESIS, reset_count=1, pcr=13, type=EntryType.EMBASSY_START,
        data=start_event(embassy),
    )  # fmt: skip
    prev = start.digest
    for seq, ms in enumerate(clocks, start=1):
        env = signed(key, seq=seq, prev=prev, clock_ms=ms)
        envelopes.append(env)
        prev = encode_entry(
            seq=seq, prev=prev, reset_count=1, pcr=14, type=EntryType.STATEMENT, data=env
        ).digest
    return forge(FakeTpm(b"seed"), start_event(embassy), envelopes, quote_ms)


def test_clock_going_backwards(embassy: Embassy, ident: VerifiedIdentity) -> None:
    assert check_log(_clock_log(embassy, [1500, 1600], 5000), ident)
    with pytest.raises(ClockError, match=r"went backwards \(1500 ms -> 1200 ms\)"):
        check_log(_clock_log(embassy, [1500, 1200], 5000), ident)


def test_statement_dated_after_its_closing_quote(embassy: Embassy, ident: VerifiedIdentity) -> None:
    with pytest.raises(ClockError, match="dated after the quote"):
        check_log(_clock_log(embassy, [1500, 1600], 1550), ident)


def test_statement_claims_another_boot(embassy: Embassy, ident: VerifiedIdentity) -> None:
    start = encode_entry(
        seq=0, prev=GENESIS, reset_count=1, pcr=13, type=EntryType.EMBASSY_START,
        data=start_event(embassy),
    )  # fmt: skip
    env = signed(embassy.keys.signing, seq=1, prev=start.digest, clock_ms=2000, reset_count=7)
    with pytest.raises(ClockError, match="claims TPM boot 7 but its entry is in boot 1"):
        check_log(forge(FakeTpm(b"seed"), start_event(embassy), [env]), ident)


# -- identity policy ----------------------------------------------------------------------


def test_wrong_measurement(embassy: Embassy, policy: TrustPolicy) -> None:
    wrong = hashlib.sha256(b"another build").digest()
    with pytest.raises(MeasurementMismatchError, match=f"expected {wrong.hex()}"):
        identity(embassy, replace(policy, expected_measurement=wrong))


def test_no_expected_measurement(embassy: Embassy, policy: TrustPolicy) -> None:
    with pytest.raises(MeasurementMismatchError, match="no expected measurement"):
        identity(embassy, replace(policy, expected_measurement=None))


def test_stale_nonce(embassy: Embassy, ident: VerifiedIdentity) -> None:
    evidence = embassy.evidence(b"\x01" * 32)
    segment = parse_segment(evidence["segment"])
    fresh = verify_segment(
        segment,
        ident.segment_keys,
        expected_qualifying_data=b"\x01" * 32,
        freshness_error=FreshnessError,
        allow_software_tpm=True,
    )
    assert fresh.entries[-1].seq == 1
    with pytest.raises(FreshnessError, match="qualifying data is 0101"):
        verify_segment(
            segment,
            ident.segment_keys,
            expected_qualifying_data=b"\x02" * 32,
            freshness_error=FreshnessError,
            allow_software_tpm=True,
        )


def test_ek_certificate_from_another_ca(make_embassy: Any, policy: TrustPolicy) -> None:
    other = make_embassy(FakeTpm(b"another seed"), name="other")
    with pytest.raises(CertificateError, match="does not verify with any trusted certificate"):
        identity(other, policy)


def test_no_ek_ca_given(embassy: Embassy, policy: TrustPolicy) -> None:
    with pytest.raises(CertificateError, match="no EK CA certificate given"):
        identity(embassy, replace(policy, ek_cas=(), software_ek_cas=()))


def test_software_tpm_without_allow(embassy: Embassy, policy: TrustPolicy) -> None:
    with pytest.raises(SoftwareTpmError, match="made with a software TPM"):
        identity(embassy, replace(policy, allow_software_tpm=False))


def test_hardware_evidence_needs_pinned_boot_pcrs(make_embassy: Any) -> None:
    tpm = FakeTpm(b"hw", mode=TpmMode.HARDWARE)
    hardware = make_embassy(tpm, name="hw")
    policy = policy_for(tpm, allow_software_tpm=False)
    with pytest.raises(PcrMismatchError, match="no boot PCRs pinned"):
        identity(hardware, policy)
    with pytest.raises(PcrMismatchError, match="PCR 4 is 0000"):
        identity(hardware, replace(policy, expected_pcrs={4: b"\x01" * 32}))
    pinned = identity(hardware, replace(policy, expected_pcrs={4: bytes(32), 12: bytes(32)}))
    assert "boot-pcrs" in pinned.checks
    assert "boot-pcrs" not in identity(hardware, replace(policy, insecure_any_boot=True)).checks


# -- restarts and TPM resets ----------------------------------------------------------------


def test_segment_across_a_restart_in_one_boot(
    make_embassy: Any, tpm: FakeTpm, policy: TrustPolicy
) -> None:
    first = make_embassy(tpm)
    with_statements(first, 2)
    make_embassy.crash(first)
    second = make_embassy(tpm)
    with_statements(second, 2)
    ident = identity(second, policy)
    verified = check_log(second.log_segment(0), ident)
    kinds = [e.type for e in verified.entries]
    assert kinds.count(EntryType.EMBASSY_START) == 2
    assert [e.seq for e in verified.entries] == list(range(8))
    assert verified.reset_count == 1


def _two_boots(make_embassy: Any, tpm: FakeTpm) -> tuple[Embassy, Doc, Doc]:
    first = make_embassy(tpm)
    with_statements(first, 2)
    boot1 = first.log_segment(0)
    make_embassy.crash(first)
    tpm.reset()
    second = make_embassy(tpm)
    with_statements(second, 1)
    return second, boot1, second.log_segment(0)


def test_segments_across_a_tpm_reset_chain(
    make_embassy: Any, tpm: FakeTpm, policy: TrustPolicy
) -> None:
    second, boot1, boot2 = _two_boots(make_embassy, tpm)
    ident = identity(second, policy)
    segments = [parse_segment(boot1["segment"]), parse_segment(boot2["segment"])]
    verified = verify_segments(segments, ident, policy)
    assert [v.reset_count for v in verified] == [1, 2]
    assert verified[1].entries[0].prev == verified[0].entries[-1].digest
    with pytest.raises(LogIntegrityError, match="out of order"):
        verify_segments(segments[::-1], ident, policy)


def test_segment_of_boot_1_with_a_quote_from_boot_2(
    make_embassy: Any, tpm: FakeTpm, policy: TrustPolicy
) -> None:
    second, boot1, _ = _two_boots(make_embassy, tpm)
    ident = identity(second, policy)
    head = parse_segment(boot1["segment"]).head
    later = tpm.quote((4, 11, 12, 13, 14), checkpoint_qualifying_data(head.seq, head.head))
    forged = copy.deepcopy(boot1)
    forged["segment"]["head"].update(quote_to_json(later))
    with pytest.raises(LogIntegrityError, match=r"boot\(s\) \[1\] but the quote is from boot 2"):
        check_log(forged, ident)
