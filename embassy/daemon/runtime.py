"""Assemble the daemon: TPM, keys, statement log, identity, socket; run until SIGTERM.

Start-up order matters and is fail-closed: the TPM is opened, the sealed keys unsealed, and
the log checked against the TPM (and an interrupted extend finished) *before* anything new
is signed. Only then is the start event (with the measurement) extended and the identity
statement appended and quoted.
"""

from __future__ import annotations

import grp
import hashlib
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

from embassy.attest.types import TpmMode
from embassy.config import Config
from embassy.daemon.ak_chain import AkChainStore
from embassy.daemon.api import Api
from embassy.daemon.atomic import ensure_private_dir
from embassy.daemon.http import UnixHttpServer
from embassy.daemon.http_server import Peer, same_process
from embassy.daemon.identity import identity_body
from embassy.daemon.intake import ActivationIntake
from embassy.daemon.keys import load_or_create_keys
from embassy.daemon.metering import MeteringService
from embassy.daemon.metrics import CONTENT_TYPE, LocalPort, Metrics
from embassy.daemon.notify import Notifier
from embassy.daemon.statement_log import StatementLog
from embassy.daemon.weights_keys import WeightsKeys
from embassy.errors import (
    ConflictError,
    EmbassyError,
    ForbiddenError,
    JobBadCommitError,
    WeightsSealedError,
)
from embassy.jobs.records import opened_job_payloads
from embassy.jobs.service import JobService, job_launch_digest, statements_of
from embassy.log.entry import EntryType
from embassy.log.segment import EVIDENCE_TYPE, IDENTITY_DOCUMENT_TYPE, LOG_SEGMENT_TYPE
from embassy.measure import Measurement, measure
from embassy.metering.registry import Registry
from embassy.payload.envelope import PayloadEnvelope, open_payload
from embassy.sessions.manager import WorkloadIdentity, opened_payloads
from embassy.sessions.replay import ReplayStore
from embassy.tpm.device import TpmDevice
from embassy.tpm.interface import Tpm
from embassy.tpm.swtpm import Swtpm
from embassy.weights.release import Denial, Release
from embassy.wire.codec import b64encode
from embassy.wire.dsse import keyid, parse_envelope

if TYPE_CHECKING:
    from embassy.daemon.sealed_workload import SealedWorkload
from embassy.wire.statement import IDENTITY_V1, LIFECYCLE_V1

_LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class TpmHandle:
    """The TPM the embassy uses and, for the embedded default, the swtpm behind it."""

    device: Tpm
    swtpm: Swtpm | None = None


def _owns(peer: Peer | None, container_id: str) -> bool:
    """Whether ``peer`` is a process of container ``container_id`` (not a reused pid)."""
    from embassy.seal.occupants import in_container

    return (
        peer is not None
        and same_process(peer)
        and in_container(peer.pid, container_id)
        and same_process(peer)
    )


def open_tpm(config: Config) -> TpmHandle:
    if config.tpm_device is not None:
        return TpmHandle(TpmDevice.open("device", config.tpm_device, TpmMode.HARDWARE))
    swtpm = Swtpm(config.data_dir / "swtpm")
    name, conf = swtpm.ensure_running()
    _LOG.warning(
        "SOFTWARE TPM: no tpm.device configured, so this embassy runs its own swtpm (pid %s). "
        "It has no hardware root of trust: its evidence proves nothing about this machine. "
        "Every statement says tpm_mode=software; verifiers reject it unless told "
        "--allow-software-tpm.",
        swtpm.pid,
    )
    try:
        return TpmHandle(TpmDevice.open(name, conf, TpmMode.SOFTWARE), swtpm)
    except BaseException:
        swtpm.stop()
        raise


