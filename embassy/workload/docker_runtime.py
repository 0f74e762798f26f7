"""Runs a :class:`~embassy.workload.spec.WorkloadSpec` on Docker: a thin adapter over the SDK.

Two containers per embassy (see docs/adr/0004-netns-holder.md):

- the **netns holder** (``embassy-<id>-netns``): busybox ``sleep`` on the embassy's own
  bridge network ``embassy-<id>``, publishing the workload's ports. It owns the network
  namespace the seal is applied in, so a workload restart keeps the namespace and its rules.
- the **workload** (``embassy-<id>-<name>``): joins the holder's namespace
  (``network_mode=container:<holder id>``), every capability dropped except what the spec
  asks and the policy allows, and only two host mounts besides allowed spec mounts: the
  embassy's socket directory at ``/run/embassy`` and the activation directory.

Images are used by ID (``sha256:...``) once inspected, so a tag moved between the check
and the launch cannot swap the image. Nothing is ever pulled. Every Docker failure becomes
an :class:`~embassy.errors.EmbassyError` naming the operation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import docker
import docker.errors
from docker.types import Mount as DockerMount

from embassy.errors import (
    ConfigError,
    ConflictError,
    EmbassyError,
    NotFoundError,
    PolicyError,
    SealError,
    WorkloadError,
)
from embassy.workload.spec import (
    ACTIVATIONS_TARGET,
    SOCKET_TARGET,
    WorkloadSpec,
    check_launch_policy,
    launch_config_digest,
    mount_source_refusal,
)

log = logging.getLogger(__name__)

HOLDER_IMAGE = "embassy/canary:latest"
HOLDER_COMMAND = ("sleep", "2147483647")
HOLDER_PIDS_LIMIT = 8
HOLDER_MEMORY = 16 * 1024 * 1024
ROLE_LABEL = "org.embassy.role"
ID_LABEL = "org.embassy.id"
DIGEST_LABEL = "org.embassy.launch-digest"
ROLE_HOLDER = "netns-holder"
ROLE_WORKLOAD = "workload"
NO_NEW_PRIVILEGES = "no-new-privileges:true"
_EMBASSY_ID = re.compile(r"[a-z0-9][a-z0-9_.-]{0,39}")


@dataclass(frozen=True, slots=True)
class ImageInfo:
    ref: str
    digest: str  # the image ID, "sha256:<hex>": what the workload is created from
    labels: Mapping[str, str]
    command: tuple[str, ...] | None = None  # the image's own Cmd
    env: tuple[tuple[str, str], ...] = ()  # the image's own Env
    user: str | None = None

    def defaults(self, name: str) -> WorkloadSpec:
        """The image's own configuration as a spec: what an override is measured against."""
        return WorkloadSpec(
            name=name, image=self.ref, command=self.command, env=self.env, user=self.user
        )


@dataclass(frozen=True, slots=True)
class Launched:
    workload_id: str
    holder_id: str
    network: str  # the embassy's bridge network, or "none"
    holder_pid: int  # 0 when the holder is not running
    ipv4: str | None
    ipv6: str | None
    image_digest: str
    launch_digest: str  # hex SHA-256, launch_config_digest(spec, image_digest)


def network_name(embassy_id: str) -> str:
    return f"embassy-{embassy_id}"


def holder_name(embassy_id: str) -> str:
    return f"embassy-{embassy_id}-netns"


def workload_name(embassy_id: str, spec: WorkloadSpec) -> str:
    return f"embassy-{embassy_id}-{spec.name}"


@contextlib.contextmanager
def _op(operation: str) -> Iterator[None]:
    """Turn any Docker failure inside into an EmbassyError that names ``operation``."""
    try:
        yield
    except docker.errors.NotFound as exc:
        raise NotFoundError(f"docker: {operation}: {_explain(exc)}") from None
    except docker.errors.APIError as exc:
        text = _explain(exc)
        if exc.status_code == 409 or "already exists" in text or "is already in use" in text:
            raise ConflictError(f"docker: {operation}: {text}") from None
        raise WorkloadError(f"docker: {operation}: {text}") from None
    except docker.errors.DockerException as exc:
        raise WorkloadError(f"docker: {operation}: {exc}") from None
    except OSError as exc:  # requests' connection errors are OSErrors too
        raise WorkloadError(f"docker: {operation}: {exc}") from None


def _explain(exc: docker.errors.APIError) -> str:
    explanation = exc.explanation
    return str(explanation if explanation else exc)


def _env_pairs(env: Iterable[str] | None) -> tuple[tuple[str, str], ...]:
    pairs = (item.split("=", 1) for item in env or ())
    return tuple(sorted((p[0], p[1] if len(p) > 1 else "") for p in pairs))


