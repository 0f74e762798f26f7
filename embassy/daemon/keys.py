"""The embassy's own keys: derived from one 32-byte master secret sealed to the TPM.

Only the TPM-sealed blob of the master secret is on disk; every private key is derived
from it in memory with HKDF-SHA256 under a distinct label, so no private key ever touches
disk in the clear and the keys survive restarts (same TPM, same boot, same blob, same keys).

The blob is sealed under PolicyPCR over the boot PCRs (``pcrs.boot``) at their values when
it was made (ADR 0010): another boot image, kernel command line or boot path cannot unseal
it (:class:`BootStateChangedError`, naming the PCRs). A blob that does not unseal (another
TPM, a cleared TPM, another boot), or one in the old format without a policy
(:class:`UnboundSealedKeyError`), is an error, never a silent re-key: new keys are an
operator's decision, made by moving the sealed file aside.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.hpke import MLKEM768X25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from embassy.daemon.atomic import write_atomic
from embassy.errors import BootStateChangedError, ConfigError, UnboundSealedKeyError
from embassy.tpm.interface import Tpm
from embassy.wire.codec import JsonObject, b64encode
from embassy.wire.dsse import keyid, raw_public_key

_LOG = logging.getLogger(__name__)
SEALED_KEY_FILE = "master.sealed"


def _derive(master: bytes, label: str, size: int) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=size, salt=None, info=f"embassy-key-v1 {label}".encode()
    ).derive(master)


@dataclass(frozen=True)
class EmbassyKeys:
    signing: Ed25519PrivateKey
    hpke_x25519: X25519PrivateKey
    hpke_mlkem768: MLKEM768PrivateKey
    hpke_hybrid_x25519: X25519PrivateKey
    # HMAC key of session tokens: a token is recomputed from the session id, never stored.
    session_tokens: bytes = field(repr=False)

    @property
    def hpke_hybrid(self) -> MLKEM768X25519PrivateKey:
        return MLKEM768X25519PrivateKey(self.hpke_mlkem768, self.hpke_hybrid_x25519)

    def public_json(self) -> JsonObject:
        """The public halves, as the identity statement publishes them."""
        raw = (Encoding.Raw, PublicFormat.Raw)
        return {
            "signing": {
                "alg": "ed25519",
                "public": b64encode(raw_public_key(self.signing.public_key())),
                "keyid": keyid(self.signing.public_key()),
            },
            "hpke": [
                {
                    "suite": "x25519",
                    "kem": "DHKEM(X25519, HKDF-SHA256)",
                    "x25519": b64encode(self.hpke_x25519.public_key().public_bytes(*raw)),
                },
                {
                    "suite": "mlkem768-x25519",
                    "kem": "MLKEM768-X25519",
                    "mlkem768": b64encode(self.hpke_mlkem768.public_key().public_bytes_raw()),
                    "x25519": b64encode(self.hpke_hybrid_x25519.public_key().public_bytes(*raw)),
                },
            ],
        }


def derive_keys(master: bytes) -> EmbassyKeys:
    """Pure: the embassy's keys from its master secret."""
    if len(master) != 32:
        raise ValueError("master secret must be 32 bytes")
    return EmbassyKeys(
        signing=Ed25519PrivateKey.from_private_bytes(_derive(master, "ed25519", 32)),
        hpke_x25519=X25519PrivateKey.from_private_bytes(_derive(master, "hpke-x25519", 32)),
        hpke_mlkem768=MLKEM768PrivateKey.from_seed_bytes(_derive(master, "hpke-mlkem768", 64)),
        hpke_hybrid_x25519=X25519PrivateKey.from_private_bytes(
            _derive(master, "hpke-hybrid-x25519", 32)
        ),
        session_tokens=_derive(master, "session-tokens", 32),
    )


def load_or_create_keys(tpm: Tpm, data_dir: Path, boot_pcrs: Sequence[int]) -> EmbassyKeys:
    """Unseal the master secret at ``data_dir``, or make and seal one to ``boot_pcrs``."""
    if not boot_pcrs:
        raise ConfigError(
            "pcrs.boot: is empty, so the master secret would be bound to no boot state "
            "(any OS booted on this machine could unseal it); list the boot PCRs"
        )
    path = data_dir / SEALED_KEY_FILE
    if path.exists():
        try:
            master = tpm.unseal(path.read_bytes())
        except (BootStateChangedError, UnboundSealedKeyError) as exc:
            raise type(exc)(
                f"{exc.message}. {path}: to start with new keys (a new identity; payloads "
                "sealed to the old one are lost), move this file aside"
            ) from None
        _LOG.info("keys: unsealed the master secret from %s", path)
    else:
        master = os.urandom(32)
        write_atomic(path, tpm.seal(master, boot_pcrs))
        _LOG.info(
            "keys: new master secret sealed to the TPM at %s, bound to boot PCRs %s",
            path,
            ", ".join(str(p) for p in sorted(boot_pcrs)),
        )
    return derive_keys(master)
