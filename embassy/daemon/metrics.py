"""The daemon's Prometheus metrics: one :class:`Metrics`, built at start and passed down.

Its own ``CollectorRegistry`` (never prometheus_client's global one): two embassies in one
process (the unit tests) count apart, and nothing is registered at import.

What a metric may say is bounded like the log (docs/operations.md): counts, durations of
the embassy's own steps, and labels drawn from embassy-defined vocabularies (error codes,
abort reasons, quote purposes). Never a workload-chosen string, never a session id: a label
value that is not a short code of ours becomes ``other``, and a label takes at most
:data:`MAX_LABEL_VALUES` distinct values, so no caller can grow the output without bound.

Values that are state rather than events (sessions open, log bytes, the intake's queue) are
read when scraped, through callables the runtime hands in (:meth:`Metrics.watch`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import threading
from collections.abc import Callable, Iterable
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Metric
from prometheus_client.exposition import (
    CONTENT_TYPE_PLAIN_0_0_4,
    generate_latest,
    start_http_server,
)
from prometheus_client.registry import Collector

from embassy.config import ListenAddress
from embassy.errors import StorageError

_LOG = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
MAX_LABEL_VALUES = 64
OTHER = "other"
# An embassy code: lower-case words joined by '-' (rejection codes, abort reasons).
_CODE = re.compile(r"[a-z0-9][a-z0-9-]{0,47}")
# Seal and unseal: a netlink link flip, two table commits, a signed statement (fsync, PCR
# extend), a seal check; milliseconds normally, seconds under a stuck kernel or TPM.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    math.inf,
)

Watched = Literal["sessions_open", "log_bytes", "intake_queue_depth"]


class _BoundedLabel:
    """Map a label value to itself if it is an embassy code and there is room, else other."""

    def __init__(self, limit: int = MAX_LABEL_VALUES) -> None:
        self._limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        if not _CODE.fullmatch(value):
            return OTHER
        with self._lock:
            if value in self._seen:
                return value
            if len(self._seen) >= self._limit - 1:  # one value kept for "other"
                return OTHER
            self._seen.add(value)
            return value


class _WithoutCreated(Collector):
    """The metrics without their ``*_created`` series: a timestamp per counter and histogram
    that doubles the output and says only when the daemon started."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        for family in self._registry.collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family


class Metrics:
    """Every metric the daemon exports, on a registry of its own."""

    def __init__(self) -> None:
        r = CollectorRegistry(auto_describe=True)
        # What is served (the socket's /metrics and the local port): the same metrics.
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_WithoutCreated(r))
        self._sessions_opened = Counter(
            "embassy_sessions_opened", "Sessions opened (sealed, key released).", registry=r
        )
        self._sessions_closed = Counter(
            "embassy_sessions_closed", "Sessions closed with an unseal statement.", registry=r
        )
        self._sessions_aborted = Counter(
            "embassy_sessions_aborted",
            "Sessions aborted, by the embassy's reason (e.g. deadline-passed, refused).",
            ["reason"],
            registry=r,
        )
        self._seal_seconds = Histogram(
            "embassy_seal_seconds",
            "Opening a session: seal, seal statement, check and key release (seconds).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._unseal_seconds = Histogram(
            "embassy_unseal_seconds",
            "Closing a session: unseal statement and the gate's opening started (seconds).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._key_releases = Counter(
            "embassy_weights_key_releases",
            "Weights-key answers taken from the broker, by outcome (released, denied).",
            ["outcome"],
            registry=r,
        )
        self._rejections = Counter(
            "embassy_activation_rejections",
            "Activation files rejected, by the embassy's rejection code.",
            ["code"],
            registry=r,
        )
        self._statements = Counter(
            "embassy_log_statements", "Statements appended to the statement log.", registry=r
        )
        self._commits = Counter(
            "embassy_log_commits",
            "Log commits (one write, fsync and PCR extend each; a group commit holds several "
            "statements).",
            registry=r,
        )
        self._checkpoints = Counter(
            "embassy_log_checkpoints", "Checkpoints (quoted log heads) taken.", registry=r
        )
        self._quotes = Counter(
            "embassy_tpm_quotes",
            "TPM quotes made, by purpose (checkpoint; evidence: over a caller's nonce or the "
            "identity statement).",
            ["purpose"],
            registry=r,
        )
        self._watched: dict[Watched, Gauge] = {
            "sessions_open": Gauge(
                "embassy_sessions_open", "Sessions open now (the workload sealed).", registry=r
            ),
            "log_bytes": Gauge(
                "embassy_log_bytes",
                "Bytes of the statement log and its checkpoints on disk.",
                registry=r,
            ),
            "intake_queue_depth": Gauge(
                "embassy_intake_queue_depth",
                "Activation files seen and not yet handed to metering.",
                registry=r,
            ),
        }
        for gauge in self._watched.values():
            gauge.set_function(lambda: 0.0)
        self._reason = _BoundedLabel()
        self._code = _BoundedLabel()
        self._purpose = _BoundedLabel()
        self._outcome = _BoundedLabel(limit=4)

    # -- state read at scrape time -----------------------------------------------------

    def watch(self, name: Watched, read: Callable[[], float]) -> None:
        """Read ``name`` through ``read`` at each scrape; a failing read shows NaN."""

        def guarded() -> float:
            try:
                return float(read())
            except Exception as exc:  # a scrape never fails the daemon or the scrape
                _LOG.debug("metrics: reading %s failed: %s", name, type(exc).__name__)
                return math.nan

        self._watched[name].set_function(guarded)

    # -- events ------------------------------------------------------------------------

    def session_opened(self, seconds: float) -> None:
        self._sessions_opened.inc()
        self._seal_seconds.observe(seconds)

    def session_closed(self, seconds: float) -> None:
        self._sessions_closed.inc()
        self._unseal_seconds.observe(seconds)

    def session_aborted(self, reason: str) -> None:
        # "refused:<code>" counts as "refused": the code is in the log, the class is enough.
        self._sessions_aborted.labels(self._reason(reason.partition(":")[0])).inc()

    def key_release(self, outcome: str) -> None:
        self._key_releases.labels(self._outcome(outcome)).inc()

    def rejection(self, code: str) -> None:
        self._rejections.labels(self._code(code)).inc()

    def statements(self, count: int) -> None:
        self._statements.inc(count)

    def log_commit(self) -> None:
        self._commits.inc()

    def checkpoint(self) -> None:
        self._checkpoints.inc()
        self.quote("checkpoint")

    def quote(self, purpose: str) -> None:
        self._quotes.labels(self._purpose(purpose)).inc()

    # -- exposition --------------------------------------------------------------------

    def render(self) -> bytes:
        """The registry in Prometheus' text format (:data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry)


# -- the optional local port (metrics.listen) ---------------------------------------------


class LocalPort:
    """prometheus_client's own HTTP exporter on ``address``, serving :class:`Metrics`."""

    def __init__(self, metrics: Metrics, address: ListenAddress) -> None:
        self.address = address
        try:
            self._server, self._thread = start_http_server(
                address.port, addr=address.host, registry=metrics.registry
            )
        except OSError as exc:
            raise StorageError(
                f"metrics.listen: cannot listen on {address}: {exc.strerror or exc}"
            ) from None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        with contextlib.suppress(RuntimeError):
            self._thread.join(timeout=5)
