"""The report model: built from what the verifier proved, and saying what it did not."""

from __future__ import annotations

import base64
import dataclasses
import hashlib

import pytest

from embassy.audit import Report, audit_report, build_report, open_log_readings
from embassy.errors import EmbassyError
from embassy.metering.reading import Reading
from embassy.wire.dsse import keyid
from tests.unit.audit.conftest import AUTHORITY, HOSTILE, RichLog, load_vector


def _not_proved(report: Report) -> str:
    return "\n".join(report.not_proved)


def test_good_log_vector_header_and_rows() -> None:
    v = load_vector("good-log")
    log, report = audit_report(v.verifier, v.identity, v.segments)
    h = report.verified
    assert h.embassy_keyid == keyid(v.identity.signing_key)
    assert h.measurement == v.spec["expected_measurement"]
    assert (h.first_seq, h.last_seq, h.tpm_kind) == (0, 6, "software")
    assert h.ak_certified
    assert not h.complete
    assert h.log_checks == log.checks
    assert [r.seq for r in report.statements] == [1, 2, 3, 4, 5, 6]
    assert [r.kind for r in report.statements] == ["identity:v1"] + ["lifecycle:v1"] * 5
    assert ("event", "test") in report.statements[1].fields
    assert "PCR replay to the quote at seq 6" in report.statements[0].verified
    text = _not_proved(report)
    assert "The log may go on after seq 6" in text
    assert "software TPM" in text
    assert "Meter values are not shown" in text
    # An unanchored segment from seq 0 is the whole log's start: nothing earlier to disclaim.
    assert "Entries before" not in text
    assert "Earlier TPM boots" not in text
    assert report.restarts[0].seq == 0
    assert report.restarts[0].kind == "embassy start"


def test_complete_vector_is_said_complete() -> None:
    v = load_vector("good-log-complete")
    evidence = v.verifier.evidence(
        v.identity,
        base64.b64decode(v.inputs["evidence_b64"]),
        bytes.fromhex(v.spec["nonce"]),
    )
    _, report = audit_report(v.verifier, v.identity, v.segments, complete_with=evidence)
    assert report.verified.complete
    assert "may go on" not in _not_proved(report)
    assert all("log complete to its head" in r.verified for r in report.statements)


def test_anchored_vector_says_earlier_entries_are_not_shown() -> None:
    v = load_vector("good-log-anchored")
    _, report = audit_report(v.verifier, v.identity, v.segments)
    assert report.verified.segments[0].anchored
    first = report.verified.first_seq
    assert first > 0
    assert f"Entries before seq {first} are not shown" in _not_proved(report)


def test_restart_and_two_boot_vectors() -> None:
    v = load_vector("good-log-restart")
    _, report = audit_report(v.verifier, v.identity, v.segments)
    assert [(r.seq, r.kind) for r in report.restarts] == [
        (0, "embassy start"),
        (7, "embassy start"),
    ]
    two = load_vector("good-log-two-boots")
    _, report = audit_report(two.verifier, two.identity, two.segments)
    boots = [s.boot for s in report.verified.segments]
    assert len(boots) == 2
    assert boots[0] < boots[1]


def test_a_tampered_vector_raises_before_any_model() -> None:
    v = load_vector("bad-log-statement-changed")
    with pytest.raises(EmbassyError):
        audit_report(v.verifier, v.identity, v.segments)


def test_rich_log_sessions_jobs_releases_meters_rejections(rich: RichLog) -> None:
    _, report = audit_report(rich.verifier, rich.identity, [rich.segment])
    ours = [w for w in report.workloads if w.is_identity_workload]
    assert len(ours) == 1
    by_id = {s.session: s for s in ours[0].sessions}
    done = by_id[rich.sessions["unsealed"]]
    assert done.outcome == "unsealed"
    assert done.end_names_seal
    assert done.output_sha256 == hashlib.sha256(b"out").hexdigest()
    assert done.tpm_ms is not None
    assert done.tpm_ms >= 0
    aborted = by_id[rich.sessions["aborted"]]
    assert (aborted.outcome, aborted.reason) == ("aborted", "intrusion")
    still = by_id[rich.sessions["open"]]
    assert still.outcome == "open at the end of the proved log"
    assert still.ended is None
    assert [r.seq for r in report.restarts if r.kind == "workload launch"]

    jobs = [j for w in report.workloads for j in w.jobs]
    assert [(j.job, j.outcome) for j in jobs] == [("0123456789abcdef", "destroyed")]
    assert ("container", "inspect-404") in jobs[0].checked_gone

    assert [(r.decision, r.model_id, r.decision_id) for r in report.releases] == [
        ("released", "minilm", "d-1"),
        ("denied", "other", "d-2"),
    ]
    assert report.releases[0].tenant == HOSTILE  # kept as data; the renderer escapes it
    assert report.releases[1].reason == "policy-denied"

    counts: dict[str, int] = {}
    for p in report.meter_updates:
        assert p.authority == AUTHORITY
        assert p.session == rich.sessions["aborted"]
        counts[p.capability] = counts.get(p.capability, 0) + 1
    assert counts == {"cap-a": 2, "cap-b": 2}

    kinds = [r.kind for r in report.rejections]
    assert kinds == [
        "weights key denied",
        "activation files rejected",
        "instructions refused",
        "session aborted",
    ]
    assert report.rejections[1].codes == (("activation-corrupt", 2),)
    assert report.readings == ()  # no authority key given


def test_readings_open_only_with_the_authority_key(rich: RichLog) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    _, report = audit_report(
        rich.verifier, rich.identity, [rich.segment], authority_key=rich.authority_key
    )
    values = {(p.capability, p.value, p.count) for p in report.readings}
    assert values == {("cap-a", 1_500_000, 2), ("cap-b", 250_000, 2)}
    assert "Meter values are not shown" not in _not_proved(report)

    _, other = audit_report(
        rich.verifier, rich.identity, [rich.segment], authority_key=Ed25519PrivateKey.generate()
    )
    assert other.readings == ()
    assert "for another authority" in _not_proved(other)


def test_a_reading_file_outside_the_log_is_not_shown(rich: RichLog) -> None:
    log = rich.log()
    opened = open_log_readings(
        rich.identity,
        log,
        rich.authority_key,
        [("kept.json", rich.reading_envelope), ("stray.json", rich.reading_envelope + b" ")],
    )
    assert len(opened.readings) == 1
    assert any("stray.json is not a meter-reading statement" in n for n in opened.notes)
    report = build_report(rich.identity, log, opened.readings, opened.notes)
    assert "stray.json" in _not_proved(report)


def test_build_report_refuses_a_reading_not_from_the_log(rich: RichLog) -> None:
    log = rich.log()
    opened = open_log_readings(rich.identity, log, rich.authority_key)
    reading = opened.readings[0]
    assert reading.header is not None
    moved: Reading = dataclasses.replace(
        reading, header=dataclasses.replace(reading.header, seq=reading.header.seq - 1)
    )
    with pytest.raises(ValueError, match="not a meter-reading statement of the log"):
        build_report(rich.identity, log, [moved])
