"""The gate's order of steps and what it does with a flip that failed, on fakes.

The fake layer 3 runs a flip at once, in the order the netns worker would (``before``,
the rules, ``then``), and hands back its outcome as a future; the fake link records the
host end's state and can be told to fail. The real kernel is in tests/integration.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import cast

import pytest

from embassy.errors import SealError
from embassy.net.identity import NetnsId
from embassy.net.link import WorkloadLink
from embassy.net.plan import LinkPlan
from embassy.net.rtnl import Rtnl
from embassy.seal.gate import Gate
from embassy.seal.iptables import IptablesL3

LINK = WorkloadLink(
    netns_fd=-1,
    netns=NetnsId(1, 4026532000),
    host_index=7,
    plan=LinkPlan(
        host_name="ewtest",
        bridge="ebtest",
        mtu=None,
        ipv4=ipaddress.IPv4Interface("10.9.8.254/24"),
        gateway4=ipaddress.IPv4Address("10.9.8.1"),
    ),
)


class Kernel:
    """The host end and the layer-3 jumps as the kernel would hold them, and each step."""

    def __init__(self) -> None:
        self.up = True
        self.jumps = False
        self.steps: list[str] = []
        self.refuse_up = False

    # Rtnl
    def set_up(self, index: int, up: bool) -> None:
        if up and self.refuse_up:
            raise OSError(errno.EBUSY, "Device or resource busy")
        self.steps.append("link up" if up else "link down")
        self.up = up

    # IptablesL3
    def submit_flip(
        self,
        netns: Path,
        *,
        sealed: bool,
        before: Callable[[], None] | None = None,
        then: Callable[[], None] | None = None,
    ) -> Future[None]:
        done: Future[None] = Future()
        try:
            if before is not None:
                before()
            self.steps.append("jumps in" if sealed else "jumps out")
            self.jumps = sealed
            if then is not None:
                then()
        except BaseException as exc:
            done.set_exception(exc)
        else:
            done.set_result(None)
        return done


@pytest.fixture
def kernel() -> Kernel:
    return Kernel()


@pytest.fixture
def gate(kernel: Kernel) -> Gate:
    return Gate(cast(Rtnl, kernel), cast(IptablesL3, kernel))


def test_closing_takes_the_link_down_first_and_opening_brings_it_up_last(
    gate: Gate, kernel: Kernel
) -> None:
    gate.close(LINK)
    gate.open(LINK)
    assert kernel.steps == ["link down", "jumps in", "jumps out", "link up"]


def test_a_failed_opening_is_raised_to_whoever_settles_it(gate: Gate, kernel: Kernel) -> None:
    gate.close(LINK)
    kernel.refuse_up = True
    gate.begin_open(LINK)
    with pytest.raises(SealError, match="cannot open the link ewtest"):
        gate.settle()
    assert not kernel.up, "a failed opening leaves the link down: fail closed"


def test_a_failed_opening_does_not_fail_the_next_close(
    gate: Gate, kernel: Kernel, caplog: pytest.LogCaptureFixture
) -> None:
    gate.close(LINK)
    kernel.refuse_up = True
    gate.begin_open(LINK)  # a session's close: nobody waits for it
    with caplog.at_level(logging.ERROR, logger="embassy.seal.gate"):
        gate.close(LINK)  # the next session's seal
    assert "an earlier opening failed" in caplog.text
    assert (kernel.up, kernel.jumps) == (False, True)


def test_a_failed_close_is_raised_by_the_next_flip(gate: Gate, kernel: Kernel) -> None:
    def refuse(index: int, up: bool) -> None:
        raise OSError(errno.ENODEV, "No such device")

    kernel.set_up = refuse  # type: ignore[method-assign]
    gate.begin_close(LINK)
    with pytest.raises(SealError, match="cannot close the link ewtest"):
        gate.begin_close(LINK)
