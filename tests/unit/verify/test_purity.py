"""The verifier is a pure package: importing it loads no yaml, no daemon, TPM, seal or Docker
code, and not the daemon's config (a fresh interpreter, so nothing else imported them)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

FORBIDDEN_PREFIXES = (
    "yaml",
    "docker",
    "tpm2_pytss",
    "embassy.config",
    "embassy.daemon",
    "embassy.tpm",
    "embassy.seal",
    "embassy.net",
    "embassy.sessions",
    "embassy.workload.docker_runtime",
)


def _imported_by(module: str) -> list[str]:
    code = f"import json, sys; import {module}; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        check=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )
    loaded: list[str] = json.loads(done.stdout)
    return loaded


def _forbidden(loaded: list[str]) -> list[str]:
    return [m for m in loaded if any(m == p or m.startswith(p + ".") for p in FORBIDDEN_PREFIXES)]


def test_importing_the_verifier_loads_nothing_impure() -> None:
    loaded = _imported_by("embassy.verify")
    assert "embassy.verify.api" in loaded  # the package really imported its API
    assert _forbidden(loaded) == []


def test_every_verify_module_is_pure() -> None:
    modules = sorted(p.stem for p in (ROOT / "embassy" / "verify").glob("*.py"))
    loaded = _imported_by(", ".join(f"embassy.verify.{m}" for m in modules if m != "__init__"))
    assert _forbidden(loaded) == []


def test_the_probe_sees_an_impure_import() -> None:
    found = _forbidden(_imported_by("embassy.config"))
    assert "embassy.config" in found
    assert "yaml" in found
