"""The nix/ folder, as far as Nix 2.8 without nixpkgs can check it here.

Every .nix file must parse; the NixOS module (nix/module.nix) and the hardening module
(nix/hardening.nix) are evaluated with tests/nix/eval-module.nix over a stub of nixpkgs' lib
(tests/nix/lib-stub.nix): the unit it defines, the options generated from the config schema,
the config file it renders (read back with the daemon's own parser), the values it refuses,
and the kernel modules the seal needs. nix/package.nix and nix/cryptography.nix are evaluated
over a stub of the nixpkgs pieces they call: the pinned cryptography, its consistency with
pyproject.toml and what it refuses. Building the package and the image needs a networked
Nix >= 2.18 with nixpkgs (nix/README.md).
"""

from __future__ import annotations

import base64
import importlib.util
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from embassy.config import SCHEMA, parse_config
from embassy.seal.rules import CHAIN_RULES, JUMP_RULES, SEAL_CHAINS, Family
from embassy.workload.spec import WORKLOAD_SCHEMA, Limits, Mount, PortMapping
from tests.integration.conftest import require

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
EVALUATOR = ROOT / "tests" / "nix" / "eval-module.nix"
GENERATOR = ROOT / "scripts" / "gen_nix_options.py"
MODULE = "nix/module.nix"
HARDENING = "nix/hardening.nix"
KEY = base64.b64encode(bytes(range(32))).decode()


@pytest.fixture(autouse=True)
def _nix() -> None:
    require("nix-instantiate")


def evaluate(config: dict[str, Any], modules: tuple[str, ...] = (MODULE,)) -> dict[str, Any]:
    proc = _run_evaluator(config, modules)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def evaluation_error(config: dict[str, Any], modules: tuple[str, ...] = (MODULE,)) -> str:
    proc = _run_evaluator(config, modules)
    assert proc.returncode != 0, f"evaluation succeeded: {proc.stdout[:500]}"
    return proc.stderr


def _run_evaluator(
    config: dict[str, Any], modules: tuple[str, ...]
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "nix-instantiate",
            "--eval",
            "--strict",
            "--json",
            str(EVALUATOR),
            "--argstr",
            "modulesJSON",
            json.dumps(list(modules)),
            "--argstr",
            "configJSON",
            json.dumps(config),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def embassy(**options: Any) -> dict[str, Any]:
    """A configuration that enables the embassy with these services.embassy options."""
    return {"services": {"embassy": {"enable": True, **options}}}


def with_tpm(**options: Any) -> dict[str, Any]:
    """The same with the TPM device every NixOS embassy must name."""
    settings = {"tpm": {"device": "/dev/tpmrm0"}, **options.pop("settings", {})}
    return embassy(settings=settings, **options)


# -- (1) every .nix file parses -------------------------------------------------------------------


def _nix_files() -> list[Path]:
    skip = {".git", ".venv", "node_modules"}
    return sorted(p for p in ROOT.rglob("*.nix") if not skip & set(p.relative_to(ROOT).parts))


def test_the_nix_files_are_all_here() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in _nix_files()}
    assert {
        "flake.nix",
        "nix/package.nix",
        "nix/cryptography.nix",
        "nix/module.nix",
        "nix/settings-options.nix",
        "nix/hardening.nix",
        "nix/image.nix",
        "nix/expected.nix",
        "tests/nix/lib-stub.nix",
        "tests/nix/eval-module.nix",
    } <= names


