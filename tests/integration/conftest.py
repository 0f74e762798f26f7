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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from embassy.client import ConnectError, call
from embassy.tpm.swtpm import Swtpm

IN_CI = os.environ.get("CI") == "true"


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
    logs: list[Path] = field(default_factory=list)

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
                env={"PATH": os.environ.get("PATH", ""), "TSS2_LOG": "all+none"},
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
