"""A software TPM (swtpm) that the daemon starts itself: a debug mode, no hardware root of trust.

The swtpm process models the machine's TPM, so its lifetime is the machine's power cycle,
not the daemon's: it runs detached in its own session and outlives a crash (even ``kill -9``)
of the daemon. A restarted daemon *adopts* the running instance and continues the same TPM
boot (same ``reset_count``, PCRs kept). Only :meth:`Swtpm.stop` ("power off") ends it; the
next :meth:`Swtpm.ensure_running` then starts a new one, which is a TPM reset.

On first use the state directory is manufactured with ``swtpm_setup``: EK and platform
certificates issued by ``swtpm-localca`` from a CA whose keys live in a directory private to
this data dir (never the system-wide ``/var/lib/swtpm-localca``), so a verifier can be told
exactly which CA a software TPM's EK chains to (:meth:`Swtpm.ca_certificates_pem`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from embassy.errors import TpmError

SWTPM = "swtpm"
SWTPM_SETUP = "swtpm_setup"
LOCALCA_TOOL = "/usr/share/swtpm/swtpm-localca"

_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
_LOOPBACK = "127.0.0.1"
_STATE_FILE = "tpm2-00.permall"
_PID_FILE = "swtpm.pid"
_ENDPOINT_FILE = "swtpm.endpoint.json"
_LOG_FILE = "swtpm.log"
_LOCK_FILE = "swtpm.embassy.lock"
_ROOT_CERT = "swtpm-localca-rootca-cert.pem"
_ISSUER_CERT = "issuercert.pem"

SETUP_TIMEOUT_S = 120.0
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0


class Swtpm:
    """One swtpm instance bound to a state directory (e.g. ``DATA/swtpm``).

    ``ca_dir`` holds the local CA that issues the EK certificate; it defaults to the sibling
    ``swtpm-ca`` directory (``DATA/swtpm-ca``). Several :class:`Swtpm` objects (in one or
    several processes) may point at the same directory: they coordinate with a lock file and
    share the one running process.
    """

    def __init__(self, state_dir: Path, ca_dir: Path | None = None) -> None:
        self._dir = Path(state_dir).absolute()
        self._ca_dir = (Path(ca_dir) if ca_dir else self._dir.parent / "swtpm-ca").absolute()
        for p in (self._dir, self._ca_dir):
            # swtpm parses "dir=..." option values split on commas; config files are lines.
            if any(c in str(p) for c in ",\n\r$"):
                raise TpmError(f"swtpm: unusable directory name {str(p)!r}")
        self._port: int | None = None
        self._pid: int | None = None

    @property
    def state_dir(self) -> Path:
        return self._dir

    @property
    def ca_dir(self) -> Path:
        return self._ca_dir

    @property
    def pid(self) -> int | None:
        """The swtpm process id once :meth:`ensure_running` has returned."""
        return self._pid

    # -- public operations -----------------------------------------------------------------

    def ensure_running(self) -> tuple[str, str]:
        """Adopt the swtpm already running for this state dir, or start one; return its TCTI.

        Starting a new process is a TPM reset (new ``reset_count``, PCRs zero); adopting is not.
        """
        with self._locked():
            if not (self._dir / _STATE_FILE).exists():
                self._manufacture()
            found = self._find_running()
            if found is None:
                found = self._start()
            self._pid, self._port = found
        return self.tcti()

    def tcti(self) -> tuple[str, str]:
        """``(name, conf)`` for ``tpm2_pytss.TCTILdr``; valid after :meth:`ensure_running`."""
        if self._port is None:
            raise TpmError("swtpm: not running (call ensure_running first)")
        return "swtpm", f"host={_LOOPBACK},port={self._port}"

    def is_running(self) -> bool:
        """Whether a live swtpm serves this state dir (without starting one)."""
        with self._locked():
            return self._find_running() is not None

    def stop(self) -> None:
        """Power off: SIGTERM (bounded wait), then SIGKILL; remove the endpoint file."""
        with self._locked():
            endpoint = self._read_endpoint()
            pids = {self._read_pid_file(), endpoint.get("pid") if endpoint else None}
            for pid in pids:
                if isinstance(pid, int) and self._is_our_swtpm(pid):
                    _terminate(pid)
            for name in (_ENDPOINT_FILE, _PID_FILE):
                with contextlib.suppress(FileNotFoundError):
                    (self._dir / name).unlink()
            self._pid = None
            self._port = None

    def ca_certificates_pem(self) -> bytes:
        """The local CA's certificates the EK certificate chains to: root, then issuer (PEM)."""
        issuer = self._ca_dir / _ISSUER_CERT
        root = self._ca_dir / _ROOT_CERT
        try:
            parts = [root.read_bytes()] if root.exists() else []
            parts.append(issuer.read_bytes())
        except OSError as e:
            raise TpmError(
                f"swtpm: cannot read local CA certificates in {self._ca_dir}: {e}"
            ) from e
        return b"".join(p if p.endswith(b"\n") else p + b"\n" for p in parts)

    # -- manufacturing ---------------------------------------------------------------------

    def _manufacture(self) -> None:
        """First use: swtpm_setup with EK + platform certs from the data dir's private CA."""
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._ca_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        ca_conf = self._ca_dir / "swtpm-localca.conf"
        ca_opts = self._ca_dir / "swtpm-localca.options"
        setup_conf = self._dir / "swtpm_setup.conf"
        _write_atomic(
            ca_conf,
            (
                f"statedir = {self._ca_dir}\n"
                f"signingkey = {self._ca_dir / 'signkey.pem'}\n"
                f"issuercert = {self._ca_dir / _ISSUER_CERT}\n"
                f"certserial = {self._ca_dir / 'certserial'}\n"
            ).encode(),
        )
        _write_atomic(
            ca_opts,
            b"--platform-manufacturer embassy\n--platform-version 2.1\n--platform-model swtpm\n",
        )
        _write_atomic(
            setup_conf,
            (
                f"create_certs_tool = {LOCALCA_TOOL}\n"
                f"create_certs_tool_config = {ca_conf}\n"
                f"create_certs_tool_options = {ca_opts}\n"
                "active_pcr_banks = sha256\n"
            ).encode(),
        )
        argv = [
            SWTPM_SETUP,
            "--tpm2",
            "--tpmstate",
            str(self._dir),
            "--create-ek-cert",
            "--create-platform-cert",
            "--lock-nvram",
            "--config",
            str(setup_conf),
        ]
        try:
            res = subprocess.run(
                argv,
                env=_ENV,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=SETUP_TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            self._discard_state()
            raise TpmError(f"swtpm_setup failed to run: {e}") from e
        if res.returncode != 0 or not (self._dir / _STATE_FILE).exists():
            self._discard_state()
            out = (res.stdout + res.stderr).decode(errors="replace")[-2000:]
            raise TpmError(f"swtpm_setup failed (exit {res.returncode}): {out}")

    def _discard_state(self) -> None:
        # A half-manufactured TPM must not be mistaken for a set-up one on the next try.
        with contextlib.suppress(FileNotFoundError):
            (self._dir / _STATE_FILE).unlink()

    # -- adoption --------------------------------------------------------------------------

    def _find_running(self) -> tuple[int, int] | None:
        """(pid, port) of a live swtpm for this dir that answers, else None (stale files go)."""
        endpoint = self._read_endpoint()
        pid = self._read_pid_file()
        if endpoint is not None and pid is not None and endpoint.get("pid") == pid:
            port = endpoint.get("port")
            if isinstance(port, int) and self._is_our_swtpm(pid):
                if _wait_port(port, START_TIMEOUT_S, lambda: self._is_our_swtpm(pid)):
                    return pid, port
                # Alive but deaf: it is ours and useless; power it off rather than wedge.
                _terminate(pid)
        elif pid is not None and self._is_our_swtpm(pid):
            # Started without (or lost) its endpoint file: we cannot know its port.
            _terminate(pid)
        for name in (_ENDPOINT_FILE, _PID_FILE):
            with contextlib.suppress(FileNotFoundError):
                (self._dir / name).unlink()
        return None

    def _read_endpoint(self) -> dict[str, object] | None:
        try:
            data = json.loads((self._dir / _ENDPOINT_FILE).read_bytes())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _read_pid_file(self) -> int | None:
        try:
            return int((self._dir / _PID_FILE).read_text().strip())
        except (OSError, ValueError):
            return None

    def _is_our_swtpm(self, pid: int) -> bool:
        """The pid is a live (non-zombie) swtpm serving exactly this state dir."""
        if pid <= 0 or not _alive(pid):
            return False
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return (
            len(argv) > 1
            and os.path.basename(argv[0]) == SWTPM.encode()
            and f"dir={self._dir}".encode() in argv
        )

    # -- starting --------------------------------------------------------------------------

    def _start(self) -> tuple[int, int]:
        last = ""
        for _ in range(3):  # free ports can be taken between probing and binding: retry
            port = _free_port_pair()
            err = self._spawn(port)
            if err is None:
                return self._await_started(port)
            last = err
        raise TpmError(f"swtpm failed to start: {last}")

    def _await_started(self, port: int) -> tuple[int, int]:
        """Wait (bounded) for the fresh swtpm to answer, then publish its endpoint atomically."""
        pid = self._read_pid_file()
        if pid is not None and _wait_port(port, START_TIMEOUT_S, lambda: self._is_our_swtpm(pid)):
            payload: dict[str, object] = {
                "pid": pid,
                "port": port,
                "ctrl_port": port + 1,
                "state_dir": str(self._dir),
            }
            _write_atomic(self._dir / _ENDPOINT_FILE, json.dumps(payload, sort_keys=True).encode())
            return pid, port
        if pid is not None and self._is_our_swtpm(pid):
            _terminate(pid)
        raise TpmError(f"swtpm did not come up within {START_TIMEOUT_S:g} s: {self._log_tail()}")

    def _spawn(self, port: int) -> str | None:
        """Run swtpm; with --daemon it forks after binding, so the parent exits at once with a
        meaningful status and nothing is left for us to reap (no zombie, no ResourceWarning)."""
        for name in (_PID_FILE, _ENDPOINT_FILE):
            with contextlib.suppress(FileNotFoundError):
                (self._dir / name).unlink()
        log = self._dir / _LOG_FILE
        argv = [
            SWTPM,
            "socket",
            "--tpm2",
            "--tpmstate",
            f"dir={self._dir}",
            "--server",
            f"type=tcp,port={port},bindaddr={_LOOPBACK}",
            "--ctrl",
            f"type=tcp,port={port + 1},bindaddr={_LOOPBACK}",
            "--flags",
            "not-need-init,startup-clear",
            "--pid",
            f"file={self._dir / _PID_FILE}",
            "--log",
            f"file={log}",
            "--daemon",
        ]
        try:
            with log.open("ab") as out:
                res = subprocess.run(
                    argv,
                    env=_ENV,
                    cwd=self._dir,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                    start_new_session=True,
                    timeout=START_TIMEOUT_S,
                    check=False,
                )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise TpmError(f"swtpm failed to run: {e}") from e
        if res.returncode != 0:
            return f"exit {res.returncode}: {self._log_tail()}"
        return None

    def _log_tail(self) -> str:
        try:
            with (self._dir / _LOG_FILE).open("rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 2000))
                return f.read().decode(errors="replace").strip()
        except OSError:
            return "(no log)"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise setup/start/stop across objects and processes sharing the state dir."""
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self._dir / _LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def _free_port_pair() -> int:
    """A loopback port P with P+1 also free at the time of asking (server, ctrl)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as a:
            a.bind((_LOOPBACK, 0))
            port = int(a.getsockname()[1])
            if port >= 65535:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as b:
                try:
                    b.bind((_LOOPBACK, port + 1))
                except OSError:
                    continue
                return port
    raise TpmError("swtpm: no free pair of loopback ports")


def _wait_port(port: int, timeout: float, still_alive: Callable[[], bool]) -> bool:
    """Poll until ``port`` accepts a connection; give up early if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((_LOOPBACK, port), timeout=0.5):
                return True
        except OSError:
            pass
        if not still_alive():
            return False
        time.sleep(0.05)
    return False


def _alive(pid: int) -> bool:
    """Live and not a zombie (a killed detached child may linger unreaped under some inits)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[:1]
    return state not in (["Z"], ["X"])


def _terminate(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    if _alive(pid):
        raise TpmError(f"swtpm pid {pid} survived SIGKILL")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
