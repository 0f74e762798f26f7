"""The code digest of an installed embassy equals the digest of its source tree.

``embassy measure`` on an auditor's checkout and the daemon in the image (installed from a
wheel by the Nix build) must report the same ``code`` digest; that holds only if the wheel
installs exactly the files of ``embassy/``. Built offline (``--no-index``,
``--no-build-isolation``): no test sends traffic off this machine.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from embassy.measure import code_digest, package_files

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    source = tmp_path_factory.mktemp("source")
    # Build from a copy without byte-code caches or egg-info, as a clean clone would be.
    for rel in ("pyproject.toml", "README.md"):
        (source / rel).write_bytes((ROOT / rel).read_bytes())
    for package in ("embassy", "workload_sdk"):
        for rel, content in package_files(ROOT / package):
            target = source / package / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-index",
            "--no-build-isolation",
            "--wheel-dir",
            str(out),
            str(source),
        ],
        check=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "HOME": str(out), "PIP_NO_INPUT": "1"},
    )
    (built,) = out.glob("embassy-*.whl")
    return built


def _wheel_package(wheel: Path, package: str) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(wheel) as zf:
        return [
            (name.removeprefix(package + "/"), zf.read(name))
            for name in zf.namelist()
            if name.startswith(package + "/") and not name.endswith("/")
        ]


def test_the_wheel_installs_exactly_the_measured_files(wheel: Path) -> None:
    installed = _wheel_package(wheel, "embassy")
    source = package_files(ROOT / "embassy")
    assert sorted(p for p, _ in installed) == sorted(p for p, _ in source)
    assert code_digest(installed) == code_digest(source)


def test_a_file_the_wheel_dropped_would_change_the_digest(wheel: Path) -> None:
    # The comparison above can fail: one missing file is a different measurement.
    installed = _wheel_package(wheel, "embassy")
    assert code_digest(installed[1:]) != code_digest(installed)
