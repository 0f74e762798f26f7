"""Fixtures that run the real daemon: `embassy serve` as a subprocess with its own swtpm.

Under CI=true a missing real component (swtpm, tpm2-tools) fails the run instead of
skipping it: CI must prove the real thing works.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from embassy.attest.chain import load_pem_bundle
from embassy.client import ConnectError, call
from embassy.daemon.ak_chain import AK_CHAIN_FILE
from embassy.registrar.ca import CERT_FILE, init_ca, load_ca
from embassy.registrar.cli import SocketAttester
from embassy.registrar.enroll import EkTrust, chain_for, enroll
from embassy.tpm.swtpm import Swtpm
from embassy.verify.policy import TrustPolicy
from tests.integration.postgres import PostgresServer, find_bindir, running_postgres

IN_CI = os.environ.get("CI") == "true"
REGISTRAR_PASSPHRASE = b"test registrar passphrase"


# A workload that only sleeps, for tests about the daemon rather than the workload.
SLEEPING_WORKLOAD = """
workload:
  image: embassy/workload-base:bookworm-v3
  command: ["python3", "-c", "import time; time.sleep(100000)"]
"""
# Run inside the workload (python3 -c CLIENT METHOD PATH [BODY]): one request to the
# embassy over the mounted socket, printed as {"status", "body"}.
INSIDE_CLIENT = (Path(__file__).parent / "inside" / "client.py").read_text()


def require(*binaries: str) -> None:
    missing = [b for b in binaries if shutil.which(b) is None]
    if missing:
        msg = f"real component(s) missing: {', '.join(missing)} (run scripts/setup.sh)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)


@dataclass
class Daemon:
    """One daemon process on a data dir that outlives restarts of the process."""

    root: Path
    config_extra: str = ""
    proc: subprocess.Popen[bytes] | None = None
    enroll_on_start: bool = True
    logs: list[Path] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # more of the daemon's environment

    @property
    def socket(self) -> Path:
        # A directory of its own: it is bind-mounted into the workload.
        return self.root / "run" / "embassy.sock"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    def ca_pem(self) -> Path:
        path = self.root / "ek-ca.pem"
        path.write_bytes(Swtpm(self.data_dir / "swtpm").ca_certificates_pem())
        return path

    @property
    def registrar_dir(self) -> Path:
        return self.root / "registrar"

    def registrar_pem(self) -> Path:
        return self.registrar_dir / CERT_FILE

    def enroll(self) -> None:
        """What an operator does once: a registrar certifies the daemon's AK, by a real
        credential activation with its swtpm, and installs the chain in the daemon."""
        now = datetime.now(UTC)
        if not self.registrar_pem().exists():
            init_ca(
                self.registrar_dir,
                REGISTRAR_PASSPHRASE,
                name=f"test registrar {self.root.name}",
                now=now,
                lifetime=timedelta(days=30),
            )
        issuer = load_ca(self.registrar_dir, REGISTRAR_PASSPHRASE)
        swtpm_cas = tuple(load_pem_bundle(self.ca_pem().read_bytes()))
        attester = SocketAttester(self.socket)
        enrollment = enroll(
            attester,
            issuer,
            EkTrust((), swtpm_cas, allow_software_tpm=True),
            now=now,
            lifetime=timedelta(days=30),
        )
        attester.install_ak_chain(chain_for(enrollment))

    def trust_flags(self) -> list[str]:
        """CLI flags that trust this daemon's swtpm (as a software TPM) and its registrar."""
        return ["--swtpm-ca", str(self.ca_pem()), "--ak-ca", str(self.registrar_pem())]

    def trust(self, **changes: Any) -> TrustPolicy:
        """The verifier policy matching :meth:`trust_flags`, with ``changes``."""
        fields: dict[str, Any] = {
            "software_ek_cas": tuple(load_pem_bundle(self.ca_pem().read_bytes())),
            "ak_cas": tuple(load_pem_bundle(self.registrar_pem().read_bytes())),
            "allow_software_tpm": True,
            **changes,
        }
        return TrustPolicy(**fields)

    def start(self) -> None:
        self.config.write_text(
            f"socket: {self.socket}\ndata_dir: {self.data_dir}\nlog_level: debug\n"
            + self.config_extra
        )
        log = self.root / f"daemon-{len(self.logs)}.log"
        self.logs.append(log)
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "embassy", "serve", "--config", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={"PATH": os.environ.get("PATH", ""), "TSS2_LOG": "all+none", **self.env},
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{log.read_text()}")
            try:
                call(self.socket, "GET", "/v1/health", timeout=2)
            except ConnectError:
                time.sleep(0.05)
                continue
            if self.enroll_on_start and not (self.data_dir / AK_CHAIN_FILE).exists():
                self.enroll()
            return
        raise AssertionError(f"daemon did not come up:\n{log.read_text()}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=30)
        self.proc = None
        return code

    def log_text(self) -> str:
        return "\n".join(p.read_text() for p in self.logs)

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        Swtpm(self.data_dir / "swtpm").stop()
        # The activation spool is a tmpfs the daemon leaves mounted (it outlives a crash, as
        # the workload does); the test's tmp dir can only be removed without it.
        spool = self.data_dir / "activations"
        if spool.is_mount():
            subprocess.run(["umount", "-l", str(spool)], check=False, timeout=30)


@pytest.fixture
def daemon_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[type[Daemon]]:
    require("swtpm", "swtpm_setup")
    made: list[Daemon] = []

    class _Factory(Daemon):
        def __init__(self, config_extra: str = "") -> None:
            # AF_UNIX paths are limited to 108 bytes: keep the root short.
            super().__init__(Path(tmp_path_factory.mktemp("d", numbered=True)), config_extra)
            made.append(self)

    yield _Factory
    for d in made:
        d.cleanup()


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One running daemon for tests that only read from it."""
    require("swtpm", "swtpm_setup")
    daemon = Daemon(Path(tmp_path_factory.mktemp("shared")))
    daemon.start()
    yield daemon
    daemon.cleanup()


# -- the embassy's containers, for tests that run a workload ---------------------------------

SEALED_SERVICE_IMAGE = "embassy/sealed-service:latest"
# The example image runs as this uid and gid (examples/sealed_service/build.sh), not root:
# the embassy's socket and its activation spool are made group-accessible to it.
SEALED_SERVICE_GID = 10001
SEALED_SERVICE_ACCESS = (
    f'socket_group: "{SEALED_SERVICE_GID}"\nmetering:\n  spool_gid: {SEALED_SERVICE_GID}\n'
)
REPO = Path(__file__).resolve().parents[2]


def embassy_id(daemon: Daemon) -> str:
    """The id the daemon labels its containers and network with."""
    return (daemon.data_dir / "embassy-id").read_text().strip()


def ensure_sealed_service_image(client: Any) -> None:
    """Build the example workload image locally if it is missing (nothing is pulled)."""
    import docker

    try:
        client.images.get(SEALED_SERVICE_IMAGE)
    except docker.errors.ImageNotFound:
        subprocess.run(
            ["bash", str(REPO / "examples/sealed_service/build.sh")], check=True, timeout=600
        )


def published_port(client: Any, eid: str, container_port: str = "8080/tcp") -> int:
    """The host port the embassy publishes the workload's ``container_port`` on (it keeps
    them in the workload's ``org.embassy.ports`` label: ``ip:host_port:port/proto,...``)."""
    workload = client.containers.list(
        all=True, filters={"label": [f"org.embassy.id={eid}", "org.embassy.role=workload"]}
    )[0]
    for text in workload.labels["org.embassy.ports"].split(","):
        address, proto = text.rsplit("/", 1)
        _ip, host_port, port = address.rsplit(":", 2)
        if f"{port}/{proto}" == container_port:
            return int(host_port)
    raise AssertionError(f"the workload publishes no {container_port}")


def wait_for_http(port: int, timeout: float = 30.0) -> None:
    """Wait until the workload's service answers /health on loopback."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
        except OSError:
            time.sleep(0.2)
            continue
        return
    raise AssertionError(f"the workload's service on port {port} did not come up")


def remove_embassy_containers(client: Any, eid: str) -> None:
    """Remove everything a daemon launched: its containers, its network, and the host's nat
    rules that published its ports (a daemon leaves them for its next start; left behind,
    they would send a later test's connections on the same port to a dead address)."""
    for container in client.containers.list(all=True, filters={"label": f"org.embassy.id={eid}"}):
        container.remove(force=True)
    for network in client.networks.list(names=[f"embassy-{eid}"]):
        network.remove()
    remove_published_ports(eid)


def remove_published_ports(eid: str) -> None:
    chains = {f"EMBASSY-P-{eid}"[:28], f"EMBASSY-S-{eid}"[:28]}
    saved = subprocess.run(
        ["iptables-legacy", "-t", "nat", "-S"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    for line in saved.splitlines():
        words = line.split()
        if words[:1] == ["-A"] and words[1] not in chains and set(words) & chains:
            subprocess.run(
                ["iptables-legacy", "-t", "nat", "-D", *words[1:]], check=True, timeout=30
            )
    for chain in chains & {w for line in saved.splitlines() for w in line.split()[1:2]}:
        subprocess.run(["iptables-legacy", "-t", "nat", "-F", chain], check=True, timeout=30)
        subprocess.run(["iptables-legacy", "-t", "nat", "-X", chain], check=True, timeout=30)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One private PostgreSQL for the session (unix socket only); tests take a fresh
    database each with ``create_database()``."""
    bindir = find_bindir()
    if bindir is None:
        msg = "real component missing: PostgreSQL's initdb/postgres (run scripts/setup.sh)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    with running_postgres(bindir) as server:
        yield server
