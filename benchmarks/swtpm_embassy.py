"""An Embassy on its own swtpm, for the benchmarks that need real TPM costs."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from embassy.attest.types import TpmMode
from embassy.config import parse_config
from embassy.daemon.metrics import Metrics
from embassy.daemon.runtime import Embassy, TpmHandle
from embassy.tpm.device import TpmDevice
from embassy.tpm.swtpm import Swtpm


@contextlib.contextmanager
def swtpm_embassy(
    *, checkpoint_every: int = 1_000_000, metrics: Metrics | None = None
) -> Iterator[Embassy]:
    """An Embassy on its own swtpm in a temporary directory; everything stopped after.
    ``checkpoint_every`` high by default: no automatic checkpoint falls into a timing."""
    with tempfile.TemporaryDirectory(prefix="embassy-bench-") as tmp:
        root = Path(tmp)
        swtpm = Swtpm(root / "swtpm")
        try:
            tcti = swtpm.ensure_running()
            config = parse_config(
                {
                    "data_dir": str(root / "data"),
                    "socket": str(root / "embassy.sock"),
                    "statement_log": {"checkpoint_every": checkpoint_every},
                }
            )
            device = TpmDevice.open(*tcti, TpmMode.SOFTWARE)
            embassy = Embassy(config, TpmHandle(device, swtpm), metrics=metrics)
            try:
                yield embassy
            finally:
                embassy.close()
        finally:
            swtpm.stop()
