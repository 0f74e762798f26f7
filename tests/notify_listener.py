"""systemd's side of an sd_notify socket, for the unit and integration tests of notify.py."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


class NotifyListener:
    """A datagram socket in systemd's place: what arrives, and when. ``on_ready`` runs the
    moment a READY=1 arrives (what a unit ordered after the daemon would find then)."""

    def __init__(
        self, address: str | Path | bytes, on_ready: Callable[[], dict[str, Any]] | None = None
    ) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address if isinstance(address, bytes) else str(address))
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, str]] = []
        self.at_ready: dict[str, Any] = {}
        self._on_ready = on_ready
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                text = self.sock.recv(4096).decode("utf-8")
            except TimeoutError:
                continue
            self.messages.append((time.monotonic(), text))
            if self._on_ready is not None and "READY=1" in text.split("\n"):
                self.at_ready = self._on_ready()

    def texts(self) -> list[str]:
        return [text for _, text in self.messages]

    def lines(self) -> list[str]:
        return [line for text in self.texts() for line in text.split("\n")]

    def wait_for(self, text: str, timeout: float = 5.0) -> float:
        """When the first message holding ``text`` arrived; fails after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, message in list(self.messages):
                if text in message:
                    return at
            time.sleep(0.01)
        raise AssertionError(f"{text!r} never arrived: {self.texts()}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()
