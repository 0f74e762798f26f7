"""Fixtures for an in-process embassy on a deterministic FakeTpm, and its verifier policy."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

# tests/unit has no __init__.py, so pytest puts tests/unit (not the repo root) on sys.path;
# the shared FakeTpm lives in tests/fakes.py.
_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from embassy.attest.ek import load_pem_bundle  # noqa: E402
from embassy.attest.types import TpmMode  # noqa: E402
from embassy.config import parse_config  # noqa: E402
from embassy.daemon.runtime import Embassy, TpmHandle  # noqa: E402
from embassy.measure import Measurement  # noqa: E402
from embassy.verify.policy import TrustPolicy  # noqa: E402
from tests.fakes import FakeTpm, ak_chain_for, fake_registrar  # noqa: E402

MASTER = bytes(range(32))
BOOT_PCRS = (4, 11, 12)  # the default pcrs.boot, which the master secret is sealed to
MEASUREMENT = Measurement(code=bytes(32), config=bytes([1]) * 32, policy=bytes([2]) * 32)
AT = datetime(2026, 6, 1, tzinfo=UTC)
# The registrar that certifies every test embassy's AK (as `embassy registrar enroll` would).
REGISTRAR = fake_registrar()


@pytest.fixture
def tpm() -> FakeTpm:
    return FakeTpm(b"seed")


class EmbassyFactory:
    """Starts embassies on FakeTpms under ``tmp``; :meth:`crash` stops one without a word."""

    def __init__(self, tmp: Path) -> None:
        self._tmp = tmp
        self._running: list[Embassy] = []

    def __call__(
        self,
        tpm: FakeTpm,
        name: str = "embassy",
        checkpoint_every: int = 3,
        extra: dict[str, object] | None = None,
        *,
        certify_ak: bool = True,
    ) -> Embassy:
        """Start (or, if ``name``'s data dir exists, restart) an embassy on ``tpm``."""
        data_dir = self._tmp / name
        if not data_dir.exists():
            data_dir.mkdir(mode=0o700)
            (data_dir / "master.sealed").write_bytes(tpm.seal(MASTER, BOOT_PCRS))
        config = parse_config(
            {
                "data_dir": str(data_dir),
                "socket": str(self._tmp / f"{name}.sock"),
                "statement_log": {"checkpoint_every": checkpoint_every},
                **(extra or {}),
            }
        )
        embassy = Embassy(config, TpmHandle(tpm), measurement=MEASUREMENT)
        self._running.append(embassy)
        if certify_ak:
            embassy.install_ak_chain(ak_chain_for(tpm, REGISTRAR), None)
        return embassy

    def crash(self, embassy: Embassy) -> None:
        """Close the files only, as a kill -9 would: no stop statement, the TPM boot goes on."""
        self._running.remove(embassy)
        embassy.log.close()
        embassy.registry.close()

    def close_all(self) -> None:
        while self._running:
            self.crash(self._running[-1])


@pytest.fixture
def make_embassy(tmp_path: Path) -> Iterator[EmbassyFactory]:
    factory = EmbassyFactory(tmp_path)
    yield factory
    factory.close_all()


@pytest.fixture
def embassy(make_embassy: EmbassyFactory, tpm: FakeTpm) -> Embassy:
    return make_embassy(tpm)


def policy_for(tpm: FakeTpm, **changes: object) -> TrustPolicy:
    ek_group = "software_ek_cas" if tpm.mode is TpmMode.SOFTWARE else "ek_cas"
    fields: dict[str, object] = {
        ek_group: tuple(load_pem_bundle(tpm.ca_pem())),
        "ak_cas": (REGISTRAR.certificate,),
        "expected_measurement": MEASUREMENT.digest,
        "allow_software_tpm": True,
        "at": AT,
    }
    fields.update(changes)
    return TrustPolicy(**fields)  # type: ignore[arg-type]


@pytest.fixture
def policy(tpm: FakeTpm) -> TrustPolicy:
    return policy_for(tpm)


def trust_flags(tpm: FakeTpm, directory: Path) -> list[str]:
    """The CLI flags that trust ``tpm``'s EK CA (by its kind) and the test registrar."""
    ek, registrar = directory / "ek-ca.pem", directory / "registrar-ca.pem"
    ek.write_bytes(tpm.ca_pem())
    registrar.write_bytes(REGISTRAR.certificate.public_bytes(serialization.Encoding.PEM))
    group = "--swtpm-ca" if tpm.mode is TpmMode.SOFTWARE else "--ek-ca"
    return [group, str(ek), "--ak-ca", str(registrar)]