class Embassy:
    """The running embassy: what the API's routes call."""

    def __init__(
        self,
        config: Config,
        tpm: TpmHandle,
        *,
        measurement: Measurement | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        """Start on an open TPM (see :meth:`open`); the embassy owns it from here on.

        ``measurement`` defaults to measuring the installed code; tests that pin bytes
        (test vectors) pass a fixed one.
        """
        # Metrics built by the caller (serve: the same object its local port serves).
        self.config, self.metrics = config, Metrics() if metrics is None else metrics
        self._tpm = tpm
        tpm_device = tpm.device
        registry: Registry | None = None  # closed here if start-up fails after opening it
        self._intake: ActivationIntake | None = None
        try:
            ensure_private_dir(config.data_dir)
            self.keys = load_or_create_keys(tpm_device, config.data_dir, config.pcrs.boot)
            self.log = StatementLog(
                data_dir=config.data_dir,
                tpm=tpm_device,
                keys=self.keys,
                pcrs=config.pcrs,
                checkpoint_every=config.checkpoint_every,
                metrics=self.metrics,
            )
            self.log.recover()
            self.measurement = measurement or measure(config)
            self.registry = registry = Registry.open(config.data_dir / "registry.sqlite")
            self.metering = MeteringService(
                registry=self.registry,
                log=self.log,
                authorities=config.authorities,
                own_keyid=keyid(self.keys.signing.public_key()),
                limits=config.metering,
                on_reject=self.metrics.rejection,
            )
            # Before anything new is signed: batches a crash left pending follow the log.
            self.metering.recover()
            start = self.log.append_event(EntryType.EMBASSY_START, self.measurement.to_json())
            # The workload's launch inputs are logged before the identity statement, so the
            # identity document says exactly what runs beside this embassy.
            self.workload: SealedWorkload | None = None
            if config.workload is not None:
                from embassy.daemon.sealed_workload import SealedWorkload
                from embassy.daemon.spool import ensure_spool

                # The activation spool (a tmpfs of ours) before the workload's container
                # is created: Docker resolves its bind mount once, at creation.
                ensure_spool(config.data_dir / "activations", config.metering)

                self.workload = SealedWorkload(
                    config,
                    config.workload,
                    self.log,
                    token_key=self.keys.session_tokens,
                    on_abort=self.metering.forget,
                    metrics=self.metrics,
                )
            self._replay = ReplayStore(config.data_dir / "payloads.sqlite")
            # The log is the replay store's durable witness: every payload a seal statement
            # names is opened, whatever the store kept through a crash.
            restored = self._replay.remember(opened_payloads(self.log))
            if restored:
                _LOG.warning("replay store: restored %d opened payload(s) from the log", restored)
            # Job mode: containers left by an earlier run removed and their jobs' ends
            # stated, then the jobs' image and launch digest stated before the identity,
            # so that the identity's segment tells a user what a job payload must bind.
            self.jobs: JobService | None = None if config.jobs is None else self._start_jobs(config)
            subjects, body = identity_body(
                self.keys, tpm_device, config.pcrs, self.measurement, start
            )
            appended = self.log.append_statement(IDENTITY_V1, subjects, body)
            payload = parse_envelope(appended.envelope).payload
            segment = self.log.current_segment(start.seq, hashlib.sha256(payload).digest())
            self._identity = {"v": 2, "type": IDENTITY_DOCUMENT_TYPE, "segment": segment.to_json()}
            self._ak_store = AkChainStore(
                config.data_dir, tpm_device.ak_public(), tpm_device.ek_certificate()
            )
            self._ak_chain = self._ak_store.load()
            # Weights-key requests live in memory only: a restart forgets them (the
            # workload asks again), and no key ever reaches the data dir.
            self.weights = WeightsKeys(
                log=self.log,
                own_keyid=keyid(self.keys.signing.public_key()),
                private_keys={
                    "x25519": self.keys.hpke_x25519,
                    "mlkem768-x25519": self.keys.hpke_hybrid,
                },
                identity_document=self.identity_document,
                evidence=self.evidence,
            )
            self.log.checkpoint()
            if self.workload is not None:
                self._intake = ActivationIntake.for_metering(
                    config.data_dir / "activations",
                    self.metering,
                    drain_timeout=config.metering.drain_timeout_seconds,
                )
                self._intake.start()
            self._watch_metrics()
        except BaseException:
            if getattr(self, "jobs", None) is not None:
                self.jobs.close()  # type: ignore[union-attr]
            if self._intake is not None:
                self._intake.stop()
            if registry is not None:
                registry.close()
            self._close_tpm(power_off=False)
            raise
        _LOG.info(
            "embassy started: measurement %s, log head seq %d",
            self.measurement.digest.hex(),
            appended.entry.seq,
        )

    def _start_jobs(self, config: Config) -> JobService:
        from embassy.jobs import containers as job_containers
        from embassy.jobs.result import wrap_result_key

        assert config.jobs is not None
        group = config.socket_group or ""
        gid = int(group) if group.isascii() and group.isdigit() else grp.getgrnam(group).gr_gid
        socket_dir = config.socket.parent
        socket_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        containers = job_containers.JobContainers(
            config.jobs,
            embassy_id=job_containers.embassy_id(config.data_dir),
            socket_dir=socket_dir,
            spool_root=config.data_dir / "jobs",
            socket_gid=gid,
            socket_name=config.socket.name,
        )
        image_digest = containers.prepare()
        launch = job_launch_digest(config.jobs, image_digest)
        service = JobService(
            jobs=config.jobs,
            log=self.log,
            containers=containers,
            launch_digest=launch,
            wrap_result_key=wrap_result_key,
            owns=_owns,
            segment_from=self.log_segment,
            statements=lambda: statements_of(self.log.entries),
        )
        # Every payload a job-started statement names has opened, whatever the store kept.
        self._replay.remember(opened_job_payloads(statements_of(self.log.entries)))
        report = service.recover()
        self.log.append_statement(
            LIFECYCLE_V1,
            [],
            {
                "event": "jobs-ready",
                "image_digest": image_digest,
                "launch_digest": launch.hex(),
                "runtime": containers.runtime,
                "network": "none",
                "containers_removed": report["containers_removed"],
                "jobs_aborted": len(report["jobs_aborted"]),
            },
        )
        service.start()
        return service

    def _watch_metrics(self) -> None:
        """The gauges read at scrape time: state, not events."""
        workload, intake, data_dir = self.workload, self._intake, self.config.data_dir
        if workload is not None:
            self.metrics.watch("sessions_open", lambda: workload.sessions.open_count)
        if intake is not None:
            self.metrics.watch("intake_queue_depth", intake.queue_depth)
        self.metrics.watch(
            "log_bytes",
            lambda: sum((data_dir / n).stat().st_size for n in ("log.jsonl", "checkpoints.jsonl")),
        )

    @classmethod
    def open(cls, config: Config, *, metrics: Metrics | None = None) -> Embassy:
        ensure_private_dir(config.data_dir)
        return cls(config, open_tpm(config), metrics=metrics)

    @property
    def tpm(self) -> Tpm:
        return self._tpm.device

    # -- Service (the API's view) ----------------------------------------------------------

    def health(self) -> dict[str, Any]:
        head = self.log.head
        return {
            "status": "ok",
            "tpm_mode": self.tpm.mode.value,
            "log_head": None if head is None else head.seq,
            "measurement": self.measurement.digest.hex(),
        }

    def identity_document(self) -> dict[str, Any]:
        return {**self._identity, "ak_certificates": [b64encode(c) for c in self._ak_chain]}

    def install_ak_chain(self, chain: list[bytes], peer: Peer | None) -> dict[str, Any]:
        """Serve ``chain`` (checked against this TPM's AK) in the identity document from now.

        Not from the workload: a chain only it could replace would let it make the identity
        unverifiable for everyone who trusts the registrar.
        """
        if self.workload is not None and self.workload.is_own_process(peer):
            raise ForbiddenError("the AK certificate is installed from the host, not the workload")
        if self.jobs is not None and self.jobs.is_job_process(peer):
            raise ForbiddenError("the AK certificate is installed from the host, not a job")
        self._ak_store.install(chain)
        self._ak_chain = list(chain)
        return {"installed": len(chain)}

    def metrics_text(self, peer: Peer | None) -> tuple[str, bytes]:
        """Prometheus' text format, for the host: not the workload's or a job's processes
        (what it counts is the host's to watch, not a channel back into the seal)."""
        if self.workload is not None and self.workload.is_own_process(peer):
            raise ForbiddenError("metrics are read from the host, not the workload")
        if self.jobs is not None and self.jobs.is_job_process(peer):
            raise ForbiddenError("metrics are read from the host, not a job")
        return CONTENT_TYPE, self.metrics.render()

    def evidence(self, nonce: bytes) -> dict[str, Any]:
        return {
            "v": 1,
            "type": EVIDENCE_TYPE,
            "nonce": nonce.hex(),
            # A fresh quote per nonce, drawn from a token bucket (RateLimitedError: 429).
            "segment": self.log.evidence_segment(nonce).to_json(),
        }

    def log_segment(self, from_seq: int) -> dict[str, Any]:
        return {
            "v": 1,
            "type": LOG_SEGMENT_TYPE,
            # The last checkpoint when the head has not moved since (no new quote).
            "segment": self.log.log_segment(from_seq).to_json(),
        }

    def activate_credential(self, blob: bytes, secret: bytes) -> bytes:
        return self.tpm.activate_credential(blob, secret)

    def _sealed(self) -> SealedWorkload:
        if self.workload is None:
            raise ConflictError("no workload is configured: there is nothing to seal")
        return self.workload

    def _open_payload(
        self, envelope: PayloadEnvelope, launch_digest: bytes
    ) -> tuple[bytes, bytes | None]:
        """Refuse a replay, then unwrap: a payload sealed for another measurement or another
        workload (``launch_digest``: the workload's or the jobs') is refused with its own
        code, before anything is decrypted."""
        self._replay.check(envelope.payload_id)
        return open_payload(
            envelope,
            private_keys={
                "x25519": self.keys.hpke_x25519,
                "mlkem768-x25519": self.keys.hpke_hybrid,
            },
            own_keyid=keyid(self.keys.signing.public_key()),
            own_measurement=self.measurement.digest,
            own_launch_digest=launch_digest,
            now=time.time(),
        )

    def open_session(
        self,
        deadline_seconds: int,
        payload: dict[str, Any] | None = None,
        actions: bytes | None = None,
    ) -> dict[str, Any]:
        """Check and unwrap the payload, seal, state it, and only then release its key.

        Everything that can refuse the payload (format, expiry, embassy, suite, a replay,
        a key that does not unwrap) is checked before the seal, so a bad payload never
        costs a seal; the key leaves in the locked step that checks the seal in force. The
        payload's actions (authorities' instructions) are checked in that step too; a
        refusal aborts the session unless the user accepted running it unmetered.
        """
        sealed = self._sealed()
        envelope = None if payload is None else PayloadEnvelope.from_json(payload)
        keys: tuple[bytes, bytes | None] | None = None
        if envelope is not None:
            keys = self._open_payload(envelope, bytes.fromhex(sealed.launched.launch_digest))

        def claim(session: bytes) -> None:
            if envelope is not None:
                self._replay.claim(envelope.payload_id, session, int(time.time()))

        def release(session: bytes) -> dict[str, Any]:
            if envelope is None or keys is None:
                self.metering.begin(session)
                return {}
            input_key, action_key = keys
            readings = self.metering.begin(
                session, payload_id=envelope.payload_id, action_key=action_key, actions=actions
            )
            out: dict[str, Any] = {"input_key": b64encode(input_key)}
            if readings:
                out["readings"] = [b64encode(r) for r in readings]
            return out

        opened = sealed.sessions.open(
            deadline_seconds,
            payload_id=None if envelope is None else envelope.payload_id,
            claim=claim,
            release=release,
        )
        return {
            "session": opened.session.hex(),
            "token": b64encode(opened.token),
            "deadline_unix": opened.deadline,
            "statement": b64encode(opened.envelope),
            **opened.released,
        }

    def close_session(
        self,
        session: bytes,
        token: bytes,
        output_sha256: bytes | None,
        log_from: int | None = None,
    ) -> dict[str, Any]:
        sessions = self._sealed().sessions
        # Only the session's holder may make the embassy wait for its activation files;
        # a retried close of an ended session gets its unseal statement again.
        summary = None
        if sessions.authenticate(session, token):
            drain = self._intake.drain if self._intake is not None else lambda: 0
            summary = self.metering.finish(session, drain)
        envelope = sessions.close(session, token, output_sha256, summary)
        answer: dict[str, Any] = {"statement": b64encode(envelope)}
        try:
            if log_from is not None:
                # Quoted before waiting for the gate: a fallback flip on the netns worker
                # goes on meanwhile.
                answer["segment"] = self.log_segment(log_from)["segment"]
        finally:
            sessions.settle_gate()
        return answer

    def seal_status(self) -> dict[str, Any]:
        return self._sealed().status()

    def authorize_session(self, peer: Peer | None) -> None:
        self._sealed().authorize(peer)

    # -- the weights-key release (embassy/daemon/weights_keys.py) ---------------------------

    def _weights_workload(self, peer: Peer | None, *, states: bool) -> WorkloadIdentity:
        """The launched workload, if ``peer`` is one of its processes.

        A request may be made while sealed (it writes nothing to the log; the broker's
        policy may want its evidence to show the seal). What ``states`` a release or a
        denial may not: the model, key and tenant ids, and an unverified broker's decision
        id and policy digest, are the workload's words, and the log leaves the machine.
        """
        sealed = self._sealed()
        sealed.authorize(peer)
        if states and sealed.keeper.closed:
            raise WeightsSealedError(
                "the workload is sealed (a session is open, or it is quarantined): a "
                "release or denial is handed to the embassy after the session, since its "
                "statement would carry the workload's words out of the seal"
            )
        launched = sealed.launched
        return WorkloadIdentity(
            image_digest=launched.image_digest,
            container_id=launched.workload_id,
            launch_digest=bytes.fromhex(launched.launch_digest),
        )

    def weights_request(
        self,
        peer: Peer | None,
        *,
        model_id: str,
        key_id: str,
        tenant: str,
        operation: str,
        nonce: bytes,
    ) -> dict[str, Any]:
        self._weights_workload(peer, states=False)
        return self.weights.request(
            model_id=model_id, key_id=key_id, tenant=tenant, operation=operation, nonce=nonce
        )

    def weights_key(self, peer: Peer | None, release: Release) -> dict[str, Any]:
        answer = self.weights.release(release, self._weights_workload(peer, states=True))
        self.metrics.key_release("released")
        return answer

    def weights_denied(self, peer: Peer | None, denial: Denial) -> dict[str, Any]:
        answer = self.weights.denied(denial, self._weights_workload(peer, states=True))
        self.metrics.key_release("denied")
        return answer

    # -- jobs (embassy/jobs/service.py) ------------------------------------------------------

    def _job_service(self) -> JobService:
        if self.jobs is None:
            raise ConflictError("job mode is off: no jobs.image is configured")
        return self.jobs

    def submit_job(
        self, peer: Peer | None, payload: dict[str, Any], ciphertext: bytes
    ) -> dict[str, Any]:
        """Check and unwrap the payload (for the jobs' launch digest), then assign a warm
        sealed container. From the host only: not the workload, not a job."""
        jobs = self._job_service()
        if (self.workload is not None and self.workload.is_own_process(peer)) or (
            jobs.is_job_process(peer)
        ):
            raise ForbiddenError("jobs are submitted from the host, not the workload or a job")
        envelope = PayloadEnvelope.from_json(payload)
        input_key, _ = self._open_payload(envelope, jobs.launch_digest)
        return jobs.submit(
            payload_id=envelope.payload_id,
            input_key=input_key,
            reply_key=envelope.reply_key,
            ciphertext=ciphertext,
            claim=lambda job: self._replay.claim(envelope.payload_id, job, int(time.time())),
        )

    def job_keys(self, peer: Peer | None) -> dict[str, Any]:
        return self._job_service().take_keys(peer)

    def job_commit(
        self, peer: Peer | None, output_sha256: bytes | None, problem: str
    ) -> dict[str, Any]:
        jobs = self._job_service()
        if output_sha256 is None:
            jobs.bad_commit(peer, problem)
            raise JobBadCommitError(problem)
        return jobs.commit(peer, output_sha256)

    def job_status(self, job_id: bytes, wait_seconds: float) -> dict[str, Any]:
        return self._job_service().status(job_id, wait_seconds)

    # -- shutdown --------------------------------------------------------------------------

    def _close_tpm(self, *, power_off: bool) -> None:
        self._tpm.device.close()
        if power_off and self._tpm.swtpm is not None:
            self._tpm.swtpm.stop()

    def close(self) -> None:
        """Clean stop: a signed stop statement and a checkpoint close this run's log."""
        try:
            if self._intake is not None:
                self._intake.stop()
            self.metering.close()  # its reading threads, before the registry they read
            if self.jobs is not None:
                self.jobs.close()
            if self.workload is not None:
                self.workload.close()
            self._replay.close()
            self.registry.close()
            self.log.append_statement(LIFECYCLE_V1, [], {"event": "stop"})
            self.log.checkpoint()
        finally:
            self.log.close()
            # The embedded swtpm models the machine's TPM; a clean stop powers it off
            # (the next start is a new TPM boot). A crash leaves it running, so a restarted
            # daemon continues the same boot and repairs the log against the live PCRs.
            self._close_tpm(power_off=True)


# How long the accept loop may go without turning before the watchdog stops pinging (it
# turns every 0.2 s when idle); shorter when systemd's interval is shorter.
_LOOP_STALE_SECONDS = 5.0
_READY_TIMEOUT_SECONDS = 60.0


def _loop_health(server: UnixHttpServer, stale: float) -> str | None:
    """None while the socket's accept loop turns; else why the watchdog should not ping."""
    age = server.loop_age()
    if age is None:
        return "the socket's accept loop is not running"
    if age > stale:
        return f"the socket's accept loop has not turned for {age:.1f} s"
    return None


def _announce_ready(
    config: Config, server: UnixHttpServer, embassy: Embassy, notifier: Notifier
) -> None:
    """READY=1 once a request over the socket is answered (the workload was launched
    before the socket was made), then the watchdog."""
    from embassy.client import call

    deadline = time.monotonic() + _READY_TIMEOUT_SECONDS
    while True:
        try:
            if server.loop_age() is not None:
                call(config.socket, "GET", "/v1/health", timeout=10.0)
                break
        except EmbassyError as exc:
            if time.monotonic() >= deadline:
                _LOG.error("not ready: the socket does not answer (%s)", exc.code)
                return
        if time.monotonic() >= deadline:
            _LOG.error("not ready: the socket's accept loop did not start")
            return
        time.sleep(0.02)
    workload = "none" if embassy.workload is None else "launched"
    notifier.ready(f"serving on {config.socket}; workload {workload}")
    interval = notifier.watchdog_seconds
    if interval is not None:
        stale = min(_LOOP_STALE_SECONDS, max(interval, 1.0))
        notifier.start_watchdog(lambda: _loop_health(server, stale))


def serve(config: Config) -> None:
    """Run the daemon until SIGTERM or SIGINT."""
    # Read (and removed from the environment) before swtpm or any other child starts.
    notifier = Notifier.from_environ(os.environ)
    try:
        _serve(config, notifier)
    finally:
        notifier.stopping("stopped")
        notifier.close()


def _serve(config: Config, notifier: Notifier) -> None:
    notifier.status("starting: TPM, keys, statement log, workload")
    metrics = Metrics()
    embassy = Embassy.open(config, metrics=metrics)
    api = Api(embassy)
    try:
        server = UnixHttpServer(
            config.socket,
            api,
            max_body_bytes=config.max_body_bytes,
            timeout_seconds=config.timeout_seconds,
            limits=config.http,
            socket_group=config.socket_group,
            routes=api.routes,
        )
    except BaseException:
        embassy.close()
        raise
    local: LocalPort | None = None
    try:
        if config.metrics_listen is not None:
            local = LocalPort(metrics, config.metrics_listen)
            _LOG.info("metrics on http://%s/metrics", config.metrics_listen)
    except BaseException:
        server.server_close()
        embassy.close()
        raise

    def _stop(signum: int, frame: FrameType | None) -> None:
        del frame
        _LOG.info("received %s: shutting down", signal.Signals(signum).name)

        def stop() -> None:
            notifier.stopping()
            server.shutdown()

        # shutdown() waits for serve_forever to return, so it cannot run on this thread.
        threading.Thread(target=stop, daemon=True).start()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    _LOG.info("serving on %s", config.socket)
    threading.Thread(
        target=_announce_ready, args=(config, server, embassy, notifier), daemon=True
    ).start()
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        notifier.stopping()
        server.server_close()
        if local is not None:
            local.close()
        embassy.close()
        _LOG.info("stopped")
