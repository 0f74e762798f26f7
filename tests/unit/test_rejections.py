"""The rejection ledger: a bounded number of summaries per session, exact totals."""

from __future__ import annotations

from embassy.metering.rejections import RejectionLedger

S1, S2 = bytes(16), bytes([1]) * 16


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_flood_is_one_summary_per_interval_and_at_most_cap_plus_one() -> None:
    clock = Clock()
    ledger = RejectionLedger(interval=1.0, cap=3, clock=clock)
    emitted = []
    for second in range(10):
        for _ in range(1000):
            ledger.record(S1, "activation-corrupt", 10)
        for _ in range(4):  # many ticks a second
            emitted += ledger.due()
            clock.now += 0.25
        assert second < 3 or len(emitted) == 3
    assert [s.number for s in emitted] == [1, 2, 3]
    assert [s.files for s in emitted] == [1000, 1000, 1000]
    ledger.end(S1)
    [last] = ledger.due()
    assert (last.number, last.final, last.files, last.bytes) == (4, True, 7000, 70000)
    assert ledger.due() == []
    assert ledger.totals(S1) == ({}, 0)  # the bucket is gone once ended


def test_totals_are_exact_per_code_and_bytes() -> None:
    ledger = RejectionLedger(clock=Clock())
    ledger.record(S1, "activation-corrupt", 5)
    ledger.record(S1, "activation-truncated", 7)
    ledger.record(S1, "activation-corrupt", 1)
    ledger.record(None, "activation-foreign", 100)
    assert ledger.totals(S1) == ({"activation-corrupt": 2, "activation-truncated": 1}, 13)
    assert ledger.totals(None) == ({"activation-foreign": 1}, 100)
    assert ledger.totals(S2) == ({}, 0)
    first = {s.session: s for s in ledger.due()}
    assert first[S1].body() == {
        "session": S1.hex(),
        "counts": {"activation-corrupt": 2, "activation-truncated": 1},
        "files": 3,
        "bytes": 13,
        "summary": 1,
        "final": False,
    }
    assert first[None].body()["session"] is None
    assert ledger.totals(S1)[1] == 13  # summarising does not reset the totals


def test_nothing_new_nothing_stated_and_the_interval_is_the_ledgers() -> None:
    clock = Clock()
    ledger = RejectionLedger(interval=1.0, cap=60, clock=clock)
    assert ledger.due() == []
    ledger.record(S1, "activation-corrupt", 1)
    assert len(ledger.due()) == 1  # the first one at once
    ledger.record(S1, "activation-corrupt", 1)
    clock.now += 0.5
    assert ledger.due() == []  # within the interval: held
    clock.now += 0.5
    assert len(ledger.due()) == 1
    clock.now += 10
    assert ledger.due() == []  # nothing new


def test_final_states_every_bucket_whatever_the_cap() -> None:
    clock = Clock()
    ledger = RejectionLedger(interval=1.0, cap=1, clock=clock)
    ledger.record(None, "activation-foreign", 1)
    ledger.record(S2, "activation-corrupt", 1)
    assert len(ledger.due()) == 2
    ledger.record(None, "activation-foreign", 1)
    ledger.record(S2, "activation-corrupt", 1)
    clock.now += 5
    assert ledger.due() == []  # capped
    final = ledger.due(final=True)
    assert sorted((s.final, s.number) for s in final) == [(True, 2), (True, 2)]


def test_an_ended_bucket_without_news_still_closes_with_a_final_mark() -> None:
    """However the rejections fell into summaries, a summarised bucket's last one is final:
    an auditor who sees no final summary knows one is missing."""
    ledger = RejectionLedger(clock=Clock())
    ledger.record(S1, "activation-corrupt", 1)
    [first] = ledger.due()
    assert not first.final
    ledger.end(S1)
    ledger.end(S2)  # never seen: nothing to do
    [closing] = ledger.due()
    assert (closing.session, closing.final, closing.files, closing.number) == (S1, True, 0, 2)
    assert closing.body()["counts"] == {}
    assert ledger.due() == []
    assert ledger.totals(S1) == ({}, 0)


def test_a_bucket_never_summarised_ends_silently() -> None:
    ledger = RejectionLedger(clock=Clock())
    ledger.end(S1)
    assert ledger.due(final=True) == []