@pytest.mark.parametrize("path", _nix_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_nix_file_parses(path: Path) -> None:
    proc = subprocess.run(
        ["nix-instantiate", "--parse", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def test_the_lock_pins_the_branch_the_flake_names() -> None:
    lock = json.loads((ROOT / "flake.lock").read_text())
    node = lock["nodes"][lock["nodes"][lock["root"]]["inputs"]["nixpkgs"]]
    locked, original = node["locked"], node["original"]
    url = re.search(r'inputs\.nixpkgs\.url = "([^"]+)"', (ROOT / "flake.nix").read_text())
    assert url is not None
    assert url.group(1) == f"github:{original['owner']}/{original['repo']}/{original['ref']}"
    assert re.fullmatch(r"nixos-\d\d\.\d\d", original["ref"]), "a stable release branch"
    assert re.fullmatch(r"[0-9a-f]{40}", locked["rev"])
    assert re.fullmatch(r"sha256-[A-Za-z0-9+/]{43}=", locked["narHash"])
    assert isinstance(locked["lastModified"], int)
    assert (locked["owner"], locked["repo"], locked["type"]) == ("NixOS", "nixpkgs", "github")


# -- (2) the unit the module defines --------------------------------------------------------------


def test_enabled_module_runs_the_daemon_with_only_what_it_needs() -> None:
    result = evaluate(embassy(settings={"tpm": {"device": "/dev/tpmrm0"}}))
    config = result["config"]
    assert result["failedAssertions"] == []
    unit = config["systemd"]["services"]["embassy"]
    service = unit["serviceConfig"]
    config_file = config["system"]["build"]["embassyConfig"]
    assert re.fullmatch(
        rf'"/nix/store/[^"]+/bin/embassy" "serve" "--config" "{re.escape(config_file)}"',
        service["ExecStart"],
    )
    assert config["virtualisation"]["docker"]["enable"] is True
    assert config["security"]["tpm2"]["enable"] is True
    assert unit["wantedBy"] == ["multi-user.target"]
    for dependency in ("docker.service", "dev-tpmrm0.device"):
        assert dependency in unit["requires"]
        assert dependency in unit["after"]

    assert sorted(service["CapabilityBoundingSet"]) == [
        "CAP_NET_ADMIN",
        "CAP_NET_RAW",
        "CAP_SYS_ADMIN",
        "CAP_SYS_PTRACE",
    ]
    assert service["DevicePolicy"] == "closed"
    assert service["DeviceAllow"] == ["/dev/tpmrm0 rw"]
    assert service["RestrictNamespaces"] == "net"
    assert service["IPAddressDeny"] == "any"
    assert "IPAddressAllow" not in service
    assert sorted(service["RestrictAddressFamilies"]) == [
        "AF_INET",
        "AF_INET6",
        "AF_NETLINK",
        "AF_UNIX",
    ]
    assert service["SystemCallFilter"] == ["@system-service", "~@privileged"]
    assert (service["RuntimeDirectory"], service["StateDirectory"]) == ("embassy", "embassy")
    assert service["RuntimeDirectoryPreserve"] == "yes"
    expected = {
        "NoNewPrivileges": True,
        "ProtectSystem": "strict",
        "ProtectHome": True,
        "PrivateTmp": True,
        "ProtectKernelModules": True,
        "ProtectKernelTunables": True,
        "ProtectControlGroups": True,
        "UMask": "0077",
        "LimitCORE": 0,
        "User": "root",
    }
    assert {k: service[k] for k in expected} == expected
    for left_off in ("PrivateNetwork", "PrivateUsers", "PrivateDevices", "AmbientCapabilities"):
        assert left_off not in service


def test_the_unit_is_notify_with_a_watchdog_and_loopback_only_for_metrics() -> None:
    service = evaluate(with_tpm())["config"]["systemd"]["services"]["embassy"]["serviceConfig"]
    assert (service["Type"], service["NotifyAccess"]) == ("notify", "main")
    assert service["WatchdogSec"] == "30s"
    assert "IPAddressAllow" not in service
    config = with_tpm(watchdogSeconds=10, settings={"metrics": {"listen": "127.0.0.1:9464"}})
    result = evaluate(config)["config"]
    service = result["systemd"]["services"]["embassy"]["serviceConfig"]
    assert service["WatchdogSec"] == "10s"
    assert (service["IPAddressDeny"], service["IPAddressAllow"]) == ("any", "localhost")


def test_the_spool_is_mounted_from_the_hosts_namespace_before_the_daemon() -> None:
    config = evaluate(with_tpm())["config"]
    services = config["systemd"]["services"]
    spool, daemon = services["embassy-spool"], services["embassy"]
    config_file = config["system"]["build"]["embassyConfig"]
    assert re.fullmatch(
        rf'"/nix/store/[^"]+/bin/embassy" "spool" "--config" "{re.escape(config_file)}"',
        spool["serviceConfig"]["ExecStart"],
    )
    assert spool["before"] == ["embassy.service"]
    assert "embassy-spool.service" in daemon["requires"]
    assert "embassy-spool.service" in daemon["after"]
    # It mounts in the host's namespace: no file-system sandboxing that would give it its own.
    for private in ("ProtectSystem", "PrivateTmp", "ProtectHome", "PrivateMounts"):
        assert private not in spool["serviceConfig"]
    # The daemon configures the link it makes through /proc/sys/net, read-only otherwise.
    assert daemon["serviceConfig"]["ReadWritePaths"] == ["/proc/sys/net"]
    assert daemon["serviceConfig"]["ProtectKernelTunables"] is True


def test_without_a_tpm_device_the_module_refuses() -> None:
    # The daemon's software-TPM debug mode runs swtpm from Debian's paths: not on NixOS.
    failed = evaluate(embassy())["failedAssertions"]
    assert len(failed) == 1
    assert "settings.tpm.device must be set" in failed[0]


def test_disabled_module_defines_nothing() -> None:
    config = evaluate({"services": {"embassy": {"enable": False}}})["config"]
    assert set(config) == {"services"}
    assert evaluate({})["config"]["services"]["embassy"]["enable"] is False


def test_metadata_from_a_url_is_fetched_by_a_oneshot_before_the_daemon() -> None:
    result = evaluate(
        with_tpm(
            workloadMetadata={
                "source": "url",
                "url": "http://metadata.google.internal/a?b=%20$HOME",
                "headers": {"Metadata-Flavor": "Google"},
            }
        )
    )
    services = result["config"]["systemd"]["services"]
    assert "embassy-metadata.service" in services["embassy"]["requires"]
    fetch = services["embassy-metadata"]["serviceConfig"]
    curl, move = fetch["ExecStart"]
    assert curl.startswith('"/nix/store/')
    assert '/bin/curl" "--disable" "--fail"' in curl
    assert '"--header" "Metadata-Flavor: Google"' in curl
    assert '"--max-time" "10"' in curl
    assert '"--proto" "=http,https"' in curl
    # systemd would expand % and $: the module doubles them so curl gets the URL as written.
    assert curl.endswith('"--url" "http://metadata.google.internal/a?b=%%20$$HOME"')
    part = "/run/embassy-metadata/workload.json.part"
    assert move.endswith(f'"{part}" "/run/embassy-metadata/workload.json"')
    assert fetch["CapabilityBoundingSet"] == ""
    assert json.loads(result["configText"])["workload_metadata"] == (
        "/run/embassy-metadata/workload.json"
    )


def test_workload_images_are_loaded_before_the_daemon_never_pulled() -> None:
    result = evaluate(with_tpm(workloadImages=["/nix/store/0000-workload.tar"]))
    services = result["config"]["systemd"]["services"]
    assert "embassy-workload-images.service" in services["embassy"]["requires"]
    load = services["embassy-workload-images"]
    assert load["requires"] == ["docker.service"]
    (command,) = load["serviceConfig"]["ExecStart"]
    assert command.endswith('/bin/docker" "load" "--input" "/nix/store/0000-workload.tar"')
    assert load["serviceConfig"]["PrivateNetwork"] is True
    assert "pull" not in json.dumps(services)


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"workloadMetadata": {"source": "file"}}, "workloadMetadata.file"),
        (
            {"workloadMetadata": {"source": "url", "url": "ftp://x/y"}},
            "workloadMetadata.url",
        ),
        (
            {
                "workloadMetadata": {
                    "source": "url",
                    "url": "http://x/y",
                    "headers": {"X": "a\r\nEvil: 1"},
                }
            },
            "workloadMetadata.headers",
        ),
        ({"settings": {"tpm": {"device": "/dev/../tpm0"}}}, "settings.tpm.device"),
        ({"settings": {"data_dir": "/srv/embassy"}}, "settings.data_dir"),
        ({"settings": {"socket": "/var/embassy.sock"}}, "settings.socket"),
    ],
)
def test_assertions_refuse_a_bad_combination(options: dict[str, Any], needle: str) -> None:
    failed = evaluate(with_tpm(**options))["failedAssertions"]
    assert len(failed) == 1
    assert needle in failed[0]


