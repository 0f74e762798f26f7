"""The seal keeper's decisions, on a fake link maker and gate that model the kernel's state.

The fakes record every call and keep, per link, what the kernel would hold: the host end
up or down and the layer-3 state. ``NetnsId.of_pid`` reads a table instead of /proc, and
the occupant scan runs on a fake /proc tree (tests/unit/seal/fakeproc.py).
"""

from __future__ import annotations

import functools
import ipaddress
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from embassy.errors import SealError
from embassy.net.identity import NetnsId
from embassy.net.link import WorkloadLink
from embassy.net.plan import LinkPlan
from embassy.seal import keeper as keeper_module
from embassy.seal.keeper import SealKeeper
from embassy.seal.occupants import find_occupants, still_there
from embassy.seal.proof import SealProof
from embassy.seal.rules import L3State, seal_rules
from tests.unit.seal.fakeproc import FakeProc

PLAN = LinkPlan(
    host_name="ewtest",
    bridge="ebtest",
    mtu=None,
    ipv4=ipaddress.IPv4Interface("10.9.8.254/24"),
    gateway4=ipaddress.IPv4Address("10.9.8.1"),
)
CONTAINER = "c0ffee" + "0" * 58
WORKLOAD_CGROUP = f"0::/docker/{CONTAINER}\n"
HOST_CGROUP = "0::/user.slice\n"


class FakeGate:
    """The kernel's state of each link, and the calls that changed it."""

    def __init__(self) -> None:
        self.up: dict[int, bool] = {}
        self.l3: dict[int, L3State] = {}
        self.calls: list[tuple[str, int]] = []

    def _flip(self, link: WorkloadLink, state: L3State) -> None:
        # IptablesL3.flip: the whole table replaced by the wanted one, whatever it held.
        self.l3[link.host_index] = state

    def close(self, link: WorkloadLink) -> None:
        self.calls.append(("close", link.host_index))
        self.up[link.host_index] = False
        self._flip(link, L3State.SEALED)

    def open(self, link: WorkloadLink) -> None:
        self.calls.append(("open", link.host_index))
        self._flip(link, L3State.OPEN)
        self.up[link.host_index] = True

    # The real gate queues its flips on the netns worker. With ``deferred`` set they wait
    # here for settle(), the way a flip on its way looks to whoever reads the kernel
    # meanwhile; otherwise they are done at once.
    deferred = False
    pending: tuple[tuple[str, WorkloadLink], ...] = ()

    def begin_close(self, link: WorkloadLink) -> None:
        if self.deferred:
            self.pending = (*self.pending, ("close", link))
        else:
            self.close(link)

    def begin_open(self, link: WorkloadLink) -> None:
        if self.deferred:
            self.pending = (*self.pending, ("open", link))
        else:
            self.open(link)

    def settle(self) -> None:
        pending, self.pending = self.pending, ()
        for what, link in pending:
            if what == "close":
                self.close(link)
            else:
                self.open(link)

    def link_up(self, link: WorkloadLink) -> bool:
        if link.host_index not in self.up:
            raise SealError(f"link {link.plan.host_name}: cannot read its state: No such device")
        return self.up[link.host_index]

    def l3_state(self, link: WorkloadLink) -> L3State:
        return self.l3[link.host_index]

    def opens(self) -> list[int]:
        return [index for call, index in self.calls if call == "open"]


class FakeMaker:
    """Makes links as LinkMaker does: layer-3 rules as ``sealed`` says, host end down."""

    def __init__(self, gate: FakeGate, namespaces: dict[int, NetnsId]) -> None:
        self._gate = gate
        self._namespaces = namespaces
        self._next = 100
        self.calls: list[tuple[str, object, object]] = []
        self.fail: Exception | None = None
        self.adopt_up = False  # the next attach adopts a link left up by a previous run

    def attach(self, pid: int, *, sealed: bool) -> WorkloadLink:
        self.calls.append(("attach", pid, sealed))
        if self.fail is not None:
            raise self.fail
        self._next += 1
        link = WorkloadLink(
            os.open(os.devnull, os.O_RDONLY), self._namespaces[pid], self._next, PLAN
        )
        self._gate.up[link.host_index] = self.adopt_up
        self._gate.l3[link.host_index] = L3State.SEALED if sealed else L3State.OPEN
        self.adopt_up = False
        return link

    def detach(self, link: WorkloadLink) -> None:
        self.calls.append(("detach", link.host_index, None))
        self._gate.up.pop(link.host_index, None)
        self._gate.l3.pop(link.host_index, None)
        os.close(link.netns_fd)

    def attached(self) -> list[tuple[object, object]]:
        return [(pid, sealed) for call, pid, sealed in self.calls if call == "attach"]


