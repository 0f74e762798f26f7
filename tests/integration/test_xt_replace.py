"""The layer-3 flip by whole-table replace, in real network namespaces.

Each test makes a namespace of its own, prepares it as the embassy does, then changes its
``filter`` tables from outside the embassy (``iptables-legacy`` under ``nsenter``) the way
a careless or hostile host process might, and reads back what the kernel holds.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from embassy.errors import SealError
from embassy.net.identity import NetnsId
from embassy.seal.iptables import IptablesL3
from embassy.seal.netns import NetnsWorker, new_netns
from embassy.seal.rules import Family, open_rules, seal_rules
from embassy.seal.xt_replace import open_socket, read_image, replace, table_info
from tests.integration.conftest import IN_CI, require

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", autouse=True)
def _real() -> None:
    require("nsenter", "iptables-legacy", "ip6tables-legacy")
    if os.geteuid() != 0:
        message = "namespaces and netfilter need root"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


class Space:
    """A network namespace of the test's own, prepared by one embassy's IptablesL3."""

    def __init__(self) -> None:
        self.fd = new_netns()
        self.path = Path(f"/proc/self/fd/{self.fd}")
        self.worker = NetnsWorker("test-xt")
        self.l3 = IptablesL3(self.worker)

    @property
    def netns(self) -> NetnsId:
        return NetnsId.of_fd(self.fd)

    def iptables(self, family: Family, *argv: str) -> str:
        tool = "iptables-legacy" if family is Family.V4 else "ip6tables-legacy"
        return subprocess.run(
            ["nsenter", f"--net=/proc/{os.getpid()}/fd/{self.fd}", tool, *argv],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout

    def close(self) -> None:
        self.l3.close()
        self.worker.close()
        os.close(self.fd)


@pytest.fixture
def space() -> Iterator[Space]:
    s = Space()
    yield s
    s.close()


def test_a_flip_puts_each_state_in_at_once_without_the_worker(space: Space) -> None:
    space.l3.install(space.path, sealed=False)
    assert space.l3.read(space.path) == open_rules()
    space.worker.close()  # from here on, anything queued on the worker would raise
    done = space.l3.submit_flip(space.path, sealed=True)
    assert done.done(), "done on the calling thread, not queued"
    done.result()
    steps: list[str] = []
    space.l3.submit_flip(
        space.path,
        sealed=False,
        before=lambda: steps.append("before"),
        then=lambda: steps.append("then"),
    ).result()
    assert steps == ["before", "then"]
    for family in Family:
        assert "EMBASSY-SEAL" in space.iptables(family, "-S")


def test_each_flip_reads_back_as_the_seals_exact_rules(space: Space) -> None:
    space.l3.install(space.path, sealed=False)
    for sealed, rules in ((True, seal_rules()), (False, open_rules()), (True, seal_rules())):
        space.l3.flip(space.path, sealed=sealed)
        assert space.l3.read(space.path) == rules


@pytest.mark.parametrize("sealed", [True, False])
@pytest.mark.parametrize(
    "tamper",
    [
        ["-I", "INPUT", "-j", "ACCEPT"],  # a rule ahead of the seal's jump
        ["-F", "EMBASSY-SEAL-IN"],  # the seal's chain emptied
        ["-P", "OUTPUT", "DROP"],  # a policy changed
        ["-N", "ROGUE"],  # a chain of someone else's
    ],
)
def test_a_table_changed_behind_the_embassys_back_comes_back_exact(
    space: Space, sealed: bool, tamper: list[str]
) -> None:
    space.l3.install(space.path, sealed=not sealed)
    for family in Family:
        space.iptables(family, *tamper)
    space.l3.flip(space.path, sealed=sealed)
    assert space.l3.read(space.path) == (seal_rules() if sealed else open_rules())
    for family in Family:
        saved = space.iptables(family, "-S")
        assert "ROGUE" not in saved
        assert "-P OUTPUT ACCEPT" in saved


def test_a_table_torn_down_is_put_back_whole(space: Space) -> None:
    space.l3.install(space.path, sealed=True)
    for family in Family:
        space.iptables(family, "-F")
        space.iptables(family, "-X")
    space.l3.flip(space.path, sealed=True)
    assert space.l3.read(space.path) == seal_rules()


def test_without_its_sockets_a_namespace_is_flipped_by_the_worker(space: Space) -> None:
    space.l3.install(space.path, sealed=True)
    space.l3.forget(space.netns)
    queued = space.l3.submit_flip(space.path, sealed=False)
    queued.result(timeout=30)
    assert space.l3.read(space.path) == open_rules()
    space.worker.close()
    with pytest.raises(SealError, match="worker is closed"):
        space.l3.flip(space.path, sealed=True)


def test_a_replace_naming_the_wrong_entry_count_is_refused(space: Space) -> None:
    space.l3.install(space.path, sealed=True)

    def in_namespace() -> None:
        with open_socket(Family.V4) as sock:
            image = read_image(sock, Family.V4)
            count = table_info(sock, Family.V4).num_entries
            with pytest.raises(OSError) as caught:
                replace(sock, image, count + 1)
            assert caught.value.errno == errno.EAGAIN
            replace(sock, image, count)  # the right count: accepted

    space.worker.run(space.path, in_namespace)
    assert space.l3.read(space.path) == seal_rules()