# -- (3) settings mirror the config schema --------------------------------------------------------


def _option_paths(tree: dict[str, Any], prefix: str = "") -> dict[str, dict[str, Any]]:
    """Dotted path -> option, for the options (not namespaces) of a described tree."""
    out: dict[str, dict[str, Any]] = {}
    for name, node in tree.items():
        if node.get("_option"):
            out[prefix + name] = node
        else:
            out.update(_option_paths(node, f"{prefix}{name}."))
    return out


def _sub_options(type_: dict[str, Any]) -> dict[str, Any]:
    """The options of the submodule inside a (nullOr / listOf / either ...) type."""
    if "options" in type_:
        return dict(type_["options"])
    for key in ("elemType", "right", "left"):
        if key in type_:
            found = _sub_options(type_[key])
            if found:
                return found
    return {}


def test_settings_options_are_exactly_the_schema_keys() -> None:
    options = evaluate({})["options"]["services"]["embassy"]
    settings = _sub_options(options["settings"]["type"])
    paths = _option_paths(settings)
    assert set(paths) == {k.path for k in SCHEMA}
    workload = _sub_options(paths["workload"]["type"])
    assert set(workload) == {k.name for k in WORKLOAD_SCHEMA}
    authority = _sub_options(paths["authorities"]["type"])
    assert set(authority) == {"name", "ed25519", "capabilities"}
    for key in SCHEMA:
        assert paths[key.path]["hasDefault"], key.path
    assert set(options["workloadMetadata"]) == {
        "source",
        "file",
        "url",
        "headers",
        "timeoutSeconds",
    }


