"""The AK certificate chain the daemon serves in its identity document.

A registrar (or a cloud vTPM's provisioning) certifies the AK after the daemon started, so
the chain is installed at run time, checked against the daemon's own AK and EK certificate
(a chain for another key or TPM is refused, never served), and kept beside the sealed keys
so that a restart serves it again. It is public data; trust in its issuer is the verifier's
decision, not the daemon's.
"""

from __future__ import annotations

import logging
from pathlib import Path

from embassy.attest.akcert import check_certifies, parse_ak_chain
from embassy.attest.marshal import parse_public
from embassy.daemon.atomic import write_atomic
from embassy.errors import EmbassyError, WireFormatError
from embassy.wire.codec import b64decode, b64encode, canonical_json, field, parse_json_object

_LOG = logging.getLogger(__name__)
AK_CHAIN_FILE = "ak-certificates.json"


def check_chain(chain: list[bytes], ak_public: bytes, ek_certificate: bytes) -> None:
    """Raise unless ``chain``'s leaf certifies this TPM's AK (and, if named, its EK)."""
    certs = parse_ak_chain(chain)
    check_certifies(certs[0], parse_public(ak_public), ek_certificate)


class AkChainStore:
    def __init__(self, data_dir: Path, ak_public: bytes, ek_certificate: bytes) -> None:
        self._path = data_dir / AK_CHAIN_FILE
        self._ak_public = ak_public
        self._ek_certificate = ek_certificate

    def load(self) -> list[bytes]:
        """The stored chain, or none when there is none or it no longer fits this TPM."""
        if not self._path.exists():
            return []
        try:
            obj = parse_json_object(self._path.read_bytes(), str(self._path))
            items = field(obj, "ak_certificates", list, str(self._path))
            chain = [b64decode(i, "ak_certificates[]") for i in items if isinstance(i, str)]
            if len(chain) != len(items):
                raise WireFormatError(f"{self._path}: ak_certificates must be base64 strings")
            check_chain(chain, self._ak_public, self._ek_certificate)
        except (OSError, EmbassyError) as exc:
            # Not fatal: the identity is served without a chain, and verifiers that need one
            # refuse it, which is the truth until a registrar certifies this AK again.
            _LOG.warning("ak chain: %s is not served: %s", self._path, exc)
            return []
        return chain

    def install(self, chain: list[bytes]) -> None:
        check_chain(chain, self._ak_public, self._ek_certificate)
        body = {"v": 1, "ak_certificates": [b64encode(c) for c in chain]}
        write_atomic(self._path, canonical_json(body), mode=0o644)
        _LOG.info("ak chain: installed %d certificate(s)", len(chain))
