"""The identity statement: what the embassy is, bound to its TPM.

Its predicate (``urn:embassy:predicate:identity:v1``) publishes the embassy's public keys,
the TPM's attestation key, endorsement key and EK certificate, the PCR layout, and the log
position of the start event that carries the measurement. The identity document that
``GET /v1/identity`` serves is a log segment ending at this statement, closed by a quote
whose qualifying data is SHA-256 of the statement payload.
"""

from __future__ import annotations

import hashlib
from typing import Any

from embassy import __version__
from embassy.config import PcrLayout
from embassy.daemon.keys import EmbassyKeys
from embassy.log.entry import LogEntry
from embassy.measure import Measurement
from embassy.tpm.interface import Tpm
from embassy.wire.codec import b64encode
from embassy.wire.dsse import raw_public_key
from embassy.wire.statement import Subject, embassy_subject


def identity_body(
    keys: EmbassyKeys, tpm: Tpm, pcrs: PcrLayout, measurement: Measurement, start: LogEntry
) -> tuple[list[Subject], dict[str, Any]]:
    ak_public = tpm.ak_public()
    subjects = [
        embassy_subject(raw_public_key(keys.signing.public_key())),
        Subject("tpm-attestation-key", hashlib.sha256(ak_public).digest()),
    ]
    body = {
        "software": {"name": "embassy", "version": __version__},
        "keys": keys.public_json(),
        "tpm": {
            "ak_public": b64encode(ak_public),
            "ek_public": b64encode(tpm.ek_public()),
            "ek_certificate": b64encode(tpm.ek_certificate()),
            "pcrs": {"embassy": pcrs.embassy, "log": pcrs.log, "boot": list(pcrs.boot)},
        },
        "measurement": {"digest": measurement.digest.hex(), "start_entry": start.seq},
    }
    return subjects, body