def _check_dir(what: str, path: Path) -> str:
    if not path.is_absolute() or not path.is_dir():
        raise ConfigError(f"workload: {what} {path} must be an existing absolute directory")
    return str(path)


class DockerRuntime:
    """The embassy's Docker edge. ``close()`` it (or use ``with``) when it made its client."""

    def __init__(self, client: Any | None = None) -> None:
        self._owns_client = client is None
        if client is None:
            with _op("connect to the Docker daemon"):
                client = docker.from_env()
        self._client: Any = client

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> DockerRuntime:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ images

    def image_info(self, ref: str) -> ImageInfo:
        """Inspect a local image. Missing: PolicyError (no registry is ever used)."""
        try:
            with _op(f"inspect image {ref}"):
                image = self._client.images.get(ref)
        except NotFoundError:
            raise PolicyError(
                f"image {ref} is not present locally; build it (scripts/build_images.sh); "
                "no registry is used"
            ) from None
        attrs: Mapping[str, Any] = image.attrs
        config: Mapping[str, Any] = attrs.get("Config") or {}
        cmd = config.get("Cmd")
        return ImageInfo(
            ref=ref,
            digest=str(image.id),
            labels={str(k): str(v) for k, v in (config.get("Labels") or {}).items()},
            command=tuple(str(c) for c in cmd) if cmd else None,
            env=_env_pairs(config.get("Env")),
            user=str(config["User"]) if config.get("User") else None,
        )

    # ------------------------------------------------------------------ launch

    def launch(
        self,
        spec: WorkloadSpec,
        *,
        embassy_id: str,
        socket_dir: Path,
        activation_dir: Path,
        holder_image: str = HOLDER_IMAGE,
        before_start: Callable[[Launched], None] | None = None,
    ) -> Launched:
        """Check the policy, then start the netns holder and the workload that joins it.

        ``before_start`` (optional) runs once the holder's namespace exists and the workload
        is created but not started: the place to log launch events or put base rules in
        the namespace before any workload code runs. If anything fails, whatever this call
        created is removed again.
        """
        if not _EMBASSY_ID.fullmatch(embassy_id):
            raise ConfigError(
                f"workload: embassy id {embassy_id!r} must match {_EMBASSY_ID.pattern}"
            )
        info = self.image_info(spec.image)
        check_launch_policy(spec, info.labels, info.defaults(spec.name))
        # Docker follows symlinks in a bind source: check where each one really leads.
        sources = []
        for mount in spec.mounts:
            real = os.path.realpath(mount.source)
            reason = mount_source_refusal(real)
            if reason:
                raise PolicyError(f"{reason} (mount source {mount.source} resolves to {real})")
            sources.append(real)
        socket_src = _check_dir("socket_dir", socket_dir)
        activation_src = _check_dir("activation_dir", activation_dir)
        holder_info = self.image_info(holder_image)
        launch_digest = launch_config_digest(spec, info.digest).hex()
        labels = {ID_LABEL: embassy_id}

        created: list[Any] = []
        made_network: Any = None
        try:
            if spec.network_mode == "none":
                net = "none"
            else:
                net, made_network = self._ensure_network(embassy_id)
            with _op(f"create the netns holder {holder_name(embassy_id)}"):
                holder = self._client.containers.create(
                    holder_info.digest,
                    command=list(HOLDER_COMMAND),
                    name=holder_name(embassy_id),
                    **({"network_mode": "none"} if net == "none" else {"network": net}),
                    ports=_port_bindings(spec),
                    cap_drop=["ALL"],
                    security_opt=[NO_NEW_PRIVILEGES],
                    read_only=True,
                    restart_policy={"Name": "no"},
                    labels={**labels, ROLE_LABEL: ROLE_HOLDER},
                    pids_limit=HOLDER_PIDS_LIMIT,
                    mem_limit=HOLDER_MEMORY,
                    stop_signal="SIGKILL",  # busybox sleep as PID 1 ignores SIGTERM
                    ipc_mode="private",
                )
            created.append(holder)
            with _op(f"start the netns holder {holder.id}"):
                holder.start()
            mounts = [
                DockerMount(SOCKET_TARGET, socket_src, type="bind", read_only=True),
                DockerMount(ACTIVATIONS_TARGET, activation_src, type="bind", read_only=False),
                *(
                    DockerMount(m.target, src, type="bind", read_only=m.read_only)
                    for m, src in zip(spec.mounts, sources, strict=True)
                ),
            ]
            with _op(f"create the workload {workload_name(embassy_id, spec)}"):
                workload = self._client.containers.create(
                    info.digest,
                    command=None if spec.command is None else list(spec.command),
                    name=workload_name(embassy_id, spec),
                    network_mode=f"container:{holder.id}",
                    cap_drop=["ALL"],
                    cap_add=list(spec.cap_add) or None,
                    security_opt=[NO_NEW_PRIVILEGES],
                    mounts=mounts,
                    environment=dict(spec.env) or None,
                    mem_limit=spec.limits.memory_bytes,
                    nano_cpus=spec.limits.nano_cpus,
                    pids_limit=spec.limits.pids,
                    user=spec.user,
                    restart_policy={"Name": "no"},
                    labels={
                        **labels,
                        ROLE_LABEL: ROLE_WORKLOAD,
                        DIGEST_LABEL: launch_digest,
                    },
                    ipc_mode="private",
                )
            created.append(workload)
            launched = self._inspect(
                Launched(
                    workload_id=str(workload.id),
                    holder_id=str(holder.id),
                    network=net,
                    holder_pid=0,
                    ipv4=None,
                    ipv6=None,
                    image_digest=info.digest,
                    launch_digest=launch_digest,
                )
            )
            if before_start is not None:
                before_start(launched)
            with _op(f"start the workload {workload.id}"):
                workload.start()
            return self.refresh(launched)
        except BaseException:
            self._undo(created, made_network)
            raise

    def _ensure_network(self, embassy_id: str) -> tuple[str, Any]:
        """The embassy's bridge network: (name, the network if this call created it)."""
        name = network_name(embassy_id)
        with _op(f"look up network {name}"):
            found = self._client.networks.list(names=[name])
        for network in found:
            if network.name != name:
                continue
            owner = (network.attrs.get("Labels") or {}).get(ID_LABEL)
            if owner != embassy_id:
                raise ConflictError(
                    f"docker: network {name} already exists and is not this embassy's "
                    f"(label {ID_LABEL}={owner!r})"
                )
            return name, None
        with _op(f"create network {name}"):
            network = self._client.networks.create(
                name, driver="bridge", labels={ID_LABEL: embassy_id, ROLE_LABEL: "network"}
            )
        return name, network

    def _undo(self, created: list[Any], network: Any) -> None:
        for container in reversed(created):
            try:
                with _op(f"remove container {container.id}"):
                    container.remove(force=True)
            except EmbassyError as exc:
                log.warning("launch cleanup: %s", exc)
        if network is not None:
            try:
                with _op(f"remove network {network.name}"):
                    network.remove()
            except EmbassyError as exc:
                log.warning("launch cleanup: %s", exc)

    # ------------------------------------------------------------------ state

    def _inspect(self, launched: Launched) -> Launched:
        with _op(f"inspect the netns holder {launched.holder_id}"):
            holder = self._client.containers.get(launched.holder_id)
        state: Mapping[str, Any] = holder.attrs.get("State") or {}
        running = bool(state.get("Running"))
        networks: Mapping[str, Any] = (holder.attrs.get("NetworkSettings") or {}).get(
            "Networks"
        ) or {}
        endpoint: Mapping[str, Any] = networks.get(launched.network) or {}
        return dataclasses.replace(
            launched,
            holder_pid=int(state.get("Pid") or 0) if running else 0,
            ipv4=endpoint.get("IPAddress") or None,
            ipv6=endpoint.get("GlobalIPv6Address") or None,
        )

    def refresh(self, launched: Launched) -> Launched:
        """Re-inspect after a restart: the holder's pid and addresses.

        NotFoundError if either container is gone; SealError if the workload no longer
        joins the holder's namespace (someone recreated it differently).
        """
        with _op(f"inspect the workload {launched.workload_id}"):
            workload = self._client.containers.get(launched.workload_id)
        mode = (workload.attrs.get("HostConfig") or {}).get("NetworkMode")
        if mode != f"container:{launched.holder_id}":
            raise SealError(
                f"workload {launched.workload_id} has network mode {mode!r}, not the netns "
                f"holder's container:{launched.holder_id}"
            )
        return self._inspect(launched)

    def workload_pid(self, launched: Launched) -> int:
        """The workload's main pid on the host (0 when it is not running)."""
        with _op(f"inspect the workload {launched.workload_id}"):
            workload = self._client.containers.get(launched.workload_id)
        state: Mapping[str, Any] = workload.attrs.get("State") or {}
        return int(state.get("Pid") or 0) if state.get("Running") else 0

    def in_sealed_netns(self, launched: Launched) -> bool:
        """True when the running workload's network namespace is the holder's.

        Check it before releasing a key: after a holder restart a workload can be left in
        (or started into) a namespace the seal was not applied to.
        """
        pid = self.workload_pid(launched)
        if pid == 0 or launched.holder_pid == 0:
            return False
        try:
            mine = os.stat(f"/proc/{pid}/ns/net")
            holders = os.stat(netns_path(launched))
        except OSError:
            return False
        return (mine.st_dev, mine.st_ino) == (holders.st_dev, holders.st_ino)

    def find(self, embassy_id: str) -> Launched | None:
        """The containers a previous run of this embassy launched (after a daemon restart).

        None when there are none; ConflictError when only one of the two exists or there
        are several workloads.
        """
        with _op(f"list containers of embassy {embassy_id}"):
            found = self._client.containers.list(
                all=True, filters={"label": f"{ID_LABEL}={embassy_id}"}
            )
        roles: dict[str, list[Any]] = {}
        for container in found:
            roles.setdefault(container.labels.get(ROLE_LABEL, ""), []).append(container)
        holders, workloads = roles.get(ROLE_HOLDER, []), roles.get(ROLE_WORKLOAD, [])
        if not holders and not workloads:
            return None
        if len(holders) != 1 or len(workloads) != 1:
            raise ConflictError(
                f"docker: embassy {embassy_id} has {len(holders)} netns holder(s) and "
                f"{len(workloads)} workload(s); expected one of each"
            )
        holder, workload = holders[0], workloads[0]
        networks = (holder.attrs.get("NetworkSettings") or {}).get("Networks") or {}
        net = network_name(embassy_id) if network_name(embassy_id) in networks else "none"
        return self.refresh(
            Launched(
                workload_id=str(workload.id),
                holder_id=str(holder.id),
                network=net,
                holder_pid=0,
                ipv4=None,
                ipv6=None,
                image_digest=str(workload.attrs.get("Image", "")),
                launch_digest=str(workload.labels.get(DIGEST_LABEL, "")),
            )
        )

    def remove(self, launched: Launched) -> None:
        """Force-remove the workload, then the holder, then the embassy's network.

        Already-gone parts are fine; the first other failure is raised after trying all.
        """
        errors: list[EmbassyError] = []
        for cid in (launched.workload_id, launched.holder_id):
            try:
                with _op(f"remove container {cid}"):
                    self._client.containers.get(cid).remove(force=True)
            except NotFoundError:
                pass
            except EmbassyError as exc:
                errors.append(exc)
        if launched.network != "none":
            try:
                with _op(f"remove network {launched.network}"):
                    self._client.networks.get(launched.network).remove()
            except NotFoundError:
                pass
            except EmbassyError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    # ------------------------------------------------------------------ events

    def watch_starts(
        self,
        container_ids: Iterable[str],
        callback: Callable[[str], None],
        *,
        on_end: Callable[[], None] | None = None,
    ) -> Callable[[], None]:
        """Call ``callback(container_id)`` from a daemon thread when one of ours starts.

        A holder start means a new network namespace: re-seal it. Returns ``stop()``, which
        closes the event stream and joins the thread. ``on_end`` runs if the stream ends
        without ``stop()`` (dockerd went away): fail closed there, events may be lost.
        """
        ids = frozenset(container_ids)
        with _op("watch container start events"):
            stream = self._client.events(
                decode=True, filters={"type": "container", "event": "start"}
            )
        stopping = threading.Event()

        def run() -> None:
            try:
                for event in stream:
                    cid = event.get("id") or (event.get("Actor") or {}).get("ID")
                    if cid in ids:
                        try:
                            callback(cid)
                        except Exception:
                            log.exception("start-event callback failed for %s", cid)
            except Exception:  # the stream broke: same as its end
                log.exception("docker event stream failed")
            finally:
                if not stopping.is_set() and on_end is not None:
                    on_end()

        thread = threading.Thread(target=run, name="embassy-docker-events", daemon=True)
        thread.start()

        def stop() -> None:
            stopping.set()
            with contextlib.suppress(OSError, docker.errors.DockerException):
                stream.close()
            thread.join(timeout=10)

        return stop


def netns_path(launched: Launched) -> Path:
    """The holder's network namespace, where the seal is applied."""
    if launched.holder_pid <= 0:
        raise SealError(
            f"netns holder {launched.holder_id} is not running: there is no namespace to seal"
        )
    return Path(f"/proc/{launched.holder_pid}/ns/net")


def _port_bindings(spec: WorkloadSpec) -> dict[str, list[tuple[str, int | None]]] | None:
    bindings: dict[str, list[tuple[str, int | None]]] = {}
    for port in spec.ports:
        bindings.setdefault(f"{port.container_port}/{port.protocol}", []).append(
            (port.host_ip, port.host_port or None)
        )
    return bindings or None