# -- (4) the rendered file is the daemon's config -------------------------------------------------


def test_the_rendered_config_round_trips_through_the_daemons_parser() -> None:
    settings = {
        "log_level": "debug",
        "tpm": {"device": "/dev/tpmrm0"},
        "pcrs": {"embassy": 13, "log": 15, "boot": [0, 4, 11, 12]},
        "statement_log": {"checkpoint_every": 8},
        "http": {"timeout_seconds": 60},
        "metering": {"max_files_per_session": 16},
        "authorities": [{"name": "aisi", "ed25519": KEY, "capabilities": ["bio", "cyber"]}],
        "workload": {
            "name": "svc",
            "image": "embassy/minilm:1",
            "command": ["python3", "-m", "app"],
            "env": {"MODEL": "minilm", "EMPTY": ""},
            "ports": ["8080:80/tcp", {"container_port": 81, "host_port": 0, "protocol": "udp"}],
            "memory": "512m",
            "cpus": "1.5",
            "pids": 64,
            "mounts": [{"source": "/srv/models", "target": "/models", "read_only": True}],
            "network_mode": "bridge",
            "cap_add": ["NET_BIND_SERVICE"],
            "user": "1000:1000",
        },
    }
    result = evaluate(
        embassy(
            settings=settings,
            workloadMetadata={"source": "file", "file": "/run/embassy-config/workload.json"},
        )
    )
    text = result["configText"]
    tree = json.loads(text)
    assert yaml.safe_load(text) == tree  # the JSON is the YAML the daemon loads
    config = parse_config(tree)
    assert config.log_level == "debug"
    assert config.tpm_device == "/dev/tpmrm0"
    assert (config.pcrs.embassy, config.pcrs.log, config.pcrs.boot) == (13, 15, (0, 4, 11, 12))
    assert config.checkpoint_every == 8
    assert config.timeout_seconds == 60
    assert config.max_body_bytes == 1 << 20  # unset: the daemon's default
    assert config.metering.max_files_per_session == 16
    assert config.workload_metadata == Path("/run/embassy-config/workload.json")
    (authority,) = config.authorities
    assert (authority.name, authority.ed25519, authority.capabilities) == (
        "aisi",
        bytes(range(32)),
        ("bio", "cyber"),
    )
    spec = config.workload
    assert spec is not None
    assert (spec.name, spec.image, spec.command) == (
        "svc",
        "embassy/minilm:1",
        ("python3", "-m", "app"),
    )
    assert spec.env == (("EMPTY", ""), ("MODEL", "minilm"))
    assert spec.ports == (
        PortMapping(container_port=80, protocol="tcp", host_ip="0.0.0.0", host_port=8080),
        PortMapping(container_port=81, protocol="udp", host_ip="0.0.0.0", host_port=0),
    )
    assert spec.limits == Limits(memory_bytes=512 << 20, nano_cpus=1_500_000_000, pids=64)
    assert spec.mounts == (Mount("/srv/models", "/models", True),)
    assert (spec.network_mode, spec.cap_add, spec.user) == (
        "bridge",
        ("NET_BIND_SERVICE",),
        "1000:1000",
    )


