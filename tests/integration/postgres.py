"""A private, throwaway PostgreSQL server for tests: ``initdb`` into a temporary directory,
``postgres`` listening only on a unix socket in that directory (no TCP), stopped and removed
afterwards.

PostgreSQL refuses to run as root, so under root it runs as the ``postgres`` system user
(``setpriv``, which execs, so the process we signal is the server itself), and that user
is given the directory. Authentication is ``trust``: the socket is in a 0700 directory that
only its owner (and root) can enter.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BIN_GLOB = "/usr/lib/postgresql/*/bin"
SERVER_USER = "postgres"
START_TIMEOUT_S = 60.0
_ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C", "LANG": "C"}


def find_bindir() -> Path | None:
    """Where ``initdb`` and ``postgres`` are: on PATH, or Debian's newest versioned dir."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("postgres"):
        return Path(on_path).resolve().parent
    candidates = [p for p in Path("/").glob(BIN_GLOB.lstrip("/")) if (p / "initdb").exists()]
    candidates.sort(key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    return candidates[-1] if candidates else None


@dataclass
class PostgresServer:
    root: Path
    proc: subprocess.Popen[bytes]

    @property
    def socket_dir(self) -> Path:
        return self.root / "sock"

    @property
    def log(self) -> Path:
        return self.root / "postgres.log"

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host={self.socket_dir} dbname={dbname} user=postgres"

    def create_database(self) -> str:
        """A fresh, empty database; its DSN."""
        import psycopg

        name = f"t_{secrets.token_hex(6)}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}".encode())
        return self.dsn(name)

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return ""


def _as_server_user() -> tuple[list[str], int, int]:
    """The argv prefix that drops to the server's user, and that user's uid and gid."""
    if os.geteuid() != 0:
        return [], os.getuid(), os.getgid()
    entry = pwd.getpwnam(SERVER_USER)
    prefix = [
        "setpriv",
        f"--reuid={entry.pw_uid}",
        f"--regid={entry.pw_gid}",
        "--clear-groups",
        "--",
    ]
    return prefix, entry.pw_uid, entry.pw_gid


@contextlib.contextmanager
def running_postgres(bindir: Path) -> Iterator[PostgresServer]:
    prefix, uid, gid = _as_server_user()
    root = Path(tempfile.mkdtemp(prefix="embassy-pg-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        (root / "sock").mkdir(mode=0o700)
        for path in (root, root / "sock"):
            os.chown(path, uid, gid)
        data = root / "data"
        subprocess.run(
            [
                *prefix,
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ],
            env=_ENV,
            check=True,
            capture_output=True,
            timeout=120,
        )
        log = root / "postgres.log"
        with open(log, "wb") as out:
            os.chown(log, uid, gid)
            proc = subprocess.Popen(
                [
                    *prefix,
                    str(bindir / "postgres"),
                    "-D",
                    str(data),
                    "-k",
                    str(root / "sock"),
                    "-c",
                    "listen_addresses=",
                    "-c",
                    "max_connections=50",
                ],
                env=_ENV,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        server = PostgresServer(root=root, proc=proc)
        _wait_ready(server)
        yield server
    finally:
        if proc is not None:
            # SIGINT: "fast" shutdown, rolling back open transactions.
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        shutil.rmtree(root, ignore_errors=True)


def _wait_ready(server: PostgresServer) -> None:
    import psycopg

    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if server.proc.poll() is not None:
            raise RuntimeError(f"postgres exited ({server.proc.returncode}):\n{server.log_tail()}")
        try:
            with psycopg.connect(server.dsn(), connect_timeout=2):
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"postgres not ready in {START_TIMEOUT_S:.0f}s:\n{server.log_tail()}"
                ) from None
            time.sleep(0.1)
