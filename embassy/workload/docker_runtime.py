"""Runs a :class:`~embassy.workload.spec.WorkloadSpec` on Docker: a thin adapter over the SDK.

One container per embassy, the **workload** (``embassy-<id>-<name>``), created with
Docker's ``none`` network: Docker gives its namespace loopback only, at every (re)start,
and the embassy gives it its one link (:mod:`embassy.net.link`) with the gate as the open
sessions require (docs/adr/0009-link-gate.md). Every capability is dropped except what the
spec asks and the policy allows; the only host mounts besides allowed spec mounts are the
embassy's socket directory at ``/run/embassy`` and the activation directory.

The embassy's network ``embassy-<id>`` is a Docker bridge network (other containers may
join it; Docker forwards and masquerades for it) whose IPAM reserves the workload's
addresses as auxiliary addresses, so Docker never gives them to anyone else.

Images are used by ID (``sha256:...``) once inspected, so a tag moved between the check
and the launch cannot swap the image. Nothing is ever pulled. Every Docker failure becomes
an :class:`~embassy.errors.EmbassyError` naming the operation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
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
from docker.types import IPAMConfig, IPAMPool
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
from embassy.net.plan import (
    RESERVATION,
    LinkPlan,
    Published,
    bridge_name,
    host_link_name,
    parse_published,
    ula_subnet,
    workload_address4,
    workload_address6,
    workload_mac,
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

ROLE_LABEL = "org.embassy.role"
ID_LABEL = "org.embassy.id"
DIGEST_LABEL = "org.embassy.launch-digest"
PORTS_LABEL = "org.embassy.ports"
ROLE_WORKLOAD = "workload"
ROLE_NETWORK = "network"
ROLE_HOLDER = "netns-holder"  # the design before the link gate: refused at adoption
NO_NEW_PRIVILEGES = "no-new-privileges:true"
BRIDGE_NAME_OPTION = "com.docker.network.bridge.name"
MTU_OPTION = "com.docker.network.driver.mtu"
_EMBASSY_ID = re.compile(r"[a-z0-9][a-z0-9_.-]{0,39}")
_JOIN_MODES = ("NetworkMode", "PidMode", "IpcMode")


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
    name: str
    network: str  # the embassy's bridge network, or "none"
    pid: int  # the workload's main process on the host; 0 when it is not running
    image_digest: str
    launch_digest: str  # hex SHA-256, launch_config_digest(spec, image_digest)
    ports: tuple[Published, ...] = ()


def network_name(embassy_id: str) -> str:
    return f"embassy-{embassy_id}"


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

    # ------------------------------------------------------------------ network

    def ensure_network(self, embassy_id: str) -> LinkPlan:
        """The embassy's bridge network (created if missing) as the workload's link plan.

        Created in two steps so that Docker still chooses a free IPv4 subnet: once to learn
        its choice, then again with the same subnet and the workload's addresses reserved
        (Docker's IPAM needs an explicit subnet for a reservation). IPv6 gets a unique-local
        /64 derived from the embassy id when the kernel has IPv6.
        """
        name = network_name(embassy_id)
        with _op(f"look up network {name}"):
            found = [n for n in self._client.networks.list(names=[name]) if n.name == name]
        if found:
            network = found[0]
            with _op(f"inspect network {name}"):
                network.reload()
            owner = (network.attrs.get("Labels") or {}).get(ID_LABEL)
            if owner != embassy_id:
                raise ConflictError(
                    f"docker: network {name} already exists and is not this embassy's "
                    f"(label {ID_LABEL}={owner!r})"
                )
            return _plan(embassy_id, network.attrs)
        bridge = bridge_name(embassy_id)
        labels = {ID_LABEL: embassy_id, ROLE_LABEL: ROLE_NETWORK}
        options = {BRIDGE_NAME_OPTION: bridge}
        with _op(f"create network {name}"):
            probe = self._client.networks.create(
                name, driver="bridge", options=options, labels=labels
            )
        try:
            with _op(f"inspect network {name}"):
                probe.reload()
            pool = (probe.attrs.get("IPAM") or {}).get("Config") or [{}]
            subnet4 = ipaddress.IPv4Network(pool[0]["Subnet"])
            gateway4 = pool[0].get("Gateway") or str(subnet4.network_address + 1)
        finally:
            with _op(f"remove network {name}"):
                probe.remove()
        pools = [
            IPAMPool(
                subnet=str(subnet4),
                gateway=gateway4,
                aux_addresses={RESERVATION: str(workload_address4(subnet4).ip)},
            )
        ]
        ipv6 = os.path.isdir("/proc/sys/net/ipv6")
        if ipv6:
            subnet6 = ula_subnet(embassy_id)
            pools.append(
                IPAMPool(
                    subnet=str(subnet6),
                    gateway=str(subnet6.network_address + 1),
                    aux_addresses={RESERVATION: str(workload_address6(subnet6).ip)},
                )
            )
        with _op(f"create network {name}"):
            network = self._client.networks.create(
                name,
                driver="bridge",
                options=options,
                labels=labels,
                enable_ipv6=ipv6,
                ipam=IPAMConfig(pool_configs=pools),
            )
            network.reload()
        return _plan(embassy_id, network.attrs)

    # ------------------------------------------------------------------ launch

    def launch(
        self,
        spec: WorkloadSpec,
        *,
        embassy_id: str,
        socket_dir: Path,
        activation_dir: Path,
        ports: tuple[Published, ...] = (),
        before_start: Callable[[Launched], None] | None = None,
    ) -> Launched:
        """Check the policy, then create and start the workload with no network.

        ``before_start`` (optional) runs once the container exists but has not run: the
        place to log launch events. If anything fails, the container is removed again.
        """
        if not _EMBASSY_ID.fullmatch(embassy_id):
            raise ConfigError(
                f"workload: embassy id {embassy_id!r} must match {_EMBASSY_ID.pattern}"
            )
        info, sources = self.preflight(spec)
        socket_src = _check_dir("socket_dir", socket_dir)
        activation_src = _check_dir("activation_dir", activation_dir)
        launch_digest = launch_config_digest(spec, info.digest).hex()
        net = "none" if spec.network_mode == "none" else network_name(embassy_id)
        mounts = [
            DockerMount(SOCKET_TARGET, socket_src, type="bind", read_only=True),
            DockerMount(ACTIVATIONS_TARGET, activation_src, type="bind", read_only=False),
            *(
                DockerMount(m.target, src, type="bind", read_only=m.read_only)
                for m, src in zip(spec.mounts, sources, strict=True)
            ),
        ]
        labels = {
            ID_LABEL: embassy_id,
            ROLE_LABEL: ROLE_WORKLOAD,
            DIGEST_LABEL: launch_digest,
            PORTS_LABEL: ",".join(p.text for p in ports),
        }
        with _op(f"create the workload {workload_name(embassy_id, spec)}"):
            workload = self._client.containers.create(
                info.digest,
                command=None if spec.command is None else list(spec.command),
                name=workload_name(embassy_id, spec),
                # Loopback only, at every start: the embassy makes the one link itself.
                network_mode="none",
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
                labels={**labels, "org.embassy.network": net},
                ipc_mode="private",
                runtime=spec.runtime,
            )
        try:
            launched = Launched(
                workload_id=str(workload.id),
                name=workload_name(embassy_id, spec),
                network=net,
                pid=0,
                image_digest=info.digest,
                launch_digest=launch_digest,
                ports=ports,
            )
            if before_start is not None:
                before_start(launched)
            with _op(f"start the workload {workload.id}"):
                workload.start()
            return self.refresh(launched)
        except BaseException:
            with contextlib.suppress(EmbassyError, docker.errors.DockerException):
                workload.remove(force=True)
            raise

    def preflight(self, spec: WorkloadSpec) -> tuple[ImageInfo, list[str]]:
        """Everything that refuses a workload, before anything is made for it: the image
        is here, the launch policy, the runtime, where each mount really leads. Returns the
        image and the mounts' real sources (Docker follows symlinks in a bind source)."""
        info = self.image_info(spec.image)
        check_launch_policy(spec, info.labels, info.defaults(spec.name))
        self.check_runtime(spec)
        sources = []
        for mount in spec.mounts:
            real = os.path.realpath(mount.source)
            reason = mount_source_refusal(real)
            if reason:
                raise PolicyError(f"{reason} (mount source {mount.source} resolves to {real})")
            sources.append(real)
        return info, sources

    def check_runtime(self, spec: WorkloadSpec) -> None:
        """Refuse a runtime that would not use the namespace the embassy wires.

        runc (Docker's default) does. gVisor's runsc does when registered with
        ``--network=host`` (its sentry then uses the kernel's stack in the container's
        namespace), or ``--network=none`` for a workload with no network at all; its own
        netstack would copy the namespace's interfaces once at start and never see the
        embassy's link. Any other runtime is refused: nothing says where its network is.
        """
        if spec.runtime is None:
            return
        with _op("read dockerd's runtimes"):
            runtimes: Mapping[str, Any] = self._client.info().get("Runtimes") or {}
        entry = runtimes.get(spec.runtime)
        if entry is None:
            raise PolicyError(
                f"workload runtime {spec.runtime!r} is not registered with dockerd (it has "
                f"{', '.join(sorted(runtimes)) or 'none'}); register it in /etc/docker/daemon.json"
            )
        program = os.path.basename(str(entry.get("path") or ""))
        args = [str(a) for a in entry.get("runtimeArgs") or []]
        if program == "runc":
            return
        if program == "runsc":
            want = "--network=none" if spec.network_mode == "none" else "--network=host"
            if [a for a in args if a.startswith("--network")] != [want]:
                raise PolicyError(
                    f"workload runtime {spec.runtime!r} is gVisor without {want} in its "
                    "runtimeArgs: its own netstack would not use the link the embassy gates"
                )
            return
        raise PolicyError(
            f"workload runtime {spec.runtime!r} runs {program or 'an unknown program'}: the "
            "embassy seals workloads under runc or gVisor's runsc only"
        )

    # ------------------------------------------------------------------ state

    def refresh(self, launched: Launched) -> Launched:
        """Re-inspect: the workload's current main pid (0 when it is not running).

        NotFoundError if the container is gone; SealError if it no longer has Docker's
        ``none`` network (someone recreated it differently).
        """
        with _op(f"inspect the workload {launched.workload_id}"):
            workload = self._client.containers.get(launched.workload_id)
        mode = (workload.attrs.get("HostConfig") or {}).get("NetworkMode")
        if mode != "none":
            raise SealError(
                f"workload {launched.workload_id} has network mode {mode!r}, not 'none': "
                "its namespace would not be the embassy's to wire"
            )
        state: Mapping[str, Any] = workload.attrs.get("State") or {}
        pid = int(state.get("Pid") or 0) if state.get("Running") else 0
        return dataclasses.replace(launched, pid=pid)

    def find(self, embassy_id: str) -> Launched | None:
        """The workload a previous run of this embassy launched (after a daemon restart).

        None when there is none; ConflictError when there are several, or containers of the
        design before the link gate (a netns holder) that must be removed first.
        """
        with _op(f"list containers of embassy {embassy_id}"):
            found = self._client.containers.list(
                all=True, filters={"label": f"{ID_LABEL}={embassy_id}"}
            )
        roles: dict[str, list[Any]] = {}
        for container in found:
            roles.setdefault(container.labels.get(ROLE_LABEL, ""), []).append(container)
        if roles.get(ROLE_HOLDER):
            raise ConflictError(
                f"docker: embassy {embassy_id} has a netns holder container from an earlier "
                "version: close its sessions, then remove its containers to launch anew"
            )
        workloads = roles.get(ROLE_WORKLOAD, [])
        if not workloads:
            return None
        if len(workloads) != 1:
            raise ConflictError(
                f"docker: embassy {embassy_id} has {len(workloads)} workloads; expected one"
            )
        workload = workloads[0]
        text = workload.labels.get(PORTS_LABEL, "")
        return self.refresh(
            Launched(
                workload_id=str(workload.id),
                name=str(workload.name),
                network=str(workload.labels.get("org.embassy.network", "none")),
                pid=0,
                image_digest=str(workload.attrs.get("Image", "")),
                launch_digest=str(workload.labels.get(DIGEST_LABEL, "")),
                ports=_ports_of(text),
            )
        )

    def remove(self, launched: Launched) -> None:
        """Force-remove the workload, then the embassy's network. Gone parts are fine."""
        errors: list[EmbassyError] = []
        try:
            with _op(f"remove container {launched.workload_id}"):
                self._client.containers.get(launched.workload_id).remove(force=True)
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

    # ------------------------------------------------------------------ joiners

    def joins(self, container_id: str, launched: Launched) -> list[str]:
        """Which of the workload's namespaces (network, pid, ipc) container ``container_id``
        joins (``container:<workload>``); empty for an unrelated container."""
        with _op(f"inspect container {container_id}"):
            attrs = self._client.containers.get(container_id).attrs
        host = attrs.get("HostConfig") or {}
        targets = {f"container:{launched.workload_id}", f"container:{launched.name}"}
        targets |= {f"container:{launched.workload_id[:n]}" for n in range(12, 64)}
        return [mode for mode in _JOIN_MODES if host.get(mode) in targets]

    def kill(self, container_id: str) -> None:
        with _op(f"kill container {container_id}"):
            self._client.containers.get(container_id).kill()

    # ------------------------------------------------------------------ events

    def watch(
        self,
        callback: Callable[[str, str], None],
        *,
        on_end: Callable[[], None] | None = None,
    ) -> Callable[[], None]:
        """Call ``callback(action, container_id)`` from a daemon thread for every container
        ``start`` and ``die``. Returns ``stop()``. ``on_end`` runs if the stream ends
        without ``stop()`` (dockerd went away): events may have been lost meanwhile.
        """
        with _op("watch container events"):
            stream = self._client.events(
                decode=True, filters={"type": "container", "event": ["start", "die"]}
            )
        stopping = threading.Event()

        def run() -> None:
            try:
                for event in stream:
                    cid = event.get("id") or (event.get("Actor") or {}).get("ID")
                    action = str(event.get("Action") or event.get("status") or "")
                    if cid:
                        try:
                            callback(action, str(cid))
                        except Exception:
                            log.exception("container event callback failed")
            except Exception:  # the stream broke: same as its end
                if not stopping.is_set():
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


def _ports_of(label: str) -> tuple[Published, ...]:
    try:
        return tuple(parse_published(text) for text in label.split(",") if text)
    except ValueError as exc:
        raise ConflictError(f"docker: the workload's {PORTS_LABEL} label: {exc}") from None


def _plan(embassy_id: str, attrs: Mapping[str, Any]) -> LinkPlan:
    """The workload's link plan from the network's inspect data (its reservations)."""
    name = attrs.get("Name")
    options: Mapping[str, str] = attrs.get("Options") or {}
    bridge = options.get(BRIDGE_NAME_OPTION)
    if bridge != bridge_name(embassy_id):
        raise ConflictError(
            f"docker: network {name} uses bridge {bridge!r}, not {bridge_name(embassy_id)!r}: "
            "it was made by another version; remove it (and the workload) to launch anew"
        )
    v4: tuple[ipaddress.IPv4Interface, ipaddress.IPv4Address] | None = None
    v6: tuple[ipaddress.IPv6Interface, ipaddress.IPv6Address] | None = None
    for pool in (attrs.get("IPAM") or {}).get("Config") or []:
        reserved = (pool.get("AuxiliaryAddresses") or {}).get(RESERVATION)
        if not reserved or not pool.get("Subnet") or not pool.get("Gateway"):
            continue
        subnet = ipaddress.ip_network(pool["Subnet"])
        address = ipaddress.ip_interface(f"{reserved}/{subnet.prefixlen}")
        gateway = ipaddress.ip_address(pool["Gateway"])
        if isinstance(address, ipaddress.IPv4Interface) and isinstance(
            gateway, ipaddress.IPv4Address
        ):
            v4 = (address, gateway)
        elif isinstance(address, ipaddress.IPv6Interface) and isinstance(
            gateway, ipaddress.IPv6Address
        ):
            v6 = (address, gateway)
    if v4 is None:
        raise ConflictError(
            f"docker: network {name} has no address reserved for the workload "
            f"({RESERVATION}): remove it to launch anew"
        )
    mtu = options.get(MTU_OPTION)
    return LinkPlan(
        host_name=host_link_name(embassy_id),
        bridge=bridge,
        mtu=int(mtu) if mtu and mtu.isascii() and mtu.isdigit() else None,
        ipv4=v4[0],
        gateway4=v4[1],
        ipv6=None if v6 is None else v6[0],
        gateway6=None if v6 is None else v6[1],
        mac=workload_mac(embassy_id),
    )