def test_an_untouched_config_is_the_daemons_default() -> None:
    text = evaluate(with_tpm())["configText"]
    assert json.loads(text)["tpm"] == {"device": "/dev/tpmrm0"}
    assert parse_config(json.loads(text)) == parse_config({"tpm": {"device": "/dev/tpmrm0"}})


# -- (5) bad values are refused at evaluation, naming the option ----------------------------------


@pytest.mark.parametrize(
    ("settings", "path"),
    [
        ({"pcrs": {"embassy": 16}}, "services.embassy.settings.pcrs.embassy"),
        ({"pcrs": {"boot": [4, 13]}}, "services.embassy.settings.pcrs.boot.[1]"),
        ({"pcrz": {"embassy": 13}}, "services.embassy.settings.pcrz"),
        ({"log_level": "loud"}, "services.embassy.settings.log_level"),
        ({"http": {"timeout_seconds": "30"}}, "services.embassy.settings.http.timeout_seconds"),
        (
            {"workload": {"image": "x", "privileged": "no"}},
            "services.embassy.settings.workload.privileged",
        ),
        ({"workload": {"image": "x", "imagez": "y"}}, "services.embassy.settings.workload.imagez"),
        (
            {"workload": {"image": "x", "ports": [{"container_port": 0, "host_port": 1}]}},
            "services.embassy.settings.workload.ports.[0].container_port",
        ),
        (
            {"authorities": [{"name": "a", "capabilities": []}]},
            "services.embassy.settings.authorities.[0].ed25519",
        ),
    ],
)
def test_bad_settings_are_refused_with_the_option_path(settings: dict[str, Any], path: str) -> None:
    error = evaluation_error(embassy(settings=settings))
    assert f"`{path}'" in error


def test_an_unknown_module_option_is_refused() -> None:
    error = evaluation_error(embassy(workloadMetadata={"sourse": "url"}))
    assert "`services.embassy.workloadMetadata.sourse' does not exist" in error


# -- (6) the locked-down kernel has what the seal needs -------------------------------------------

# The kernel modules behind what the seal uses. No constant in embassy/seal lists kernel
# modules, so the seal's rules are read here (embassy.seal.rules, the one definition of the
# layer-3 seal) and each target mapped by hand: a rule the seal starts using that is not
# mapped fails this test until it is, and nix/hardening.nix lists its module.
# ACCEPT, DROP and jumps to user chains are x_tables' standard target; the rules use no
# match (interfaces are part of every rule).
STANDARD_TARGETS = {"ACCEPT", "DROP", *SEAL_CHAINS}
# The layer-3 seal changes the filter table only (embassy/seal/iptables.py), both families.
TABLE_MODULES = {
    Family.V4: {"x_tables", "ip_tables", "iptable_filter"},
    Family.V6: {"x_tables", "ip6_tables", "ip6table_filter"},
}
# embassy/net/ports.py: legacy IPv4 nat with DNAT and MASQUERADE, tcp/udp and addrtype.
PORT_MODULES = {"iptable_nat", "xt_nat", "xt_MASQUERADE", "xt_tcpudp", "xt_addrtype"}


