"""The workload the embassy runs and seals: launch or adopt it, wire it, keep it sealed.

Assembles the Docker adapter, the link maker, the gate, the seal keeper and the session
manager. Order at start:

1. adopt the workload a previous run launched (a daemon restart), or launch it with no
   network, logging every launch input as a signed event before it starts;
2. watch Docker's container events (before anything else, so no restart is missed);
3. give the workload's namespace its link, gate **closed** (fail closed until the log says
   otherwise), publish its ports;
4. reconcile the sessions with the signed log: the gate stays closed while any is open;
5. run the monitor: every 100 ms the link's kernel state and who is in the namespace,
   every second the layer-3 rules and every thread; sessions past their deadline are
   aborted; an intrusion aborts every open session and quarantines the namespace.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from embassy.config import Config
from embassy.daemon.atomic import write_atomic
from embassy.daemon.http_server import Peer, same_process
from embassy.daemon.statement_log import StatementLog
from embassy.errors import EmbassyError, ForbiddenError, PolicyError
from embassy.log.entry import EntryType
from embassy.net.link import LinkMaker
from embassy.net.plan import LinkPlan
from embassy.net.ports import PortPublisher, choose_ports
from embassy.net.rtnl import Rtnl
from embassy.seal.gate import Gate
from embassy.seal.iptables import IptablesL3
from embassy.seal.keeper import SealKeeper
from embassy.seal.netns import NetnsWorker
from embassy.seal.occupants import in_container
from embassy.seal.proof import BACKEND
from embassy.seal.rules import seal_rules
from embassy.sessions.manager import SessionManager, SessionMetrics, WorkloadIdentity
from embassy.wire.statement import LIFECYCLE_V1
from embassy.workload.docker_runtime import DockerRuntime, Launched
from embassy.workload.spec import WorkloadSpec, launch_config_digest, launch_events

_LOG = logging.getLogger(__name__)
MONITOR_SECONDS = 0.1
DEEP_EVERY = 10  # monitor rounds between deep checks (rules read back, every thread)


def embassy_id(data_dir: Path) -> str:
    """A stable id for this embassy's containers, made once per data dir."""
    path = data_dir / "embassy-id"
    if not path.exists():
        write_atomic(path, secrets.token_hex(6).encode())
    return path.read_text().strip()


def dedicated_socket_dir(config: Config) -> Path:
    """The socket's directory is bind-mounted into the workload: it must hold nothing else."""
    socket_dir = config.socket.parent
    socket_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    others = [p.name for p in socket_dir.iterdir() if p != config.socket]
    data_dir = config.data_dir.resolve()
    if others or data_dir == socket_dir.resolve() or socket_dir.resolve() in data_dir.parents:
        raise PolicyError(
            f"the socket's directory {socket_dir} is mounted into the workload, so it must be "
            f"dedicated to the socket (it holds {', '.join(sorted(others)) or 'the data dir'})"
        )
    return socket_dir