class World:
    """A keeper on the fakes, its namespaces and its /proc."""

    def __init__(self, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.proc = FakeProc(tmp)
        self.namespaces: dict[int, NetnsId] = {}
        self.gate = FakeGate()
        self.maker = FakeMaker(self.gate, self.namespaces)

        def of_pid(pid: int) -> NetnsId:
            if pid not in self.namespaces:
                raise FileNotFoundError(2, "No such file or directory")
            return self.namespaces[pid]

        monkeypatch.setattr(NetnsId, "of_pid", staticmethod(of_pid))
        monkeypatch.setattr(
            keeper_module, "find_occupants", functools.partial(find_occupants, proc=self.proc.root)
        )
        monkeypatch.setattr(
            keeper_module, "still_there", functools.partial(still_there, proc=self.proc.root)
        )
        self.keeper = SealKeeper(self.maker, self.gate, CONTAINER)  # type: ignore[arg-type]

    def start(self, pid: int, netns: str) -> None:
        """The workload (re)starts as ``pid`` in a namespace of its own."""
        self.namespaces[pid] = self.proc.netns(netns)
        self.proc.process(pid, netns, WORKLOAD_CGROUP)
        self.keeper.workload_started(pid)

    @property
    def link(self) -> WorkloadLink:
        link = self.keeper._link
        assert link is not None
        return link


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    w = World(tmp_path, monkeypatch)
    yield w
    w.keeper.close_all()


# -- fail closed ---------------------------------------------------------------------------------


def test_closed_until_told_open(world: World) -> None:
    assert world.keeper.closed
    world.start(10, "ns-a")
    assert world.maker.attached() == [(10, True)]
    assert world.gate.opens() == []
    assert world.gate.up[world.link.host_index] is False
    status = world.keeper.status()
    assert status["gate"] == "closed"
    assert status["sessions_want"] == "sealed"
    assert status["link_up"] is False
    assert status["l3"] == "sealed"
    assert status["key_release"] == "ready"


def test_open_opens_the_link(world: World) -> None:
    world.start(10, "ns-a")
    assert world.keeper.open() == "unsealed"
    assert world.gate.opens() == [world.link.host_index]
    assert world.gate.up[world.link.host_index] is True
    assert world.keeper.status()["gate"] == "open"
    proof = world.keeper.close()
    assert world.gate.up[world.link.host_index] is False
    assert proof == SealProof(world.link.netns, "ewtest", seal_rules().digest)
    world.keeper.check(proof)


def test_a_link_made_while_sealed_is_made_sealed_and_never_opened(world: World) -> None:
    world.start(10, "ns-a")
    world.keeper.open()
    world.keeper.close()
    opened = world.gate.opens()
    old = world.link
    world.start(11, "ns-b")  # the workload restarts: a new namespace
    assert world.maker.attached() == [(10, True), (11, True)]
    assert ("detach", old.host_index, None) in world.maker.calls
    assert world.gate.opens() == opened
    assert world.gate.up[world.link.host_index] is False


def test_a_link_made_while_open_is_opened(world: World) -> None:
    world.start(10, "ns-a")
    world.keeper.open()
    world.start(11, "ns-b")
    assert world.maker.attached() == [(10, True), (11, False)]
    assert world.gate.up[world.link.host_index] is True


def test_the_same_namespace_keeps_its_link(world: World) -> None:
    world.start(10, "ns-a")
    link = world.link
    world.namespaces[12] = world.namespaces[10]  # a new main process, same namespace
    world.keeper.workload_started(12)
    assert world.link is link
    assert world.maker.attached() == [(10, True)]


def test_a_link_adopted_up_while_sealed_is_closed(world: World) -> None:
    # A daemon restart adopts the link a previous run left up; the log says sealed.
    world.maker.adopt_up = True
    world.start(10, "ns-a")
    assert world.gate.up[world.link.host_index] is False
    world.keeper.check(world.keeper.close())


def test_a_failed_attach_leaves_no_release(world: World) -> None:
    world.maker.fail = SealError("the embassy's bridge ebtest does not exist")
    with pytest.raises(SealError):
        world.start(10, "ns-a")
    proof = world.keeper.close()
    assert proof.netns is None
    with pytest.raises(SealError, match="no link"):
        world.keeper.check(proof)


def test_a_stopped_workload_loses_its_link(world: World) -> None:
    world.start(10, "ns-a")
    sealed = world.keeper.close()
    index = world.link.host_index
    world.keeper.workload_stopped()
    assert ("detach", index, None) in world.maker.calls
    assert world.keeper._link is None
    with pytest.raises(SealError, match="not on the sealed"):
        world.keeper.check(sealed)
    world.keeper.check(world.keeper.close())  # nothing runs: nothing to leak


def test_no_network_at_all(world: World) -> None:
    keeper = SealKeeper(None, world.gate, CONTAINER)  # type: ignore[arg-type]
    keeper.workload_started(10)
    proof = keeper.close()
    assert proof.link is None
    assert proof.to_json()["gate"] == "no-link"
    keeper.check(proof)
    assert keeper.open() == "unsealed"
    assert world.gate.calls == []


# -- quarantine ----------------------------------------------------------------------------------


def test_quarantine_keeps_the_gate_closed_until_lifted(world: World) -> None:
    world.start(10, "ns-a")
    world.keeper.open()
    world.keeper.quarantine("container abc", "container abc joined the workload's network")
    index = world.link.host_index
    assert world.gate.up[index] is False
    assert world.keeper.closed
    opens = len(world.gate.opens())
    assert world.keeper.open() == "quarantined"  # the sessions ask to open
    assert len(world.gate.opens()) == opens
    assert world.gate.up[index] is False
    assert world.keeper.status()["quarantine"] == ["container abc joined the workload's network"]
    world.keeper.lift("container abc")
    assert world.gate.up[index] is True
    assert not world.keeper.closed


def test_every_quarantine_must_be_lifted(world: World) -> None:
    world.start(10, "ns-a")
    world.keeper.open()
    world.keeper.quarantine("a", "reason a")
    world.keeper.quarantine("b", "reason b")
    world.keeper.lift("a")
    assert world.gate.up[world.link.host_index] is False
    world.keeper.lift("nobody")
    assert world.gate.up[world.link.host_index] is False
    world.keeper.lift("b")
    assert world.gate.up[world.link.host_index] is True


def test_lifting_while_sealed_keeps_it_closed(world: World) -> None:
    world.start(10, "ns-a")
    world.keeper.quarantine("a", "reason a")
    world.keeper.lift("a")
    assert world.gate.opens() == []
    assert world.keeper.closed


def test_a_restart_while_quarantined_is_made_sealed(world: World) -> None:
    world.start(10, "ns-a")
    world.keeper.open()
    world.keeper.quarantine("a", "reason a")
    world.start(11, "ns-b")
    assert world.maker.attached()[-1] == (11, True)
    assert world.gate.up[world.link.host_index] is False


# -- check: what a key release asks --------------------------------------------------------------


def test_check_passes_when_sealed(world: World) -> None:
    world.start(10, "ns-a")
    world.keeper.check(world.keeper.close())


def test_check_refuses_an_open_gate(world: World) -> None:
    world.start(10, "ns-a")
    proof = world.keeper.close()
    world.keeper.open()
    with pytest.raises(SealError, match="open"):
        world.keeper.check(proof)


def test_check_refuses_a_quarantine(world: World) -> None:
    world.start(10, "ns-a")
    proof = world.keeper.close()
    world.keeper.quarantine("x", "someone is in the namespace")
    with pytest.raises(SealError, match="quarantined: someone is in the namespace"):
        world.keeper.check(proof)


def test_check_refuses_a_proof_of_another_namespace(world: World) -> None:
    world.start(10, "ns-a")
    proof = world.keeper.close()
    world.start(11, "ns-b")  # restarted after the seal: a new namespace, born sealed
    with pytest.raises(SealError, match="not on the sealed"):
        world.keeper.check(proof)
    world.keeper.check(world.keeper.close())
    other = SealProof(world.proc.netns("ns-c"), "ewtest", seal_rules().digest)
    with pytest.raises(SealError, match="not on the sealed"):
        world.keeper.check(other)


def test_check_refuses_a_link_that_is_up(world: World) -> None:
    world.start(10, "ns-a")
    proof = world.keeper.close()
    world.gate.up[world.link.host_index] = True  # set up behind the embassy's back
    with pytest.raises(SealError, match="ewtest is up"):
        world.keeper.check(proof)
    assert world.keeper.status()["key_release"].startswith("refused: the link ewtest is up")


def test_check_refuses_a_link_it_cannot_read(world: World) -> None:
    world.start(10, "ns-a")
    proof = world.keeper.close()
    del world.gate.up[world.link.host_index]  # deleted behind its back
    with pytest.raises(SealError, match="cannot read"):
        world.keeper.check(proof)


def test_check_refuses_a_workload_gone_or_moved(world: World) -> None:
    world.start(10, "ns-a")
    proof = world.keeper.close()
    world.namespaces[10] = world.proc.netns("elsewhere")
    with pytest.raises(SealError, match="not in the sealed"):
        world.keeper.check(proof)
    del world.namespaces[10]
    with pytest.raises(SealError, match="gone"):
        world.keeper.check(proof)


# -- verify: the monitor's rounds -----------------------------------------------------------------


def test_verify_closes_a_link_found_up_while_sealed(world: World) -> None:
    world.start(10, "ns-a")
    world.gate.up[world.link.host_index] = True
    findings = world.keeper.verify()
    assert world.gate.up[world.link.host_index] is False
    assert findings.intrusions == ["the link ewtest was up while sealed"]
    assert findings.repaired == []
    assert world.keeper.verify().intrusions == []


def test_verify_reopens_a_link_found_down_while_open(world: World) -> None:
    world.start(10, "ns-a")
    world.keeper.open()
    world.gate.up[world.link.host_index] = False
    findings = world.keeper.verify()
    assert world.gate.up[world.link.host_index] is True
    assert findings.repaired == ["the link ewtest was down while open"]
    assert findings.intrusions == []


@pytest.mark.parametrize("state", [L3State.OPEN, L3State.PARTIAL, L3State.ABSENT])
def test_deep_verify_reseals_layer_3(world: World, state: L3State) -> None:
    world.start(10, "ns-a")
    world.gate.l3[world.link.host_index] = state
    assert world.keeper.verify().intrusions == []  # not deep: rules not read
    findings = world.keeper.verify(deep=True)
    assert findings.intrusions == [f"layer-3 rules were {state.value} while sealed"]
    assert world.gate.l3[world.link.host_index] is L3State.SEALED


def test_deep_verify_repairs_layer_3_while_open(world: World) -> None:
    world.start(10, "ns-a")
    world.keeper.open()
    world.gate.l3[world.link.host_index] = L3State.PARTIAL
    findings = world.keeper.verify(deep=True)
    assert findings.repaired == ["layer-3 rules were partial while open"]
    assert findings.intrusions == []
    assert world.gate.l3[world.link.host_index] is L3State.OPEN


def test_verify_without_a_link_finds_nothing(world: World) -> None:
    assert world.keeper.verify(deep=True).intrusions == []


def test_an_occupant_is_an_intrusion_when_seen_twice(world: World) -> None:
    world.start(10, "ns-a")
    world.keeper.open()
    world.proc.process(66, "ns-a", HOST_CGROUP)  # nsenter --net=/proc/10/ns/net
    first = world.keeper.verify()
    assert first.intrusions == []  # a suspect only: it may be a docker exec on its way
    assert not world.keeper.closed
    second = world.keeper.verify()
    assert second.intrusions == ["1 task(s) outside the workload in its namespace (pid 66)"]
    assert world.keeper.closed
    assert world.gate.up[world.link.host_index] is False
    assert world.keeper.open() == "quarantined"
    third = world.keeper.verify()
    assert third.intrusions == []  # reported once per quarantine
    assert world.keeper.closed
    world.proc.exit(66)
    world.keeper.verify()
    assert not world.keeper.closed
    assert world.gate.up[world.link.host_index] is True


def test_a_suspect_gone_by_the_next_round_is_nothing(world: World) -> None:
    world.start(10, "ns-a")
    world.keeper.open()
    world.proc.process(67, "ns-a", HOST_CGROUP)
    world.keeper.verify()
    world.proc.set_cgroup(67, WORKLOAD_CGROUP)  # a docker exec, moved into the container
    assert world.keeper.verify().intrusions == []
    world.proc.process(68, "ns-a", HOST_CGROUP)
    world.keeper.verify()
    world.proc.exit(68)
    assert world.keeper.verify().intrusions == []
    assert not world.keeper.closed


def test_a_new_suspect_each_round_is_never_confirmed_by_another(world: World) -> None:
    world.start(10, "ns-a")
    world.proc.process(70, "ns-a", HOST_CGROUP)
    world.keeper.verify()
    world.proc.exit(70)
    world.proc.process(71, "ns-a", HOST_CGROUP)
    assert world.keeper.verify().intrusions == []
    assert world.keeper.verify().intrusions != []  # 71, seen twice


def test_a_thread_occupant_stays_quarantined_between_deep_rounds(world: World) -> None:
    # Only a deep round looks at every thread; the rounds between must not forget it.
    world.start(10, "ns-a")
    world.keeper.open()
    world.proc.process(80, "host", HOST_CGROUP, threads={81: "ns-a"})
    assert world.keeper.verify(deep=True).intrusions == []
    assert world.keeper.verify().intrusions != []
    for _ in range(5):
        world.keeper.verify()
        assert world.keeper.closed
        assert world.gate.up[world.link.host_index] is False
    world.proc.move(80, 81, "host")
    world.keeper.verify()
    assert not world.keeper.closed


def test_the_monitor_never_counts_the_workload(world: World) -> None:
    world.start(10, "ns-a")
    world.proc.process(11, "ns-a", WORKLOAD_CGROUP, threads={12: "ns-a"})
    for deep in (False, True, False, True):
        assert world.keeper.verify(deep=deep).intrusions == []
    assert not world.keeper._quarantine


def test_close_all_lets_go_of_the_namespace(world: World) -> None:
    world.start(10, "ns-a")
    fd = world.link.netns_fd
    index = world.link.host_index
    world.keeper.close_all()
    with pytest.raises(OSError):
        os.fstat(fd)
    assert ("detach", index, None) not in world.maker.calls  # the link stays in the kernel


def test_status_names_the_kernels_state_in_one_word(world: World) -> None:
    world.start(10, "ns-a")
    world.keeper.close()
    status = world.keeper.status()
    assert (status["kernel"], status["gate"], status["key_release"]) == (
        "sealed",
        "closed",
        "ready",
    )
    world.keeper.open()
    status = world.keeper.status()
    assert (status["kernel"], status["gate"]) == ("unsealed", "open")
    assert status["key_release"].startswith("refused")
    world.keeper.close()
    link = world.keeper._link
    assert link is not None
    world.gate.l3[link.host_index] = L3State.PARTIAL  # rules tampered behind its back
    assert world.keeper.status()["kernel"] == "partial"


def test_a_flip_on_its_way_is_no_intrusion(world: World) -> None:
    """The monitor reads the kernel while a session is opening: it waits for the flip."""
    world.start(10, "ns-a")
    world.keeper.open()
    world.gate.deferred = True
    world.keeper.close()  # queued, not yet applied: the link is still up in the "kernel"
    findings = world.keeper.verify()
    assert findings.intrusions == []
    assert findings.repaired == []
    world.keeper.open()  # likewise the other way
    findings = world.keeper.verify()
    assert (findings.intrusions, findings.repaired) == ([], [])
