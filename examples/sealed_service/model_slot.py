"""The example workload's model: shipped encrypted, usable only once the broker releases its key.

The image carries ``model.emw`` (``embassy weights encrypt``), never the weights in the
clear. At start, and on ``POST /model/load``, the service asks the model owner's broker for
the key through its embassy (``workload_sdk.broker.release_weights_key``: the broker checks
the embassy's evidence against its Rego policy and wraps the key to the embassy, which hands
it only to this workload), decrypts the tensors in parallel straight into their arrays
(``workload_sdk.weights``), and wipes its copy of the key (best effort: Python may have made
others). Until then ``/embed`` answers 503 ``model-not-released``.

Environment: ``BROKER_URL`` (``http://gateway:8470``: the host ``gateway`` is this
container's default gateway, the embassy's bridge, where the demo's broker listens),
``MODEL_ID`` (``minilm-l6``), ``MODEL_KEY_ID`` (``k1``), ``TENANT`` (``acme``).
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

from workload_sdk.broker import BrokerError, KeyDenied, release_weights_key
from workload_sdk.client import EmbassyClient
from workload_sdk.errors import EmbassyError
from workload_sdk.weights import WeightsError, load_encrypted

_LOG = logging.getLogger("model")
ENCRYPTED_FILE = "model.emw"
RETRY_SECONDS = 2.0


def default_gateway() -> str:
    """This namespace's IPv4 default gateway, from ``/proc/net/route``."""
    with open("/proc/net/route", encoding="ascii") as routes:
        for line in routes.readlines()[1:]:
            fields = line.split()
            if len(fields) > 2 and fields[1] == "00000000":
                return socket.inet_ntoa(struct.pack("<I", int(fields[2], 16)))
    raise OSError("no IPv4 default route")


def broker_url(configured: str) -> str:
    if "://gateway" in configured:
        return configured.replace("://gateway", f"://{default_gateway()}", 1)
    return configured


class ModelSlot:
    """Holds the model once it is released; says why not until then."""

    def __init__(
        self,
        model_dir: str,
        client: EmbassyClient,
        *,
        broker: str,
        model_id: str,
        key_id: str,
        tenant: str,
    ) -> None:
        self._dir = Path(model_dir)
        self._client = client
        self._broker, self._model_id, self._key_id, self._tenant = broker, model_id, key_id, tenant
        self._lock = threading.Lock()
        self._model: Any = None
        self._status: dict[str, Any] = {"state": "absent"}
        if (self._dir / ENCRYPTED_FILE).is_file():
            self._status = {"state": "waiting", "model_id": model_id}
        elif (self._dir / "model.safetensors").is_file():
            from examples.minilm.model import MiniLM

            self._model = MiniLM.load(self._dir)
            self._status = {"state": "loaded", "model_id": model_id, "encrypted": False}

    @property
    def encrypted(self) -> bool:
        return (self._dir / ENCRYPTED_FILE).is_file()

    def get(self) -> Any:
        return self._model

    def status(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._status)

    def load(self) -> dict[str, Any]:
        """Ask for the key now and load; the broker's decision (or the failure) as JSON."""
        if not self.encrypted:
            return self.status()
        with self._lock:
            try:
                key = release_weights_key(
                    self._client,
                    broker_url(self._broker),
                    self._model_id,
                    self._key_id,
                    self._tenant,
                )
            except KeyDenied as exc:
                # A decision, not a fault: a model already loaded stays loaded.
                self._status = {
                    **self._status,
                    "last_release": {"decision": "deny", "reason": exc.reason},
                }
                if self._model is None:
                    self._status["state"] = "denied"
                return dict(self._status)
            except (BrokerError, EmbassyError, OSError) as exc:
                self._status = {**self._status, "last_release": {"error": str(exc)[:300]}}
                return dict(self._status)
            try:
                from examples.minilm.model import MiniLM

                started = time.monotonic()
                tensors = load_encrypted(
                    self._dir / ENCRYPTED_FILE,
                    key,
                    model_id=self._model_id,
                    key_id=self._key_id,
                    wipe_key=True,
                )
                self._model = MiniLM.load(self._dir, tensors=tensors)
            except WeightsError as exc:
                self._status = {**self._status, "state": "error", "error": str(exc)[:300]}
                return dict(self._status)
            finally:
                key[:] = bytes(len(key))  # best effort: the SDK's copy
            self._status = {
                "state": "loaded",
                "model_id": self._model_id,
                "encrypted": True,
                "load_seconds": round(time.monotonic() - started, 3),
                "last_release": {"decision": "allow"},
            }
            _LOG.info("model %s released and loaded", self._model_id)
            return dict(self._status)

    def load_in_background(self) -> None:
        """Retry until the broker answers (it may start after this service); stop at its
        first decision: a denial is retried only on request (``POST /model/load``)."""
        if not self.encrypted:
            return

        def run() -> None:
            while True:
                status = self.load()
                if status["state"] in ("loaded", "denied", "error"):
                    return
                time.sleep(RETRY_SECONDS)

        threading.Thread(target=run, name="model-release", daemon=True).start()


def from_environment(model_dir: str, client: EmbassyClient) -> ModelSlot:
    return ModelSlot(
        model_dir,
        client,
        broker=os.environ.get("BROKER_URL", "http://gateway:8470"),
        model_id=os.environ.get("MODEL_ID", "minilm-l6"),
        key_id=os.environ.get("MODEL_KEY_ID", "k1"),
        tenant=os.environ.get("TENANT", "acme"),
    )
