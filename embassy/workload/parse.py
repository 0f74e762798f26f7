"""Parsing the workload spec from its three layers: the ``workload:`` section of the YAML
config, the runtime metadata file named by ``workload_metadata`` (how a NixOS image is told
its workload at boot), and ``EMBASSY_WORKLOAD_*`` environment variables, each overriding the
one before. Unknown keys and bad values are refused with the key's dotted path
(``config: workload.ports[1]: ...``) or the variable's name (``env EMBASSY_WORKLOAD_COMMAND:
...``). Pure."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from embassy.validate import as_str, fail, show_key
from embassy.workload.schema import ENV_PREFIX, WORKLOAD_SCHEMA, Limits, WorkloadSpec
from embassy.workload.values import (
    CONVERT,
    MAX_JSON_ENV,
    as_command,
    as_env,
    ports_from_env,
)

_KEYS = frozenset(k.name for k in WORKLOAD_SCHEMA)
_ENV_VARS = {ENV_PREFIX + k.env: k.name for k in WORKLOAD_SCHEMA if k.env is not None}


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _json_env(where: str, text: str) -> Any:
    if len(text) > MAX_JSON_ENV:
        raise fail(where, f"longer than {MAX_JSON_ENV} characters ({len(text)})")
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise fail(where, f"invalid JSON: {exc.msg} at offset {exc.pos}") from None
    except RecursionError:
        raise fail(where, "invalid JSON: nested too deeply") from None
    except ValueError:  # NaN/Infinity, or an integer of more than 4,300 digits
        raise fail(where, "invalid JSON: a non-finite number or an integer too long") from None


def _from_environ(environ: Mapping[str, str]) -> dict[str, tuple[str, Any]]:
    """The EMBASSY_WORKLOAD_* overrides, converted; each with the name errors report."""
    out: dict[str, tuple[str, Any]] = {}
    for var in sorted(environ):
        if not var.startswith(ENV_PREFIX):
            continue
        where = f"env {show_key(var)}"
        key = _ENV_VARS.get(var)
        if key is None:
            raise fail(where, f"unknown variable (known: {', '.join(sorted(_ENV_VARS))})")
        # Python decodes a non-UTF-8 environment with surrogates: refuse those here.
        text = as_str(where, environ[var], allow_empty=True, limit=MAX_JSON_ENV, controls=True)
        value: Any
        if key == "command":
            value = as_command(where, _json_env(where, text))
        elif key == "env":
            value = as_env(where, _json_env(where, text))
        elif key == "ports":
            value = ports_from_env(where, text)
        else:
            value = CONVERT[key](where, text)
        out[key] = (where, value)
    return out


def parse_workload(
    tree: Mapping[str, Any] | None,
    environ: Mapping[str, str],
    path: str = "workload",
    metadata: tuple[str, Mapping[str, Any]] | None = None,
) -> WorkloadSpec | None:
    """Validate the ``workload:`` section and the runtime metadata layered over it.

    Three layers, each overriding the one before key by key (``env`` maps are merged): the
    config's ``workload:`` section, then ``metadata`` (``(name, mapping)``: the workload
    chosen at boot, read from the ``workload_metadata`` file), then the
    ``EMBASSY_WORKLOAD_*`` variables. None (no layer says anything) means the embassy runs
    no workload.
    """
    values: dict[str, Any] = {}
    where: dict[str, str] = {}
    layers = [(f"config: {path}", tree)]
    if metadata is not None:
        layers.append(metadata)
    for prefix, layer in layers:
        if layer is not None and not isinstance(layer, Mapping):
            raise fail(prefix, f"expected a mapping, got {type(layer).__name__}")
        for key, value in (layer or {}).items():
            if key not in _KEYS:
                raise fail(f"{prefix}.{show_key(key)}", "unknown key (see docs/config.md)")
            key_path = f"{prefix}.{key}"
            if value is not None:  # an explicit null is the same as an absent key
                converted = CONVERT[key](key_path, value)
                if key == "env":
                    converted = {**values.get("env", {}), **converted}
                values[key] = converted
                where[key] = key_path
    overrides = _from_environ(environ)
    if tree is None and metadata is None and not overrides:
        return None
    for key, (var, value) in overrides.items():
        values[key] = {**values.get("env", {}), **value} if key == "env" else value
        where[key] = var
    if "image" not in values:
        raise fail(
            f"config: {path}.image", f"required (or set {ENV_PREFIX}IMAGE) when a workload is given"
        )
    spec = WorkloadSpec(
        name=values.get("name", "workload"),
        image=values["image"],
        command=values.get("command"),
        env=tuple(sorted(values.get("env", {}).items())),
        ports=values.get("ports", ()),
        limits=Limits(values.get("memory"), values.get("cpus"), values.get("pids")),
        mounts=values.get("mounts", ()),
        network_mode=values.get("network_mode"),
        privileged=values.get("privileged", False),
        cap_add=values.get("cap_add", ()),
        user=values.get("user"),
        runtime=values.get("runtime"),
    )
    if spec.network_mode == "none" and spec.ports:
        raise fail(where["ports"], "ports cannot be published with network_mode none")
    return spec
