"""Job containers on Docker: created sealed, kept warm, destroyed and checked gone.

A job container is created with Docker's ``none`` network (loopback only, from creation:
there is no moment at which it has a link), a read-only root file system, a tmpfs at
``/tmp`` as its only scratch, every capability dropped, ``no-new-privileges``, a non-root
user, memory (no swap), CPU and pid limits, and two bind mounts: its own spool directory
(``/job``: the encrypted input in, the encrypted result out) and the embassy's socket
directory (read-only). What Docker recorded is read back before the container first runs;
a container that is not exactly that is removed and refused.

Destroying is ``docker rm -f -v`` and the spool's removal, then a check of each part:
the container inspects as 404, its writable layer's directory and its spool are gone from
the host, and no mount of the daemon's namespace names either. The check's findings are
what the ``job-destroyed`` statement says was checked.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors
from docker.types import Mount as DockerMount

from embassy.config import Jobs
from embassy.daemon.atomic import write_atomic
from embassy.daemon.spool import detach, mount_tmpfs
from embassy.errors import ConfigError, PolicyError, SealError, StorageError, WorkloadError
from embassy.workload.docker_runtime import ID_LABEL, NO_NEW_PRIVILEGES, ROLE_LABEL

log = logging.getLogger(__name__)

ROLE_JOB = "job"
SPOOL_TARGET = "/job"
SOCKET_TARGET = "/run/embassy"
SCRATCH_TARGET = "/tmp"  # noqa: S108 (inside the job container: its own tmpfs)
INPUT_NAME = "input"
OUTPUT_NAME = "output"
NETWORK_NONE = "none"


@dataclass(frozen=True, slots=True)
class Slot:
    """One job container, created and started, waiting for (or running) a job."""

    container_id: str
    name: str
    spool: Path
    image_digest: str
    runtime: str  # "runc" or the registered runtime's name
    created: str  # Docker's RFC 3339 times
    started: str
    upper_dir: str | None  # the writable layer's directory on the host, if Docker says
    network: str = NETWORK_NONE

    def to_json(self) -> dict[str, Any]:
        return {
            "container_id": self.container_id,
            "image_digest": self.image_digest,
            "runtime": self.runtime,
            "network": self.network,
            "created": self.created,
            "started": self.started,
        }


@dataclass(frozen=True, slots=True)
class Gone:
    """What was checked to be gone after a destroy; ``ok`` when everything was."""

    container: str  # "inspect-404" or what inspect still says
    writable_layer: str  # "absent", "not-reported" or "present"
    spool: str  # "absent" or "present"
    mounts: str  # "none" or how many mounts still name the container or spool

    @property
    def ok(self) -> bool:
        return (
            self.container == "inspect-404"
            and self.writable_layer in ("absent", "not-reported")
            and self.spool == "absent"
            and self.mounts == "none"
        )

    def to_json(self) -> dict[str, str]:
        return {
            "container": self.container,
            "writable_layer": self.writable_layer,
            "spool": self.spool,
            "mounts": self.mounts,
        }


@contextlib.contextmanager
def _op(operation: str) -> Iterator[None]:
    try:
        yield
    except docker.errors.APIError as exc:
        raise WorkloadError(f"docker: {operation}: {exc.explanation or exc}") from None
    except (docker.errors.DockerException, OSError) as exc:
        raise WorkloadError(f"docker: {operation}: {exc}") from None


def embassy_id(data_dir: Path) -> str:
    """The embassy's id for its containers (the same file the workload's launch uses)."""
    path = data_dir / "embassy-id"
    if not path.exists():
        write_atomic(path, secrets.token_hex(6).encode())
    return path.read_text().strip()


SPOOL_SOURCE = "embassy-job-spool"
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 2, 4, 8


def mount_spool(path: Path, size: int, uid: int, gid: int) -> None:
    """A tmpfs of ``size`` bytes on ``path``: a job cannot fill the host's disk, and its
    spool never reaches it (the input is ciphertext; the output too, but it is the job's)."""
    data = f"size={size},nr_inodes=64,mode=0700,uid={uid},gid={gid}"
    flags = _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
    try:
        mount_tmpfs(SPOOL_SOURCE, path, flags, data)
    except OSError as exc:
        raise StorageError(
            f"jobs: cannot mount a tmpfs spool on {path}: {exc.strerror} (the daemon "
            "must run as root in the host's mount namespace)"
        ) from None


def unmount_spool(path: Path) -> None:
    """Detach the spool's tmpfs if one is there (its pages go with the last reference)."""
    if os.path.ismount(path):
        detach(path)


def check_runtime(runtimes: Mapping[str, Any], runtime: str | None) -> str:
    """The runtime's name if job containers may use it: runc, or gVisor with no network.

    A gVisor runtime with its own netstack or the host's would give the sandbox a network;
    any other program: nothing says what it does with the ``none`` network.
    """
    if runtime is None:
        return "runc"
    entry = runtimes.get(runtime)
    if entry is None:
        raise PolicyError(
            f"jobs.runtime {runtime!r} is not registered with dockerd (it has "
            f"{', '.join(sorted(runtimes)) or 'none'}); scripts/ensure_dockerd.sh registers "
            "runsc-nonet"
        )
    program = os.path.basename(str(entry.get("path") or ""))
    args = [str(a) for a in entry.get("runtimeArgs") or []]
    if program == "runc":
        return runtime
    if program == "runsc":
        if [a for a in args if a.startswith("--network")] != ["--network=none"]:
            raise PolicyError(
                f"jobs.runtime {runtime!r} is gVisor without exactly --network=none in its "
                "runtimeArgs: a job never has a network"
            )
        return runtime
    raise PolicyError(
        f"jobs.runtime {runtime!r} runs {program or 'an unknown program'}: jobs run under "
        "runc or gVisor's runsc only"
    )


def check_created(attrs: Mapping[str, Any], *, user: str) -> None:
    """Refuse a container whose recorded configuration is not a sealed job's."""
    host: Mapping[str, Any] = attrs.get("HostConfig") or {}
    config: Mapping[str, Any] = attrs.get("Config") or {}
    problems = []
    if host.get("NetworkMode") != NETWORK_NONE:
        problems.append(f"HostConfig.NetworkMode is {host.get('NetworkMode')!r}, not 'none'")
    networks = (attrs.get("NetworkSettings") or {}).get("Networks") or {}
    if set(networks) - {NETWORK_NONE}:
        problems.append(f"NetworkSettings.Networks has {sorted(networks)}")
    if not host.get("ReadonlyRootfs"):
        problems.append("HostConfig.ReadonlyRootfs is not true")
    if "ALL" not in (host.get("CapDrop") or []) or host.get("CapAdd"):
        problems.append("HostConfig.CapDrop is not ALL with nothing added")
    if host.get("Privileged"):
        problems.append("HostConfig.Privileged is true")
    if NO_NEW_PRIVILEGES not in (host.get("SecurityOpt") or []):
        problems.append("HostConfig.SecurityOpt lacks no-new-privileges")
    if config.get("User") != user:
        problems.append(f"Config.User is {config.get('User')!r}, not {user!r}")
    for mode in ("PidMode", "IpcMode", "UTSMode"):
        if str(host.get(mode) or "").startswith(("host", "container:")):
            problems.append(f"HostConfig.{mode} is {host.get(mode)!r}")
    if problems:
        raise SealError("job container refused: " + "; ".join(problems))


def mounts_naming(needles: list[str], mountinfo: Path = Path("/proc/self/mountinfo")) -> int:
    """How many mounts of this process's namespace name any of ``needles`` (a path or id)."""
    try:
        text = mountinfo.read_text()
    except OSError:
        return 0
    needles = [n for n in needles if n]
    return sum(1 for line in text.splitlines() if any(n in line for n in needles))


class JobContainers:
    """The Docker edge of job mode (one per embassy). Thread-safe: Docker's client is."""

    def __init__(
        self,
        jobs: Jobs,
        *,
        embassy_id: str,
        socket_dir: Path,
        spool_root: Path,
        socket_gid: int,
        socket_name: str = "embassy.sock",
        client: Any | None = None,
    ) -> None:
        self._socket_name = socket_name
        self._jobs = jobs
        self._id = embassy_id
        self._socket_dir = socket_dir
        self._spool_root = spool_root
        self._gid = socket_gid
        self._owns = client is None
        if client is None:
            with _op("connect to the Docker daemon"):
                client = docker.from_env()
        self._client: Any = client
        uid, _, gid = jobs.user.partition(":")
        self._uid = int(uid)
        self._user = jobs.user
        self._user_gid = int(gid) if gid else None
        self.image_digest = ""
        self.runtime = "runc"

    def close(self) -> None:
        if self._owns:
            self._client.close()

    # -- preparation ------------------------------------------------------------------------

    def prepare(self) -> str:
        """Inspect the image (never pulled) and the runtime; the image's ID, used from then."""
        with _op("read dockerd's runtimes"):
            runtimes = self._client.info().get("Runtimes") or {}
        self.runtime = check_runtime(runtimes, self._jobs.runtime)
        try:
            with _op(f"inspect image {self._jobs.image}"):
                image = self._client.images.get(self._jobs.image)
        except WorkloadError:
            raise PolicyError(
                f"jobs.image {self._jobs.image} is not present locally; build it "
                "(examples/job_service/build.sh); no registry is used"
            ) from None
        self.image_digest = str(image.id)
        if not self._socket_dir.is_absolute() or not self._socket_dir.is_dir():
            raise ConfigError(f"jobs: socket directory {self._socket_dir} does not exist")
        self._spool_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        return self.image_digest

    # -- create -----------------------------------------------------------------------------

    def create(self) -> Slot:
        """Create a sealed job container with a fresh spool, check it, start it."""
        name = f"embassy-{self._id}-job-{secrets.token_hex(6)}"
        spool = self._spool_root / name
        spool.mkdir(mode=0o700)
        jobs = self._jobs
        try:
            mount_spool(
                spool,
                jobs.max_input_bytes + jobs.max_output_bytes + (1 << 20),
                self._uid,
                self._user_gid if self._user_gid is not None else self._gid,
            )
        except BaseException:
            spool.rmdir()
            raise
        mounts = [
            DockerMount(SPOOL_TARGET, str(spool), type="bind", read_only=False),
            DockerMount(SOCKET_TARGET, str(self._socket_dir), type="bind", read_only=True),
        ]
        try:
            with _op(f"create job container {name}"):
                container = self._client.containers.create(
                    self.image_digest,
                    command=None if jobs.command is None else list(jobs.command),
                    name=name,
                    network_mode=NETWORK_NONE,  # loopback only, from creation on
                    read_only=True,
                    tmpfs={SCRATCH_TARGET: f"size={jobs.scratch_bytes},mode=1777,nosuid,nodev"},
                    cap_drop=["ALL"],
                    security_opt=[NO_NEW_PRIVILEGES],
                    mounts=mounts,
                    user=self._user,
                    group_add=[str(self._gid)],
                    mem_limit=jobs.memory,
                    memswap_limit=jobs.memory,
                    nano_cpus=jobs.cpus * 1_000_000,
                    pids_limit=jobs.pids,
                    ipc_mode="private",
                    restart_policy={"Name": "no"},
                    labels={ID_LABEL: self._id, ROLE_LABEL: ROLE_JOB},
                    environment={
                        "EMBASSY_JOB_DIR": SPOOL_TARGET,
                        "EMBASSY_SOCKET": f"{SOCKET_TARGET}/{self._socket_name}",
                        "HOME": SCRATCH_TARGET,
                    },
                    runtime=jobs.runtime,
                )
        except BaseException:
            unmount_spool(spool)
            shutil.rmtree(spool, ignore_errors=True)
            raise
        try:
            check_created(container.attrs, user=self._user)
            with _op(f"start job container {name}"):
                container.start()
                container.reload()
            attrs = container.attrs
            check_created(attrs, user=self._user)
            driver = (attrs.get("GraphDriver") or {}).get("Data") or {}
            return Slot(
                container_id=str(container.id),
                name=name,
                spool=spool,
                image_digest=self.image_digest,
                runtime=self.runtime,
                created=str(attrs.get("Created") or ""),
                started=str((attrs.get("State") or {}).get("StartedAt") or ""),
                upper_dir=driver.get("UpperDir"),
            )
        except BaseException:
            self._remove(str(container.id), spool)
            raise

    # -- state ------------------------------------------------------------------------------

    def state(self, slot: Slot) -> tuple[bool, int | None]:
        """(running, exit code if it exited); (False, None) when the container is gone."""
        try:
            with _op(f"inspect job container {slot.name}"):
                attrs = self._client.api.inspect_container(slot.container_id)
        except WorkloadError:
            return False, None
        state = attrs.get("State") or {}
        running = bool(state.get("Running"))
        return running, None if running else int(state.get("ExitCode") or 0)

    # -- destroy ----------------------------------------------------------------------------

    def _remove(self, container_id: str, spool: Path) -> None:
        with contextlib.suppress(docker.errors.NotFound):
            try:
                self._client.api.remove_container(container_id, v=True, force=True)
            except docker.errors.APIError as exc:
                if exc.status_code != 404:
                    log.warning("job container %s: remove failed", container_id[:12])
        unmount_spool(spool)
        shutil.rmtree(spool, ignore_errors=True)

    def destroy(self, slot: Slot) -> Gone:
        """``docker rm -f -v``, remove the spool, then check each is gone (see module doc)."""
        self._remove(slot.container_id, slot.spool)
        return self.check_gone(slot.container_id, slot.spool, slot.upper_dir)

    def check_gone(self, container_id: str, spool: Path, upper_dir: str | None) -> Gone:
        container = "inspect-404"
        try:
            attrs = self._client.api.inspect_container(container_id)
            container = f"still there ({(attrs.get('State') or {}).get('Status')})"
        except docker.errors.NotFound:
            pass
        except docker.errors.DockerException as exc:
            container = f"unknown ({type(exc).__name__})"
        if upper_dir is None:
            layer = "not-reported"
        else:
            layer = "present" if os.path.lexists(upper_dir) else "absent"
        layer_dir = str(Path(upper_dir).parent) if upper_dir else ""
        left = mounts_naming([container_id, str(spool), layer_dir])
        return Gone(
            container=container,
            writable_layer=layer,
            spool="present" if os.path.lexists(spool) else "absent",
            mounts="none" if left == 0 else f"{left} left",
        )

    def sweep(self) -> list[tuple[str, Gone]]:
        """Remove every job container of this embassy and every spool left (at start)."""
        with _op(f"list job containers of embassy {self._id}"):
            found = self._client.api.containers(
                all=True, filters={"label": [f"{ID_LABEL}={self._id}", f"{ROLE_LABEL}={ROLE_JOB}"]}
            )
        out = []
        for item in found:
            cid = str(item["Id"])
            name = str((item.get("Names") or ["/"])[0]).lstrip("/")
            upper = None
            with contextlib.suppress(docker.errors.DockerException):
                attrs = self._client.api.inspect_container(cid)
                upper = ((attrs.get("GraphDriver") or {}).get("Data") or {}).get("UpperDir")
            spool = self._spool_root / name
            self._remove(cid, spool)
            out.append((cid, self.check_gone(cid, spool, upper)))
        if self._spool_root.is_dir():
            for left in self._spool_root.iterdir():
                unmount_spool(left)
                shutil.rmtree(left, ignore_errors=True)
        return out
