"""The daemon's metrics: what they render, what moves them, and what they may never carry."""

from __future__ import annotations

import math
import socket
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from embassy.config import ListenAddress, parse_config
from embassy.daemon.api import Api
from embassy.daemon.http import Request
from embassy.daemon.metrics import CONTENT_TYPE, MAX_LABEL_VALUES, OTHER, LocalPort, Metrics
from embassy.daemon.runtime import Embassy
from embassy.errors import (
    ConfigError,
    ConflictError,
    ForbiddenError,
    MethodNotAllowedError,
    StorageError,
)
from embassy.sessions.manager import SessionManager, WorkloadIdentity
from tests.fakes import MemorySeal
from tests.unit.daemon.httpkit import exchange, running, short_dir

FAMILIES = {
    "embassy_sessions_opened": "counter",
    "embassy_sessions_closed": "counter",
    "embassy_sessions_aborted": "counter",
    "embassy_sessions_open": "gauge",
    "embassy_seal_seconds": "histogram",
    "embassy_unseal_seconds": "histogram",
    "embassy_weights_key_releases": "counter",
    "embassy_activation_rejections": "counter",
    "embassy_log_statements": "counter",
    "embassy_log_commits": "counter",
    "embassy_log_checkpoints": "counter",
    "embassy_tpm_quotes": "counter",
    "embassy_log_bytes": "gauge",
    "embassy_intake_queue_depth": "gauge",
}


def scrape(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample, keyed by name and sorted labels, as Prometheus' own parser reads it."""
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode("utf-8")):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return scrape(metrics).get((name, tuple(sorted(labels.items()))), 0.0)


def test_every_family_renders_with_its_type_and_parses() -> None:
    metrics = Metrics()
    families = {f.name: f.type for f in text_string_to_metric_families(metrics.render().decode())}
    assert families == FAMILIES
    assert CONTENT_TYPE.startswith("text/plain; version=0.0.4")


def test_a_registry_of_its_own_not_the_global_one() -> None:
    a, b = Metrics(), Metrics()
    a.statements(1)
    assert value(a, "embassy_log_statements_total") == 1
    assert value(b, "embassy_log_statements_total") == 0
    assert not [n for n in REGISTRY._names_to_collectors if n.startswith("embassy_")]


def test_events_move_their_metrics() -> None:
    m = Metrics()
    m.session_opened(0.004)
    m.session_opened(0.2)
    m.session_closed(0.003)
    m.session_aborted("refused:bad-payload")
    m.session_aborted("deadline-passed")
    m.key_release("released")
    m.key_release("denied")
    m.rejection("not-an-activation-file")
    m.statements(3)
    m.log_commit()
    m.checkpoint()
    m.quote("evidence")
    s = scrape(m)
    assert s[("embassy_sessions_opened_total", ())] == 2
    assert s[("embassy_seal_seconds_count", ())] == 2
    assert s[("embassy_seal_seconds_bucket", (("le", "0.005"),))] == 1
    assert s[("embassy_seal_seconds_bucket", (("le", "+Inf"),))] == 2
    assert s[("embassy_seal_seconds_sum", ())] == pytest.approx(0.204)
    assert s[("embassy_unseal_seconds_count", ())] == 1
    assert s[("embassy_sessions_closed_total", ())] == 1
    # The class of a refusal, not its code: the code is in the abort statement.
    assert s[("embassy_sessions_aborted_total", (("reason", "refused"),))] == 1
    assert s[("embassy_sessions_aborted_total", (("reason", "deadline-passed"),))] == 1
    assert s[("embassy_weights_key_releases_total", (("outcome", "released"),))] == 1
    assert s[("embassy_weights_key_releases_total", (("outcome", "denied"),))] == 1
    assert s[("embassy_activation_rejections_total", (("code", "not-an-activation-file"),))] == 1
    assert s[("embassy_log_statements_total", ())] == 3
    assert s[("embassy_log_commits_total", ())] == 1
    assert s[("embassy_log_checkpoints_total", ())] == 1
    assert s[("embassy_tpm_quotes_total", (("purpose", "checkpoint"),))] == 1
    assert s[("embassy_tpm_quotes_total", (("purpose", "evidence"),))] == 1


@pytest.mark.parametrize(
    "hostile",
    [
        "session:" + "ab" * 16,
        "Name With Spaces",
        '"},evil{a="b',
        "x\ny",
        "\u00e9t\u00e9",
        "a" * 49,
        "",
        "-leading-dash",
    ],
)
def test_a_label_that_is_not_an_embassy_code_is_other(hostile: str) -> None:
    m = Metrics()
    m.rejection(hostile)
    m.session_aborted(hostile)
    text = m.render().decode()
    assert hostile not in text or hostile == ""
    assert value(m, "embassy_activation_rejections_total", code=OTHER) == 1


