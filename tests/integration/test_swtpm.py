"""Swtpm lifecycle: it models the machine TPM, so it outlives the daemon; stop() resets it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from embassy.attest.types import TpmMode
from embassy.errors import TpmError
from embassy.tpm.swtpm import LOCALCA_TOOL, Swtpm

if TYPE_CHECKING:
    from embassy.tpm.device import TpmDevice

pytestmark = pytest.mark.integration

_REPO = Path(__file__).resolve().parents[2]


def require_swtpm() -> None:
    missing = [t for t in ("swtpm", "swtpm_setup") if shutil.which(t) is None]
    if not os.path.exists(LOCALCA_TOOL):
        missing.append(LOCALCA_TOOL)
    if missing:
        msg = f"swtpm integration tools missing: {', '.join(missing)}"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture(scope="session")
def swtpm_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    require_swtpm()
    d = tmp_path_factory.mktemp("lifecycle") / "swtpm"
    try:
        yield d
    finally:
        Swtpm(d).stop()


def _open(sw: Swtpm) -> TpmDevice:
    if os.environ.get("CI") != "true":
        pytest.importorskip("tpm2_pytss")
    from embassy.tpm.device import TpmDevice

    name, conf = sw.tcti()
    return TpmDevice.open(name, conf, TpmMode.SOFTWARE)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def test_manufactured_with_private_ca(swtpm_dir: Path) -> None:
    sw = Swtpm(swtpm_dir)
    name, conf = sw.ensure_running()
    assert name == "swtpm"
    assert conf.startswith("host=127.0.0.1,port=")
    ca_dir = swtpm_dir.parent / "swtpm-ca"
    assert sw.ca_dir == ca_dir
    assert (ca_dir / "signkey.pem").exists()
    assert (ca_dir / "swtpm-localca-rootca-cert.pem").exists()
    assert sw.ca_certificates_pem().count(b"-----BEGIN CERTIFICATE-----") == 2
    endpoint = json.loads((swtpm_dir / "swtpm.endpoint.json").read_text())
    assert endpoint["pid"] == sw.pid
    assert conf.endswith(f"port={endpoint['port']}")


def test_second_object_adopts_running_instance(swtpm_dir: Path) -> None:
    first = Swtpm(swtpm_dir)
    tcti = first.ensure_running()
    second = Swtpm(swtpm_dir)
    assert second.ensure_running() == tcti
    assert second.pid == first.pid
    assert second.is_running()


def test_swtpm_outlives_a_killed_daemon(swtpm_dir: Path) -> None:
    """A daemon process that started the swtpm dies by SIGKILL: the TPM keeps running."""
    Swtpm(swtpm_dir).stop()
    code = (
        "import sys, time; from pathlib import Path; from embassy.tpm.swtpm import Swtpm; "
        "s = Swtpm(Path(sys.argv[1])); s.ensure_running(); print(s.pid, flush=True); "
        "time.sleep(60)"
    )
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(_REPO)}
    with subprocess.Popen(
        [sys.executable, "-c", code, str(swtpm_dir)],
        stdout=subprocess.PIPE,
        env=env,
    ) as daemon:
        assert daemon.stdout is not None
        pid = int(daemon.stdout.readline())
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(timeout=10)
    assert _alive(pid)
    sw = Swtpm(swtpm_dir)
    sw.ensure_running()
    assert sw.pid == pid


def test_daemon_restart_keeps_boot_and_power_cycle_resets(swtpm_dir: Path) -> None:
    sw = Swtpm(swtpm_dir)
    sw.ensure_running()
    dev = _open(sw)
    try:
        dev.extend(13, b"\x11" * 32)
        boot = dev.clock()
        pcr = dev.read_pcrs([13])[13]
    finally:
        dev.close()

    # Daemon restart: a new Swtpm object and device, same TPM boot.
    again = Swtpm(swtpm_dir)
    again.ensure_running()
    assert again.pid == sw.pid
    dev = _open(again)
    try:
        assert dev.clock().reset_count == boot.reset_count
        assert dev.read_pcrs([13])[13] == pcr
    finally:
        dev.close()

    # Power cycle: stop() + ensure_running() is a TPM reset.
    old_pid = again.pid
    assert old_pid is not None
    again.stop()
    assert not _alive(old_pid)
    assert not (swtpm_dir / "swtpm.endpoint.json").exists()
    assert not again.is_running()
    again.ensure_running()
    assert again.pid != old_pid
    dev = _open(again)
    try:
        assert dev.clock().reset_count > boot.reset_count
        assert dev.read_pcrs([13])[13] == bytes(32)
    finally:
        dev.close()


def test_stale_endpoint_file_is_replaced(swtpm_dir: Path) -> None:
    sw = Swtpm(swtpm_dir)
    sw.stop()
    # A dead pid (our own child, reaped) and a port nothing listens on.
    with subprocess.Popen(["true"]) as p:
        p.wait(timeout=10)
    (swtpm_dir / "swtpm.pid").write_text(str(p.pid))
    (swtpm_dir / "swtpm.endpoint.json").write_text(json.dumps({"pid": p.pid, "port": 1}))
    _, conf = sw.ensure_running()
    assert sw.pid != p.pid
    assert _alive(sw.pid or -1)
    assert "port=1" not in conf.split(",")


def test_pid_of_a_foreign_process_is_not_adopted_or_killed(swtpm_dir: Path) -> None:
    sw = Swtpm(swtpm_dir)
    sw.stop()
    with subprocess.Popen(["sleep", "30"]) as sleeper:
        try:
            (swtpm_dir / "swtpm.pid").write_text(str(sleeper.pid))
            (swtpm_dir / "swtpm.endpoint.json").write_text(
                json.dumps({"pid": sleeper.pid, "port": 1})
            )
            sw.ensure_running()
            assert sw.pid != sleeper.pid
            assert sleeper.poll() is None  # not ours: left alone
        finally:
            sleeper.kill()
            sleeper.wait(timeout=10)


def test_tcti_before_start_raises(tmp_path: Path) -> None:
    with pytest.raises(TpmError):
        Swtpm(tmp_path / "swtpm").tcti()


def test_rejects_unusable_directory_names(tmp_path: Path) -> None:
    with pytest.raises(TpmError):
        Swtpm(tmp_path / "a,b")


def test_stop_is_idempotent_and_leaves_nothing_running(swtpm_dir: Path) -> None:
    sw = Swtpm(swtpm_dir)
    sw.ensure_running()
    pid = sw.pid
    assert pid is not None
    sw.stop()
    sw.stop()
    deadline = time.monotonic() + 5
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)
