"""Which entries a log segment holds: from the nearest stored checkpoint of the current TPM
boot before the position asked for, else from the boot's first entry, to the head.

Checked against a reference computed the slow, obvious way over the files themselves,
for every position, on a log of two boots whose checkpoints fall at irregular places.
"""

from __future__ import annotations

from embassy.daemon.runtime import Embassy
from embassy.log.entry import parse_checkpoint_bytes, parse_entry
from embassy.log.segment import parse_segment
from embassy.wire.statement import LIFECYCLE_V1
from tests.fakes import FakeTpm
from tests.unit.conftest import EmbassyFactory


def _append(embassy: Embassy, n: int) -> None:
    embassy.log.append_statement(LIFECYCLE_V1, [], {"event": "test", "n": n})


def _expected_start(embassy: Embassy, from_seq: int) -> tuple[int | None, int]:
    """(anchor seq or None, first seq of the segment), from the files alone."""
    data_dir = embassy.config.data_dir
    entries = [parse_entry(x) for x in (data_dir / "log.jsonl").read_bytes().splitlines()]
    checkpoints = [
        parse_checkpoint_bytes(x)
        for x in (data_dir / "checkpoints.jsonl").read_bytes().splitlines()
    ]
    boot = [e for e in entries if e.reset_count == entries[-1].reset_count]
    in_boot = {e.seq: e for e in boot}
    anchors = [
        cp.seq
        for cp in checkpoints
        if cp.seq in in_boot and in_boot[cp.seq].digest == cp.head and cp.seq < from_seq
    ]
    if anchors:
        return max(anchors), max(anchors) + 1
    return None, boot[0].seq


def test_a_segment_starts_after_the_nearest_checkpoint_of_the_current_boot(
    make_embassy: EmbassyFactory, tpm: FakeTpm
) -> None:
    first = make_embassy(tpm, checkpoint_every=3)
    for n in range(11):
        _append(first, n)
    make_embassy.crash(first)
    tpm.reset()
    second = make_embassy(tpm, checkpoint_every=4)
    for n in range(13):
        _append(second, n)
        if n == 5:
            second.log.checkpoint()
    head = second.log.log_segment(0).head.seq  # a checkpoint at the head: none made after
    for from_seq in range(head + 2):
        segment = parse_segment(second.log_segment(from_seq)["segment"])
        anchor, start = _expected_start(second, from_seq)
        assert (None if segment.anchor is None else segment.anchor.seq) == anchor, from_seq
        assert [e.seq for e in segment.entries] == list(range(start, head + 1)), from_seq
