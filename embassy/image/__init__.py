"""What a measured UEFI boot of a systemd unified kernel image (UKI) extends into the TPM.

Pure: bytes in, digests out, no I/O. :mod:`~embassy.image.pe` parses PE/COFF and computes
the Authenticode hash the firmware measures; :mod:`~embassy.image.uki` predicts PCRs 4, 11
and 12 event by event, per systemd-stub version; :mod:`~embassy.image.expected` is the
versioned ``expected.json`` a verifier pins them with.
"""

from embassy.image.expected import ExpectedImage, expected_image, parse_expected
from embassy.image.pe import Section, authenticode_digest, pe_sections
from embassy.image.uki import (
    DEFAULT_PHASES,
    BootEvent,
    BootPrediction,
    predict_boot_pcrs,
    stub_version,
)

__all__ = [
    "DEFAULT_PHASES",
    "BootEvent",
    "BootPrediction",
    "ExpectedImage",
    "Section",
    "authenticode_digest",
    "expected_image",
    "parse_expected",
    "pe_sections",
    "predict_boot_pcrs",
    "stub_version",
]