class SealedWorkload:
    def __init__(
        self,
        config: Config,
        spec: WorkloadSpec,
        log: StatementLog,
        *,
        token_key: bytes,
        on_abort: Callable[[bytes], None] = lambda session: None,
        metrics: SessionMetrics | None = None,
    ) -> None:
        self._log = log
        self._stop = threading.Event()
        self._events_lost = threading.Event()
        self._id = embassy_id(config.data_dir)
        self._docker = DockerRuntime()
        self._worker = NetnsWorker()
        self._rtnl = Rtnl()
        self._l3 = IptablesL3(self._worker)
        self._joiners: set[str] = set()
        self._stop_watch: Callable[[], None] = lambda: None
        self._publisher: PortPublisher | None = None
        try:
            self.plan: LinkPlan | None
            self.launched, self.plan = self._launch_or_adopt(config, spec)
            maker = (
                None
                if self.plan is None
                else LinkMaker(self.plan, rtnl=self._rtnl, worker=self._worker, l3=self._l3)
            )
            self.keeper = SealKeeper(maker, Gate(self._rtnl, self._l3), self.launched.workload_id)
            self._watch()
            self.launched = self._docker.refresh(self.launched)
            if self.launched.pid:
                self.keeper.workload_started(self.launched.pid)
            if self.plan is not None and self.plan.ipv4 is not None and self.launched.ports:
                self._publisher = PortPublisher(self._id, self.plan.bridge, self._worker)
                self._publisher.publish(self.launched.ports, self.plan.ipv4.ip)
            self.sessions = SessionManager(
                log=log,
                seal=self.keeper,
                workload=WorkloadIdentity(
                    image_digest=self.launched.image_digest,
                    container_id=self.launched.workload_id,
                    launch_digest=bytes.fromhex(self.launched.launch_digest),
                ),
                token_key=token_key,
                failpoint=config.failpoint,
                on_abort=on_abort,
                metrics=metrics,
            )
            report = self.sessions.reconcile()
            _LOG.info("seal reconciled: %s", json.dumps(report))
        except BaseException:
            self._release()
            raise
        self._monitor = threading.Thread(
            target=self._run_monitor, name="embassy-monitor", daemon=True
        )
        self._monitor.start()

    # -- launch -------------------------------------------------------------------------

    def _log_launch(self, spec: WorkloadSpec, image_digest: str) -> None:
        policy = {"backend": BACKEND, "rules_sha256": seal_rules().digest}
        for kind, body in launch_events(spec, image_digest, policy):
            self._log.append_event(EntryType(kind), json.loads(body))

    def _network(self, spec: WorkloadSpec) -> LinkPlan | None:
        return None if spec.network_mode == "none" else self._docker.ensure_network(self._id)

    def _launch_or_adopt(
        self, config: Config, spec: WorkloadSpec
    ) -> tuple[Launched, LinkPlan | None]:
        found = self._docker.find(self._id)
        if found is not None:
            wanted = launch_config_digest(spec, found.image_digest).hex()
            if wanted != found.launch_digest:
                # Logging today's spec over yesterday's container would make the identity
                # document describe a workload that is not the one running.
                raise PolicyError(
                    f"the running workload {found.workload_id[:12]} was launched from "
                    "another configuration than this one; restore it, or remove the "
                    "container (after closing its sessions) to launch anew"
                )
            _LOG.info("adopted workload %s", found.workload_id)
            plan = self._network(spec)
            self._log_launch(spec, found.image_digest)
            return found, plan
        # Refused before anything is made for it: no network for a workload that never runs.
        self._docker.preflight(spec)
        plan = self._network(spec)
        # The activation directory is the spool the runtime mounted before this (mode and
        # group chosen there, so that a non-root workload can write into it).
        activations = config.data_dir / "activations"
        launched = self._docker.launch(
            spec,
            embassy_id=self._id,
            socket_dir=dedicated_socket_dir(config),
            activation_dir=activations,
            ports=choose_ports(spec.ports) if plan is not None else (),
            before_start=lambda launched: self._log_launch(spec, launched.image_digest),
        )
        return launched, plan

    # -- Docker's events ------------------------------------------------------------------

    def _watch(self) -> None:
        self._events_lost.clear()
        self._stop_watch = self._docker.watch(self._on_event, on_end=self._events_lost.set)

    def _on_event(self, action: str, container_id: str) -> None:
        if container_id == self.launched.workload_id:
            if action == "start":
                self.launched = self._docker.refresh(self.launched)
                if self.launched.pid:
                    self.keeper.workload_started(self.launched.pid)
            elif action == "die":
                self.keeper.workload_stopped()
            return
        if action == "die" and container_id in self._joiners:
            self._joiners.discard(container_id)
            self.keeper.lift(f"container {container_id[:12]}")
            return
        if action != "start":
            return
        modes = self._docker.joins(container_id, self.launched)
        if not modes:
            return
        key = f"container {container_id[:12]}"
        self._joiners.add(container_id)
        self.keeper.quarantine(key, f"{key} joined the workload's {'/'.join(modes)}")
        try:
            self._docker.kill(container_id)
        except EmbassyError as exc:
            _LOG.warning("could not kill %s: %s", key, exc.code)
        self._intrusion([f"{key} joined the workload's {'/'.join(sorted(modes))} (killed)"])

    def _reconnect(self) -> None:
        """After the event stream ended: watch again, then look at the workload afresh."""
        try:
            self._watch()
            self.launched = self._docker.refresh(self.launched)
        except EmbassyError as exc:
            self._events_lost.set()
            _LOG.warning("docker events: reconnect failed (%s); will retry", exc.code)
            return
        if self.launched.pid:
            self.keeper.workload_started(self.launched.pid)
        else:
            self.keeper.workload_stopped()
        _LOG.info("docker events: reconnected")

    # -- the monitor -------------------------------------------------------------------------

    def _intrusion(self, reasons: list[str]) -> None:
        aborted = self.sessions.abort_all("intrusion")
        _LOG.warning("intrusion: %s (%d session(s) aborted)", "; ".join(reasons), aborted)
        self._log.append_statement(
            LIFECYCLE_V1,
            [],
            {"event": "intrusion", "findings": reasons[:16], "aborted_sessions": aborted},
        )

    def _run_monitor(self) -> None:
        rounds = 0
        while not self._stop.wait(MONITOR_SECONDS):
            rounds += 1
            deep = rounds % DEEP_EVERY == 0
            # Each duty on its own: a seal check that fails (a link deleted behind our back)
            # must not keep sessions past their deadline from being aborted, nor the reverse.
            if deep and self._events_lost.is_set():
                self._guarded("reconnecting to Docker's events", self._reconnect)
            self._guarded("checking the seal", partial(self._verify, deep))
            self._guarded("aborting expired sessions", self.sessions.abort_expired)

    def _verify(self, deep: bool) -> None:
        findings = self.keeper.verify(deep=deep)
        for repair in findings.repaired:
            _LOG.warning("seal repaired: %s", repair)
        if findings.intrusions:
            self._intrusion(findings.intrusions)

    @staticmethod
    def _guarded(what: str, duty: Callable[[], object]) -> None:
        try:
            duty()
        except Exception:
            _LOG.exception("seal monitor: %s failed", what)

    # -- state ------------------------------------------------------------------------------

    def authorize(self, peer: Peer | None) -> None:
        """Session routes are for the workload's own processes: raise unless ``peer`` is one.

        The pid is checked against its start time on both sides of the cgroup read, so a
        caller that exited and left its pid to a workload process is not taken for it.
        """
        if not self.is_own_process(peer):
            raise ForbiddenError(
                "session routes answer only the workload's own processes (by the peer "
                "credentials of the socket)"
            )

    def is_own_process(self, peer: Peer | None) -> bool:
        """Whether ``peer`` is a process of the workload's container (not a reused pid)."""
        return (
            peer is not None
            and same_process(peer)
            and in_container(peer.pid, self.launched.workload_id)
            and same_process(peer)
        )

    def status(self) -> dict[str, Any]:
        return {
            **self.sessions.status(),
            "workload": {
                "container_id": self.launched.workload_id,
                "running": bool(self.launched.pid),
                "ports": [p.to_json() for p in self.launched.ports],
            },
            "docker_events": "lost" if self._events_lost.is_set() else "watching",
        }

    def _release(self) -> None:
        self._stop_watch()
        if self._publisher is not None:
            self._publisher.release()
        keeper = getattr(self, "keeper", None)
        if keeper is not None:
            keeper.close_all()
        self._l3.close()
        self._worker.close()
        self._rtnl.close()
        self._docker.close()

    def close(self) -> None:
        """Stop watching; the workload, its link and the gate stay as they are (fail closed)."""
        self._stop.set()
        self._monitor.join(timeout=5)
        self._release()