def test_labels_take_a_bounded_number_of_values() -> None:
    m = Metrics()
    for i in range(3 * MAX_LABEL_VALUES):
        m.rejection(f"code-{i}")
    codes = {
        labels[0][1]
        for (name, labels) in scrape(m)
        if name == "embassy_activation_rejections_total"
    }
    assert len(codes) == MAX_LABEL_VALUES
    assert OTHER in codes
    # The first codes keep their own series; the overflow is counted, not lost.
    assert value(m, "embassy_activation_rejections_total", code="code-0") == 1
    assert value(m, "embassy_activation_rejections_total", code=OTHER) == 2 * MAX_LABEL_VALUES + 1
    for i in range(10):
        m.key_release(f"outcome-{i}")
    outcomes = {
        labels[0][1] for (name, labels) in scrape(m) if name == "embassy_weights_key_releases_total"
    }
    assert len(outcomes) <= 4


def test_watched_values_are_read_at_scrape_and_a_failing_read_is_nan() -> None:
    m = Metrics()
    depth = [3]
    m.watch("intake_queue_depth", lambda: depth[0])
    assert value(m, "embassy_intake_queue_depth") == 3
    depth[0] = 7
    assert value(m, "embassy_intake_queue_depth") == 7

    def broken() -> float:
        raise OSError("gone")

    m.watch("log_bytes", broken)
    assert math.isnan(value(m, "embassy_log_bytes"))


# -- the session manager counts --------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


def test_the_session_manager_counts_opens_closes_aborts_and_open_sessions(
    embassy: Embassy,
) -> None:
    m, clock = Metrics(), _Clock()
    sessions = SessionManager(
        log=embassy.log,
        seal=MemorySeal(),
        workload=WorkloadIdentity("sha256:" + "ab" * 32, "c0ffee", bytes(32)),
        token_key=bytes(range(32)),
        now=clock,
        metrics=m,
    )
    m.watch("sessions_open", lambda: sessions.open_count)
    first = sessions.open(60, release=lambda s: None)
    second = sessions.open(60, release=lambda s: None)
    assert value(m, "embassy_sessions_open") == 2
    sessions.close(first.session, first.token, None)

    def refuse(session: bytes) -> None:
        raise ConflictError("no")

    with pytest.raises(ConflictError):
        sessions.open(60, release=refuse)
    clock.t += 61
    assert sessions.abort_expired() == 1
    s = scrape(m)
    assert s[("embassy_sessions_opened_total", ())] == 2  # a refused release is not opened
    assert s[("embassy_seal_seconds_count", ())] == 2
    assert s[("embassy_sessions_closed_total", ())] == 1
    assert s[("embassy_unseal_seconds_count", ())] == 1
    assert s[("embassy_sessions_aborted_total", (("reason", "refused"),))] == 1
    assert s[("embassy_sessions_aborted_total", (("reason", "deadline-passed"),))] == 1
    assert s[("embassy_sessions_open", ())] == 0
    assert second.session.hex() not in m.render().decode()


# -- the embassy: the route, who may read it, what it watches --------------------------------


def test_the_embassy_serves_its_metrics_to_the_host(embassy: Embassy) -> None:
    content_type, body = embassy.metrics_text(None)
    assert content_type == CONTENT_TYPE
    families = {f.name for f in text_string_to_metric_families(body.decode())}
    assert families == set(FAMILIES)
    on_disk = sum(
        (embassy.config.data_dir / n).stat().st_size for n in ("log.jsonl", "checkpoints.jsonl")
    )
    assert value(embassy.metrics, "embassy_log_bytes") == on_disk > 0


def test_the_statement_log_counts_statements_commits_checkpoints_and_quotes(
    embassy: Embassy,
) -> None:
    m = embassy.metrics
    before = scrape(m)
    for n in range(4):  # checkpoint_every is 3 in the fixture
        embassy.log.append_statement("urn:embassy:predicate:lifecycle:v1", [], {"event": f"e{n}"})
    embassy.evidence(bytes(16))
    after = scrape(m)

    def moved(name: str, *labels: tuple[str, str]) -> float:
        return after[(name, labels)] - before.get((name, labels), 0.0)

    assert moved("embassy_log_statements_total") == 4
    assert moved("embassy_log_commits_total") == 4  # one writer: one commit each
    assert moved("embassy_log_checkpoints_total") >= 1
    assert moved("embassy_tpm_quotes_total", ("purpose", "checkpoint")) == moved(
        "embassy_log_checkpoints_total"
    )
    assert moved("embassy_tpm_quotes_total", ("purpose", "evidence")) == 1
    # Since the start: the identity statement and its quote, and the start event's commit.
    assert after[("embassy_log_statements_total", ())] == len(
        [e for e in embassy.log.entries if e.type.value == "statement"]
    )