def seal_kernel_modules() -> set[str]:
    needed: set[str] = set(PORT_MODULES)
    for family in Family:
        needed |= TABLE_MODULES[family]
    for rule in (*JUMP_RULES, *CHAIN_RULES):
        assert rule.target in STANDARD_TARGETS, f"no kernel module known for -j {rule.target}"
    return needed


def _module_name(name: str) -> str:
    return name.replace("-", "_")  # modprobe treats them alike


def test_the_hardening_module_loads_every_module_the_seal_needs() -> None:
    config = evaluate({}, modules=(HARDENING,))["config"]
    assert config["security"]["lockKernelModules"] is True
    loaded = {_module_name(m) for m in config["boot"]["kernelModules"]}
    assert seal_kernel_modules() == {
        "x_tables",
        "ip_tables",
        "iptable_filter",
        "ip6_tables",
        "ip6table_filter",
        "iptable_nat",
        "xt_nat",
        "xt_MASQUERADE",
        "xt_tcpudp",
        "xt_addrtype",
    }
    assert seal_kernel_modules() <= loaded
    # Docker's bridge networking and storage, the TPM and the verity store are there too.
    assert {"overlay", "bridge", "br_netfilter", "veth", "nf_nat", "tpm_crb", "tpm_tis"} <= loaded
    assert {"dm_verity", "erofs"} <= loaded
    assert not {_module_name(m) for m in config["boot"]["blacklistedKernelModules"]} & loaded


def test_the_hardening_module_closes_logins_and_self_change() -> None:
    config = evaluate({}, modules=(HARDENING,))["config"]
    sysctl = config["boot"]["kernel"]["sysctl"]
    assert sysctl["kernel.kptr_restrict"] == 2
    assert sysctl["kernel.yama.ptrace_scope"] == 3
    assert sysctl["kernel.sysrq"] == 0
    assert sysctl["kernel.unprivileged_bpf_disabled"] == 1
    assert config["security"]["protectKernelImage"] is True
    assert config["environment"]["memoryAllocator"]["provider"] == "libc"
    assert config["nix"]["enable"] is False
    assert config["system"]["switch"]["enable"] is False
    assert config["users"]["mutableUsers"] is False
    assert config["users"]["users"]["root"]["hashedPassword"] == "!"
    assert config["services"]["openssh"]["enable"] is False
    services = config["systemd"]["services"]
    for getty in ("getty@", "serial-getty@", "autovt@"):
        assert services[getty]["enable"] is False


