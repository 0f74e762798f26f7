"""An in-process embassy with a (fake) workload: its identity shows launch events."""

from __future__ import annotations

import pytest

from embassy.daemon.runtime import Embassy
from tests.fakes import FakeSealedWorkload, FakeTpm, FakeWorkloadRuntime
from tests.unit.conftest import EmbassyFactory

WORKLOAD = {"name": "answerer", "image": "example/answerer:1"}


def start_with_workload(
    make_embassy: EmbassyFactory, tpm: FakeTpm, name: str = "embassy", **workload: object
) -> Embassy:
    with FakeWorkloadRuntime():
        return make_embassy(tpm, name, extra={"workload": {**WORKLOAD, **workload}})


def sealed_workload(embassy: Embassy) -> FakeSealedWorkload:
    assert isinstance(embassy.workload, FakeSealedWorkload)
    return embassy.workload


@pytest.fixture
def workload_embassy(make_embassy: EmbassyFactory, tpm: FakeTpm) -> Embassy:
    return start_with_workload(make_embassy, tpm)
