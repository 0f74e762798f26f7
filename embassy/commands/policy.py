"""The trust-policy flags: what an auditor or user trusts, the same flags wherever evidence is
checked (``verify``, ``payload seal``, ``meters``), and the
:class:`~embassy.verify.policy.TrustPolicy` they make."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from embassy.commands.identity import activate
from embassy.commands.inputs import hex_arg, read_input
from embassy.errors import ConfigError


def trust_policy(args: argparse.Namespace) -> Any:
    """The policy the flags of :func:`add_policy_args` describe."""
    from embassy.attest.ek import load_pem_bundle
    from embassy.verify.policy import TrustPolicy

    pcrs: dict[int, bytes] = {}
    for item in args.expect_pcr or []:
        index, _, value = item.partition("=")
        if not index.isdigit() or not value:
            raise ConfigError(f"--expect-pcr {item!r}: expected N=HEX")
        pcrs[int(index)] = hex_arg(value, f"--expect-pcr {index}", 32)
    measurement = (
        hex_arg(args.expect_measurement, "--expect-measurement", 32)
        if args.expect_measurement
        else None
    )
    if args.expected:
        measurement = _pin_expected(args.expected, pcrs, measurement)

    def bundles(paths: list[str] | None) -> tuple[Any, ...]:
        return tuple(c for path in paths or [] for c in load_pem_bundle(read_input(path)))

    activated: frozenset[bytes] = frozenset()
    if args.activate:
        from embassy.client import call
        from embassy.commands.progress import progress_for

        socket_path = Path(args.activate)
        with progress_for(args).step(f"--activate: waiting for {socket_path}'s TPM"):
            ak_name = activate(socket_path, call(socket_path, "GET", "/v1/identity"))
        activated = frozenset({ak_name})
    return TrustPolicy(
        ek_cas=bundles(args.ek_ca),
        software_ek_cas=bundles(args.swtpm_ca),
        ak_cas=bundles(args.ak_ca),
        vtpm_ak_cas=bundles(args.vtpm_ak_ca),
        insecure_skip_ak_certificate=args.insecure_skip_ak_certificate,
        activated_aks=activated,
        expected_measurement=measurement,
        expected_pcrs=pcrs,
        allow_software_tpm=args.allow_software_tpm,
        insecure_skip_ek_ca=args.insecure_skip_ek_ca,
        insecure_any_measurement=args.insecure_any_measurement,
        insecure_any_boot=args.insecure_any_boot,
        expected_image_digest=_image_digest(args.expect_image_digest),
        expected_launch_digest=(
            hex_arg(args.expect_launch_digest, "--expect-launch-digest", 32)
            if args.expect_launch_digest
            else None
        ),
    )


def _image_digest(text: str | None) -> str | None:
    """An image ID as Docker writes it: ``sha256:`` and 64 hex digits (the prefix may be
    left out)."""
    if text is None:
        return None
    hexpart = text.removeprefix("sha256:")
    hex_arg(hexpart, "--expect-image-digest", 32)
    return "sha256:" + hexpart.lower()


def _pin_expected(path: str, pcrs: dict[int, bytes], measurement: bytes | None) -> bytes | None:
    """Add an image's expected.json to the pins; a flag that contradicts it is an error."""
    from embassy.image.expected import parse_expected

    expected = parse_expected(read_input(path))
    for index, value in sorted(expected.pcrs.items()):
        if pcrs.setdefault(index, value) != value:
            raise ConfigError(f"--expect-pcr {index} contradicts PCR {index} of {path}")
    if expected.measurement is None:
        return measurement
    if measurement is not None and measurement != expected.measurement.digest:
        raise ConfigError(f"--expect-measurement contradicts the measurement in {path}")
    return expected.measurement.digest


def add_policy_args(p: Any) -> None:
    """What an auditor or user trusts: the same flags wherever evidence is checked."""
    p.add_argument(
        "--ek-ca",
        action="append",
        help="PEM bundle of hardware TPM makers' EK CAs (repeatable)",
    )
    p.add_argument(
        "--swtpm-ca",
        action="append",
        help="PEM bundle of software TPMs' EK CAs (swtpm's local CA); their TPMs are software "
        "TPMs, accepted only with --allow-software-tpm (repeatable)",
    )
    p.add_argument(
        "--ak-ca",
        action="append",
        help="PEM bundle of registrars' CAs whose AK certificates you trust (repeatable)",
    )
    p.add_argument(
        "--vtpm-ak-ca",
        action="append",
        help="PEM bundle of cloud vTPM AK CAs that vouch for an AK directly (repeatable)",
    )
    p.add_argument(
        "--activate",
        metavar="SOCKET",
        help="prove the AK live by credential activation with the daemon at SOCKET, instead "
        "of an AK certificate",
    )
    p.add_argument("--expect-measurement", help="the embassy measurement you rebuilt (hex)")
    p.add_argument(
        "--expect-image-digest",
        metavar="sha256:HEX",
        help="pin the workload's image: its image ID (docker image inspect -f {{.Id}})",
    )
    p.add_argument(
        "--expect-launch-digest",
        metavar="HEX",
        help="pin the workload's launch configuration digest (its launch events)",
    )
    p.add_argument("--expect-pcr", action="append", help="pin a boot PCR: N=HEX")
    p.add_argument(
        "--expected",
        metavar="EXPECTED_JSON",
        help="pin the boot PCRs and the measurement an image build gave (expected.json)",
    )
    p.add_argument(
        "--allow-software-tpm",
        action="store_true",
        help="INSECURE: accept evidence from a software TPM (testing only)",
    )
    p.add_argument(
        "--insecure-skip-ek-ca",
        action="store_true",
        help="INSECURE: do not check the EK certificate's issuer",
    )
    p.add_argument(
        "--insecure-skip-ak-certificate",
        action="store_true",
        help="INSECURE: accept an AK that nothing ties to the EK certificate's TPM",
    )
    p.add_argument(
        "--insecure-any-measurement",
        action="store_true",
        help="INSECURE: accept any embassy measurement",
    )
    p.add_argument(
        "--insecure-any-boot",
        action="store_true",
        help="INSECURE: accept hardware-TPM evidence without pinned boot PCRs",
    )


def add_completeness_args(p: argparse.ArgumentParser) -> None:
    """``--complete`` with the fresh evidence that proves nothing follows the segments."""
    p.add_argument(
        "--complete",
        action="store_true",
        help="show that no entry follows the last segment (needs --evidence, --nonce)",
    )
    p.add_argument("--evidence", help="fresh evidence fetched after the log")
    p.add_argument("--nonce", help="the nonce of --evidence (hex)")