# -- (7) the generated options cannot drift -------------------------------------------------------


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_nix_options", GENERATOR)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_options_are_current() -> None:
    proc = subprocess.run(
        [sys.executable, str(GENERATOR), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr


def test_check_fails_on_a_stale_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    generator = _generator()
    target = tmp_path / "settings-options.nix"
    monkeypatch.setattr(generator, "TARGET", target)
    assert generator.main(["--check"]) == 1  # missing
    assert generator.main([]) == 0
    assert generator.main(["--check"]) == 0
    target.write_text(target.read_text().replace("default = 64;", "default = 65;"))
    assert generator.main(["--check"]) == 1
    assert "is stale" in capsys.readouterr().err


# -- (8) the package's cryptography: pinned, new enough, one in the closure ----------------------

# nix/package.nix and nix/cryptography.nix evaluated over a stub of the few nixpkgs pieces they
# use (nixpkgs itself cannot be fetched here). Builders return their arguments, so what the
# package would be built from can be read back; buildPythonPackage refuses a package marked
# `disabled` for the interpreter, as nixpkgs' does. `knobs` stands in for another nixpkgs:
# its Python and cffi versions, and a cryptography.nix that packaged another version.
PACKAGE_STUB = r"""
{ root, knobsJSON }:
let
  knobs = builtins.fromJSON knobsJSON;
  hasPrefix = p: s: builtins.substring 0 (builtins.stringLength p) s == p;
  lib = {
    inherit hasPrefix;
    versionAtLeast = a: b: builtins.compareVersions a b >= 0;
    assertMsg = ok: msg: ok || builtins.throw msg;
    removePrefix = p: s:
      if hasPrefix p s
      then builtins.substring (builtins.stringLength p) (builtins.stringLength s) s
      else s;
    getLib = drv: drv.lib or drv;
    fileset = { unions = l: l; toSource = _: "/nix/store/0000-source"; };
    licenses = { asl20 = "asl20"; bsd3 = "bsd3"; };
    platforms.linux = [ "x86_64-linux" ];
    sourceTypes.binaryNativeCode = "binaryNativeCode";
  };
  package = pname: version: {
    inherit pname version;
    outPath = "/nix/store/0000-${pname}-${version}";
  };
  python = { version = knobs.python; sitePackages = "lib/python/site-packages"; };
  stdenv.cc = {
    libc = package "glibc" "2.40";
    cc = package "gcc" "14" // { lib = package "gcc-lib" "14"; };
  };
  fetchurl = args: args // { outPath = "/nix/store/0000-fetched"; };
  everything = py // {
    inherit lib stdenv fetchurl;
    autoPatchelfHook = package "autoPatchelfHook" "0";
  };
  py = rec {
    inherit python;
    pythonOlder = v: builtins.compareVersions python.version v < 0;
    buildPythonPackage = attrs:
      if attrs.disabled or false
      then builtins.throw
        "${attrs.pname}-${attrs.version} not supported for interpreter python${python.version}"
      else attrs // { outPath = "/nix/store/0000-${attrs.pname}-${attrs.version}"; };
    buildPythonApplication = buildPythonPackage;
    callPackage = path: args:
      let
        f = import path;
        built = f (builtins.intersectAttrs (builtins.functionArgs f) everything // args);
      in
      if knobs.cryptography == null then built else built // { version = knobs.cryptography; };
    cffi = package "cffi" knobs.cffi;
    cryptography = package "cryptography" "47.0.2";
    tpm2-pytss = package "tpm2-pytss" "2.3.0" // {
      inherit cryptography;
      override = args: tpm2-pytss // args;
    };
    setuptools = package "setuptools" "80";
    pyyaml = package "pyyaml" "6.0.2";
    docker = package "docker" "7.1.0";
    watchdog = package "watchdog" "6.0.0";
    numpy = package "numpy" "2.3.0";
    h11 = package "h11" "0.16.0";
    prometheus-client = package "prometheus-client" "0.21.1";
    pytestCheckHook = package "pytestCheckHook" "0";
  };
  embassy = import (root + "/nix/package.nix") {
    inherit lib stdenv;
    python3Packages = py;
    fetchPypi = args: args // { outPath = "/nix/store/0000-pypi"; };
    iptables-legacy = package "iptables" "1.8.11";
  };
  dep = d: {
    inherit (d) pname version;
    cryptography = (d.cryptography or { version = null; }).version;
  };
  crypto = builtins.head (builtins.filter (d: d.pname == "cryptography") embassy.dependencies);
in
{
  inherit (embassy) pname version;
  dependencies = map dep embassy.dependencies;
  cryptography = {
    inherit (crypto) pname version format pythonImportsCheck;
    inherit (crypto.src) url hash;
    dependencies = map dep crypto.dependencies;
    platforms = crypto.meta.platforms;
  };
}
"""

CRYPTOGRAPHY_NIX = ROOT / "nix" / "cryptography.nix"
STOCK = {"python": "3.13.5", "cffi": "2.0.0", "cryptography": None}


def _package_evaluation(**knobs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "nix-instantiate",
            "--eval",
            "--strict",
            "--json",
            "--expr",
            PACKAGE_STUB,
            "--arg",
            "root",
            str(ROOT),
            "--argstr",
            "knobsJSON",
            json.dumps({**STOCK, **knobs}),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def evaluate_package(**knobs: Any) -> dict[str, Any]:
    proc = _package_evaluation(**knobs)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def package_error(**knobs: Any) -> str:
    proc = _package_evaluation(**knobs)
    assert proc.returncode != 0, f"evaluation succeeded: {proc.stdout[:500]}"
    return proc.stderr


def _pyproject() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        project: dict[str, Any] = tomllib.load(f)["project"]
    return project


def _requirement(name: str) -> Requirement:
    (requirement,) = (
        Requirement(r) for r in _pyproject()["dependencies"] if Requirement(r).name == name
    )
    return requirement


def test_the_package_takes_the_pinned_cryptography_which_pyproject_accepts() -> None:
    result = evaluate_package()
    version = result["cryptography"]["version"]
    assert _requirement("cryptography").specifier.contains(version), version
    assert result["version"] == _pyproject()["version"]
    deps = {d["pname"]: d for d in result["dependencies"]}
    assert deps["cryptography"]["version"] == version  # not the stub nixpkgs' 47.0.2
    # tpm2-pytss propagates cryptography: it is given the same one, or the closure would
    # hold two.
    assert deps["tpm2-pytss"]["cryptography"] == version
    assert [d for d in result["dependencies"] if d["cryptography"] not in (None, version)] == []
    assert result["cryptography"]["dependencies"] == [
        {"pname": "cffi", "version": "2.0.0", "cryptography": None}
    ]
    assert "cryptography.hazmat.primitives.hpke" in result["cryptography"]["pythonImportsCheck"]


def test_the_pinned_wheel_is_named_and_hashed_consistently() -> None:
    crypto = evaluate_package()["cryptography"]
    assert crypto["format"] == "wheel"
    assert crypto["platforms"] == ["x86_64-linux"]
    url = crypto["url"]
    assert url.startswith("https://files.pythonhosted.org/packages/")
    name = url.rsplit("/", 1)[1]
    match = re.fullmatch(
        r"cryptography-(?P<version>[^-]+)-cp3(?P<minor>\d+)-abi3-manylinux_2_(?P<glibc>\d+)_x86_64\.whl",
        name,
    )
    assert match is not None, name
    assert match["version"] == crypto["version"]
    # The stable-ABI wheel serves every Python the project supports, from its floor up.
    floor = SpecifierSet(_pyproject()["requires-python"])
    assert not floor.contains(f"3.{int(match['minor']) - 1}")
    assert floor.contains(f"3.{match['minor']}")
    # The SRI hash is the sha256 written next to it (PyPI's digest of the file).
    sri = re.fullmatch(r"sha256-([A-Za-z0-9+/]{43}=)", crypto["hash"])
    assert sri is not None
    digest = base64.b64decode(sri[1])
    hex_digest = re.search(r"# sha256 ([0-9a-f]{64})\n", CRYPTOGRAPHY_NIX.read_text())
    assert hex_digest is not None
    assert digest == bytes.fromhex(hex_digest[1])


def test_a_cryptography_older_than_pyproject_requires_is_refused() -> None:
    minimum = str(_requirement("cryptography").specifier).removeprefix(">=")
    older = f"{int(minimum.split('.')[0]) - 1}.0.1"
    error = package_error(cryptography=older)
    assert f"embassy needs cryptography >= {minimum} (pyproject.toml" in error
    assert f"packages {older}" in error
    evaluate_package(cryptography=minimum)  # the minimum itself is accepted


@pytest.mark.parametrize(
    ("knobs", "needle"),
    [
        ({"cffi": "1.17.1"}, "needs cffi >= 2.0.0; this nixpkgs has 1.17.1"),
        ({"python": "3.10.16"}, "not supported for interpreter python3.10.16"),
    ],
)
def test_the_wheel_refuses_what_it_cannot_run_on(knobs: dict[str, str], needle: str) -> None:
    assert needle in package_error(**knobs)