def test_the_workload_and_jobs_may_not_read_metrics(
    embassy: Embassy, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Own:
        def is_own_process(self, peer: object) -> bool:
            return True

        def is_job_process(self, peer: object) -> bool:
            return True

    monkeypatch.setattr(embassy, "workload", Own())
    with pytest.raises(ForbiddenError, match="not the workload"):
        embassy.metrics_text(None)
    monkeypatch.setattr(embassy, "workload", None)
    monkeypatch.setattr(embassy, "jobs", Own())
    with pytest.raises(ForbiddenError, match="not a job"):
        embassy.metrics_text(None)


class _MetricsService:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def metrics_text(self, peer: object) -> tuple[str, bytes]:
        return CONTENT_TYPE, self.metrics.render()

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"/metrics called {name}")


def test_get_metrics_over_the_socket_is_prometheus_text() -> None:
    m = Metrics()
    m.statements(1)
    api = Api(_MetricsService(m))  # type: ignore[arg-type]
    assert "/metrics" in api.routes
    assert api(Request("GET", "/metrics", {}, b"")).raw == (CONTENT_TYPE, m.render())
    with short_dir() as tmp, running(tmp / "s.sock", api, routes=api.routes) as server:
        data = exchange(server.socket_path, b"GET /metrics HTTP/1.1\r\nHost: e\r\n\r\n")
        age = server.loop_age()
        assert age is not None  # the watchdog's sign of life
        assert age < 1.0
    assert server.loop_age() is None
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert f"content-type: {CONTENT_TYPE}".encode() in head.lower()
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert families["embassy_log_statements"].samples[0].value == 1
    with pytest.raises(MethodNotAllowedError):
        api(Request("POST", "/metrics", {}, b""))


# -- metrics.listen ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:9464", "127.0.0.1", 9464),
        ("[::1]:1", "::1", 1),
        ("127.0.0.2:65535", "127.0.0.2", 65535),
    ],
)
def test_metrics_listen_takes_a_loopback_address(text: str, host: str, port: int) -> None:
    config = parse_config({"metrics": {"listen": text}})
    assert config.metrics_listen is not None
    assert (config.metrics_listen.host, config.metrics_listen.port) == (host, port)
    assert config.effective()["metrics"] == {"listen": text}


def test_metrics_listen_is_off_and_unmeasured_by_default() -> None:
    config = parse_config(None)
    assert config.metrics_listen is None
    assert "metrics" not in config.effective()


@pytest.mark.parametrize(
    ("tree", "message"),
    [
        ({"listen": "0.0.0.0:9464"}, "not a loopback address"),
        ({"listen": "10.1.2.3:9464"}, "not a loopback address"),
        ({"listen": "localhost:9464"}, "IP:PORT"),
        ({"listen": "127.0.0.1"}, "IP:PORT"),
        ({"listen": "::1:9464"}, "IP:PORT"),
        ({"listen": "[127.0.0.1]:9464"}, "IP:PORT"),
        ({"listen": "127.0.0.1:0"}, "port must be 1 to 65535"),
        ({"listen": "127.0.0.1:65536"}, "port must be 1 to 65535"),
        ({"listen": "127.0.0.1:+80"}, "port must be 1 to 65535"),
        ({"listen": "127.0.0.1:\u0661\u0662"}, "port must be 1 to 65535"),
        ({"listen": 9464}, "metrics.listen"),
        ({"allow_non_loopback": True}, "only with metrics.listen"),
        ({"listen": "127.0.0.1:9464", "allow_non_loopback": "yes"}, "true or false"),
    ],
)
def test_metrics_listen_refuses(tree: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match="metrics") as info:
        parse_config({"metrics": tree})
    assert message in info.value.message


def test_a_non_loopback_address_needs_the_explicit_flag() -> None:
    config = parse_config({"metrics": {"listen": "0.0.0.0:9464", "allow_non_loopback": True}})
    assert config.metrics_listen is not None
    assert not config.metrics_listen.loopback


def test_docs_operations_lists_every_metric() -> None:
    doc = (Path(__file__).resolve().parents[3] / "docs" / "operations.md").read_text()
    for name, kind in FAMILIES.items():
        exposed = f"{name}_total" if kind == "counter" else name
        assert f"`{exposed}`" in doc, exposed


def test_a_metrics_port_in_use_is_a_precise_error() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        address = ListenAddress("127.0.0.1", taken.getsockname()[1])
        with pytest.raises(StorageError, match=r"metrics.listen: cannot listen on 127\.0\.0\.1:"):
            LocalPort(Metrics(), address)


def test_metering_counts_its_rejections_by_code(embassy: Embassy, tmp_path: Path) -> None:
    before = value(
        embassy.metrics, "embassy_activation_rejections_total", code="activation-foreign"
    )
    embassy.metering.discard(123)  # a file the intake could not take as an activation file
    garbage = tmp_path / "not-an-activation"
    garbage.write_bytes(b"\x00" * 64)
    embassy.metering.handle(garbage)
    s = scrape(embassy.metrics)
    counted = {
        dict(labels)["code"]: v
        for (name, labels), v in s.items()
        if name == "embassy_activation_rejections_total"
    }
    # Neither names an open session: both are foreign, counted under the embassy's code.
    assert counted == {"activation-foreign": before + 2}
    assert garbage.name not in embassy.metrics.render().decode()
