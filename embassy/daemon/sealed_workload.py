"""The workload the embassy runs and seals: launch or adopt it, log how, keep it sealed.

Assembles the Docker adapter, the firewall and the session manager. Order at start:
adopt the containers a previous run launched (a daemon restart) or launch them, logging
every launch input as a signed event before the workload starts; then reconcile the seal
with the journal and the log (fail closed); then watch for container starts (a restarted
holder is a new network namespace: reseal it) and abort sessions past their deadline.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from embassy.config import Config
from embassy.daemon.atomic import ensure_private_dir, write_atomic
from embassy.daemon.statement_log import StatementLog
from embassy.errors import PolicyError
from embassy.log.entry import EntryType
from embassy.seal.iptables import IptablesFirewall
from embassy.sessions.manager import SessionManager, WorkloadIdentity
from embassy.workload.docker_runtime import DockerRuntime, Launched, netns_path
from embassy.workload.spec import WorkloadSpec, launch_config_digest, launch_events

_LOG = logging.getLogger(__name__)
SEAL_BACKEND = "iptables-legacy-netns"


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
        on_abort: Callable[[bytes], None] = lambda session: None,
    ) -> None:
        self._log = log
        self._docker = DockerRuntime()
        self._firewall = IptablesFirewall()
        self._stop = threading.Event()
        self._id = embassy_id(config.data_dir)
        try:
            self.launched = self._launch_or_adopt(config, spec)
            self.sessions = SessionManager(
                journal_path=config.data_dir / "seal-journal.jsonl",
                firewall=self._firewall,
                netns=lambda: netns_path(self.launched),
                log=log,
                workload=WorkloadIdentity(
                    image_digest=self.launched.image_digest,
                    container_id=self.launched.workload_id,
                    holder_id=self.launched.holder_id,
                    launch_digest=bytes.fromhex(self.launched.launch_digest),
                ),
                failpoint=config.failpoint,
                on_abort=on_abort,
            )
            report = self.sessions.reconcile()
            _LOG.info("seal reconciled: %s", json.dumps(report))
            self._stop_watch = self._docker.watch_starts(
                [self.launched.holder_id, self.launched.workload_id],
                self._on_start,
                on_end=lambda: _LOG.error(
                    "docker event stream ended: a restarted holder will not be resealed "
                    "until the daemon restarts"
                ),
            )
        except BaseException:
            self._docker.close()
            raise
        self._reaper = threading.Thread(target=self._reap, name="embassy-reaper", daemon=True)
        self._reaper.start()

    def _before_start(self, spec: WorkloadSpec, launched: Launched) -> None:
        """The holder's namespace exists, the workload has not run: switch connection
        tracking on there (so flows opened before a seal are known when it comes) and log
        every launch input."""
        self._firewall.prepare(netns_path(launched))
        self._log_launch(spec, launched.image_digest)

    def _log_launch(self, spec: WorkloadSpec, image_digest: str) -> None:
        policy = {"backend": SEAL_BACKEND, "rules_sha256": self._firewall.rules.digest}
        for kind, body in launch_events(spec, image_digest, policy):
            self._log.append_event(EntryType(kind), json.loads(body))

    def _launch_or_adopt(self, config: Config, spec: WorkloadSpec) -> Launched:
        found = self._docker.find(self._id)
        if found is not None:
            launched = self._docker.refresh(found)
            wanted = launch_config_digest(spec, launched.image_digest).hex()
            if wanted != launched.launch_digest:
                # Logging today's spec over yesterday's container would make the identity
                # document describe a workload that is not the one running.
                raise PolicyError(
                    f"the running workload {launched.workload_id[:12]} was launched from "
                    "another configuration than this one; restore it, or remove the "
                    "containers (after closing its sessions) to launch anew"
                )
            _LOG.info("adopted workload %s (holder %s)", launched.workload_id, launched.holder_id)
            self._before_start(spec, launched)
            return launched
        activations = config.data_dir / "activations"
        ensure_private_dir(activations)
        return self._docker.launch(
            spec,
            embassy_id=self._id,
            socket_dir=dedicated_socket_dir(config),
            activation_dir=activations,
            before_start=lambda launched: self._before_start(spec, launched),
        )

    def _on_start(self, container_id: str) -> None:
        self.launched = self._docker.refresh(self.launched)
        self._firewall.prepare(netns_path(self.launched))
        if self.sessions.reseal_if_open(f"container {container_id[:12]} started"):
            _LOG.warning("container %s started while sealed: resealed", container_id[:12])

    def _reap(self) -> None:
        while not self._stop.wait(1.0):
            try:
                self.sessions.abort_expired()
            except Exception:
                _LOG.exception("aborting expired sessions failed")

    def in_sealed_netns(self) -> bool:
        """Whether the running workload is in the namespace the seal was applied to."""
        self.launched = self._docker.refresh(self.launched)
        return self._docker.in_sealed_netns(self.launched)

    def status(self) -> dict[str, Any]:
        return {**self.sessions.status(), "workload": self.launched.workload_id}

    def close(self) -> None:
        """Stop watching; the containers and the seal stay as they are (fail closed)."""
        self._stop.set()
        self._stop_watch()
        self._reaper.join(timeout=5)
        self.sessions.close_journal()
        self._docker.close()
