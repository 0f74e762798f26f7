"""The model owner's key broker for tests: `embassy broker serve` as a subprocess.

It listens on the embassy network's gateway (the host's address on the embassy's bridge),
where the example workload reaches it (``BROKER_URL=http://gateway:PORT``), holds the
weights key `examples/sealed_service/build.sh` encrypted the example's model with, and
decides by `examples/broker/policy.rego` over a data document the test writes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.integration.conftest import Daemon, embassy_id

REPO = Path(__file__).resolve().parents[2]
POLICY = REPO / "examples" / "broker" / "policy.rego"
MODEL_KEY = REPO / ".model-owner" / "minilm.key"
MODEL_ID, KEY_ID, TENANT = "minilm-l6", "k1", "acme"
PASSPHRASE = "test broker passphrase"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def broker_env(port: int) -> str:
    """The workload config lines that point the example at a broker on ``port``."""
    return f'  env:\n    BROKER_URL: "http://gateway:{port}"\n'


def gateway(client: Any, daemon: Daemon) -> str:
    network = client.networks.get(f"embassy-{embassy_id(daemon)}")
    for pool in network.attrs["IPAM"]["Config"]:
        address = pool.get("Gateway", "")
        if address and ":" not in address:
            return str(address)
    raise AssertionError("the embassy's network has no IPv4 gateway")


def image_digest(client: Any, image: str) -> str:
    return str(client.images.get(image).id)


def measurement(daemon: Daemon) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "embassy", "measure", "--config", str(daemon.config)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return out.stdout.strip()


def _cli(*argv: str, env: dict[str, str]) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "embassy", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


@dataclass
class ModelBroker:
    """One broker directory (keys, decision log); :meth:`serve` (re)starts its process
    with a data document, so a test can change the policy's data between decisions."""

    root: Path
    daemon: Daemon
    host: str
    port: int
    key_file: Path = MODEL_KEY
    proc: subprocess.Popen[str] | None = None
    logs: list[Path] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", ""),
            "EMBASSY_BROKER_PASSPHRASE": PASSPHRASE,
        }

    def init(self) -> None:
        _cli("broker", "init", "--dir", str(self.root / "broker"), env=self.env)
        _cli(
            "broker", "add-key", "--dir", str(self.root / "broker"), "--model-id", MODEL_ID,
            "--key-id", KEY_ID, "--key-file", str(self.key_file), env=self.env,
        )  # fmt: skip

    def data(
        self,
        *,
        images: list[str],
        measurements: list[str],
        tenants: dict[str, list[str]] | None = None,
        require_sealed: bool = False,
    ) -> dict[str, Any]:
        return {
            "broker": {
                "require_sealed": require_sealed,
                "tenants": {TENANT: [MODEL_ID]} if tenants is None else tenants,
                "models": {MODEL_ID: {"image_digests": images, "measurements": measurements}},
            }
        }

    def serve(self, data: dict[str, Any]) -> None:
        self.stop()
        (self.root / "data.json").write_text(json.dumps(data))
        (self.root / "broker.yaml").write_text(
            json.dumps(
                {
                    "dir": str(self.root / "broker"),
                    "listen": {"tcp": f"{self.host}:{self.port}"},
                    "policy": str(POLICY),
                    "data": str(self.root / "data.json"),
                    "trust": {
                        "swtpm_cas": [str(self.daemon.ca_pem())],
                        "ak_cas": [str(self.daemon.registrar_pem())],
                        "allow_software_tpm": True,
                    },
                }
            )
        )
        log = self.root / f"broker-{len(self.logs)}.log"
        self.logs.append(log)
        err = log.open("w")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "embassy",
                "broker",
                "serve",
                "--config",
                str(self.root / "broker.yaml"),
            ],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=self.env,
        )
        err.close()
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"the broker did not start:\n{log.read_text()}")
        assert json.loads(line)["ready"] is True

    def decisions(self) -> list[dict[str, Any]]:
        out = _cli("broker", "log", "--dir", str(self.root / "broker"), "--verify", env=self.env)
        return [json.loads(line) for line in out.splitlines() if line.strip().startswith("{")]

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self.proc = None


def wait_for_model(port: int, *, state: str = "loaded", timeout: float = 120) -> dict[str, Any]:
    """Poll the example's ``GET /model`` until it reaches ``state``."""
    import urllib.request

    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/model", timeout=10) as r:
            status = json.loads(r.read())
        if status.get("state") == state:
            return status
        time.sleep(0.5)
    raise AssertionError(f"the model did not reach {state!r}: {status}")


def load_model(port: int) -> dict[str, Any]:
    """``POST /model/load``: ask the broker again now; the example's status after."""
    import urllib.request

    request = urllib.request.Request(f"http://127.0.0.1:{port}/model/load", method="POST")
    with urllib.request.urlopen(request, timeout=120) as r:
        status: dict[str, Any] = json.loads(r.read())
        return status
