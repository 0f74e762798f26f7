"""`embassy audit` on a real daemon's log, looked at in a real browser (Debian's chromium).

A daemon with a real workload seals and unseals a session, is killed with a session open
past its deadline (the restart aborts it), and leaves one more open; its log is fetched and
audited. Headless chromium loads the report from a file (no network: loopback-free
``file://``, background networking off) and takes screenshots at phone and desktop sizes;
the PNGs are decoded here with zlib and checked for size, content and the colours the
report's elements are drawn in, and the DOM chromium built is checked for every section. A
tampered copy of the log is refused before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from embassy.cli import main
from embassy.client import call
from embassy.wire.codec import canonical_json
from tests.integration.conftest import (
    INSIDE_CLIENT,
    SLEEPING_WORKLOAD,
    Daemon,
    embassy_id,
    remove_embassy_containers,
    require,
)

pytestmark = pytest.mark.integration

docker = pytest.importorskip("docker")

WORKLOAD = SLEEPING_WORKLOAD
CLIENT = INSIDE_CLIENT

CHROMIUM = "/usr/bin/chromium"
SECTIONS = ("verified", "not-proved", "timeline", "releases", "meters", "rejections", "statements")
# Colours the report draws its elements in (render.CSS, charts.COLORS): the "inclusion
# only" banner, an unsealed session's bar, an aborted one's.
BANNER_PARTIAL = (255, 251, 235)
BAR_UNSEALED = (5, 150, 105)
BAR_ABORTED = (220, 38, 38)
SHORT_DEADLINE = 10


# -- the browser ------------------------------------------------------------------------------


def _chromium(*args: str) -> subprocess.CompletedProcess[bytes]:
    """One headless chromium run in a fresh profile, with everything that phones home off."""
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        return subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                *args,
            ],
            capture_output=True,
            timeout=120,
            check=True,
        )


def _screenshot(page: Path, out: Path, width: int, height: int) -> Path:
    _chromium(f"--screenshot={out}", f"--window-size={width},{height}", page.as_uri())
    assert out.exists(), f"chromium wrote no screenshot {out}"
    return out


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def decode_png(data: bytes) -> tuple[int, int, list[bytes], int]:
    """(width, height, rows of raw pixel bytes, bytes per pixel) of an 8-bit RGB/RGBA PNG,
    with the standard library only: the chunks, zlib, and the five scanline filters."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if (
            zlib.crc32(kind + body)
            != struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])[0]
        ):
            raise AssertionError(f"PNG chunk {kind!r}: bad CRC")
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert (depth, interlace) == (8, 0), (depth, interlace)
    bpp = {2: 3, 6: 4}[color]
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        if kind == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 0xFF
        elif kind == 2:
            line = bytearray((a + b) & 0xFF for a, b in zip(line, prev, strict=True))
        elif kind == 3:
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + ((left + prev[i]) >> 1)) & 0xFF
        elif kind == 4:
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                up_left = prev[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + _paeth(left, prev[i], up_left)) & 0xFF
        else:
            assert kind == 0, f"unknown PNG filter {kind}"
        rows.append(bytes(line))
        prev = line
    return width, height, rows, bpp


class Image:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.width, self.height, self.rows, self.bpp = decode_png(path.read_bytes())

    def pixels(self, top: int = 0, bottom: int | None = None) -> Iterator[tuple[int, int, int]]:
        for row in self.rows[top:bottom]:
            for i in range(0, len(row), self.bpp):
                yield row[i], row[i + 1], row[i + 2]

    def luminance_variance(self) -> float:
        values = [(r * 299 + g * 587 + b * 114) / 1000 for r, g, b in self.pixels()]
        mean = sum(values) / len(values)
        return sum((v - mean) ** 2 for v in values) / len(values)

    def has(self, color: tuple[int, int, int], top: int = 0, bottom: int | None = None) -> int:
        """How many pixels are exactly ``color`` (solid fills are drawn exactly)."""
        return sum(1 for p in self.pixels(top, bottom) if p == color)


# -- the daemon ---------------------------------------------------------------------------------


def _workload(client: Any, daemon: Daemon) -> Any:
    found = client.containers.list(
        all=True,
        filters={"label": [f"org.embassy.id={embassy_id(daemon)}", "org.embassy.role=workload"]},
    )
    assert len(found) == 1, found
    return found[0]


def _call(workload: Any, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    argv = ["python3", "-c", CLIENT, method, path]
    if body is not None:
        argv.append(json.dumps(body))
    code, out = workload.exec_run(argv)
    assert code == 0, out.decode()
    answer = json.loads(out.decode().strip().splitlines()[-1])
    assert answer["status"] in (200, 201), answer
    return answer["body"]


def _measure(daemon: Daemon) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "embassy", "measure", "--config", str(daemon.config)],
        capture_output=True,
        check=True,
        timeout=120,
    )
    return done.stdout.decode().strip()


def _run_a_story(client: Any, daemon: Daemon) -> dict[str, str]:
    """Sessions that unseal, abort across a crash, and stay open; returns their ids."""
    workload = _workload(client, daemon)
    done = _call(workload, "POST", "/v1/sessions", {"deadline_seconds": 60})
    _call(
        workload,
        "POST",
        "/v1/sessions/close",
        {
            "session": done["session"],
            "token": done["token"],
            "output_sha256": hashlib.sha256(b"the answer").hexdigest(),
        },
    )
    short = _call(workload, "POST", "/v1/sessions", {"deadline_seconds": SHORT_DEADLINE})
    opened_at = time.monotonic()
    daemon.stop(signal.SIGKILL)  # no stop statement: the restart finds the session open
    time.sleep(max(0.0, SHORT_DEADLINE + 1.5 - (time.monotonic() - opened_at)))
    daemon.start()  # reconcile: past its deadline while down, it is aborted
    still = _call(_workload(client, daemon), "POST", "/v1/sessions", {"deadline_seconds": 300})
    return {"unsealed": done["session"], "aborted": short["session"], "open": still["session"]}


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One daemon's story, fetched once for the tests of this module (a run takes a while:
    a session must pass its deadline while the daemon is down)."""
    require("swtpm", "swtpm_setup", "docker", "iptables-legacy-save", CHROMIUM)
    client = docker.from_env()
    try:
        client.ping()
    except docker.errors.DockerException as exc:
        pytest.fail(f"dockerd is not running: {exc}")
    # AF_UNIX paths are limited to 108 bytes: keep the daemon's root short.
    daemon = Daemon(Path(tmp_path_factory.mktemp("audit", numbered=True)), WORKLOAD)
    tmp = Path(tmp_path_factory.mktemp("audit-report"))
    try:
        daemon.start()
        sessions = _run_a_story(client, daemon)
        doc = tmp / "identity.json"
        assert main(["identity", "--socket", str(daemon.socket), "--out", str(doc)]) == 0
        log = tmp / "log.json"
        log.write_bytes(canonical_json(call(daemon.socket, "GET", "/v1/log?from=0")))
        nonce = os.urandom(32)
        evidence = tmp / "evidence.json"
        evidence.write_bytes(
            canonical_json(call(daemon.socket, "GET", f"/v1/evidence?nonce={nonce.hex()}"))
        )
        policy = [
            "--identity",
            str(doc),
            *daemon.trust_flags(),
            "--allow-software-tpm",
            "--expect-measurement",
            _measure(daemon),
        ]
        yield {
            "sessions": sessions,
            "log": log,
            "policy": policy,
            "complete": ["--complete", "--evidence", str(evidence), "--nonce", nonce.hex()],
            "tmp": tmp,
        }
    finally:
        if (daemon.data_dir / "embassy-id").exists():
            remove_embassy_containers(client, embassy_id(daemon))
        daemon.cleanup()
        client.close()


def _keep(*paths: Path) -> None:
    """Copy screenshots and reports where CI collects artifacts, if it says where."""
    target = os.environ.get("EMBASSY_ARTIFACTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        for p in paths:
            shutil.copy2(p, Path(target) / p.name)


# -- the tests ----------------------------------------------------------------------------------


def test_the_report_of_a_real_log_in_a_real_browser(
    audited: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    tmp: Path = audited["tmp"]
    report = tmp / "audit-report.html"
    capsys.readouterr()
    assert main(["audit", str(audited["log"]), *audited["policy"], "--out", str(report)]) == 0
    assert "inclusion only" in capsys.readouterr().err
    page = report.read_text()
    for session in audited["sessions"].values():
        assert session in page
    assert "deadline-passed-while-down" in page
    assert "open at the end of the proved log" in page
    assert "http" not in page.lower().replace("http-equiv", "")

    # What chromium built from the file: every section, the charts, no script.
    dom = _chromium("--dump-dom", report.as_uri()).stdout.decode()
    for section in SECTIONS:
        assert f'id="{section}"' in dom, section
    assert dom.count("timeline-chart") >= 1
    assert "<script" not in dom
    assert "The log may go on after seq" in dom

    phone = Image(_screenshot(report, tmp / "audit-phone.png", 390, 844))
    desktop = Image(_screenshot(report, tmp / "audit-desktop.png", 1280, 900))
    full = Image(_screenshot(report, tmp / "audit-desktop-full.png", 1280, 2600))
    _keep(report, phone.path, desktop.path, full.path)
    assert (phone.width, phone.height) == (390, 844)
    assert (desktop.width, desktop.height) == (1280, 900)
    for image in (phone, desktop):
        assert image.luminance_variance() > 200, f"{image.path} looks blank"
        # The "inclusion only" banner is drawn at the top, on both screens.
        assert image.has(BANNER_PARTIAL, 0, 300) > 1000, image.path
    # The timeline's bars: an unsealed session (green) and the aborted one (red).
    assert full.has(BAR_UNSEALED) > 50
    assert full.has(BAR_ABORTED) > 50


def test_a_complete_report_says_so(
    audited: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    report = audited["tmp"] / "complete.html"
    args = [str(audited["log"]), *audited["policy"], *audited["complete"], "--out", str(report)]
    assert main(["audit", *args]) == 0, capsys.readouterr().err
    page = report.read_text()
    assert "was the log&#x27;s head at fresh evidence" in page
    assert "The log may go on" not in page
    dom = _chromium("--dump-dom", report.as_uri()).stdout.decode()
    assert 'id="verdict"' in dom


def test_a_tampered_log_is_refused_before_anything_is_drawn(
    audited: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    tmp: Path = audited["tmp"]
    obj = json.loads(audited["log"].read_bytes())
    del obj["segment"]["entries"][2]
    tampered = tmp / "tampered.json"
    tampered.write_bytes(json.dumps(obj).encode())
    report = tmp / "never.html"
    capsys.readouterr()
    assert main(["audit", str(tampered), *audited["policy"], "--out", str(report)]) == 1
    err = capsys.readouterr().err
    assert "embassy: log-integrity:" in err
    assert "does not chain" in err or "missing" in err
    assert not report.exists()


def test_charts_and_hostile_strings_in_a_real_browser(tmp_path: Path) -> None:
    """A log with every kind of story (an in-process embassy on a fake TPM: meter batches,
    key releases with a hostile tenant, a job, a reading): chromium draws the charts, and
    builds no element from the hostile string."""
    require(CHROMIUM)
    from embassy.audit import audit_report, render_html
    from tests.fakes import FakeTpm
    from tests.unit.audit.conftest import HOSTILE, make_rich
    from tests.unit.conftest import EmbassyFactory, policy_for

    tpm = FakeTpm(b"seed")
    factory = EmbassyFactory(tmp_path / "embassy")
    (tmp_path / "embassy").mkdir()
    try:
        rich = make_rich(factory, tpm, policy_for(tpm))
        _, report = audit_report(
            rich.verifier, rich.identity, [rich.segment], authority_key=rich.authority_key
        )
    finally:
        factory.close_all()
    page = tmp_path / "audit-rich.html"
    page.write_text(render_html(report))
    dom = _chromium("--dump-dom", page.as_uri()).stdout.decode()
    for chart in ("timeline-chart", "meter-counts", "meter-values"):
        assert f"chart {chart}" in dom, chart
    assert "<script" not in dom
    assert "<img" not in dom
    assert "onerror" not in dom.replace("onerror=alert(1)&gt;", "")
    assert HOSTILE.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;") in dom
    phone = Image(_screenshot(page, tmp_path / "audit-rich-phone.png", 390, 844))
    shot = Image(_screenshot(page, tmp_path / "audit-rich-desktop-full.png", 1280, 4000))
    _keep(page, phone.path, shot.path)
    assert phone.luminance_variance() > 200
    # The meter charts' first two series, in their palette colours (lines and legend keys).
    assert shot.has((37, 99, 235)) > 100
    assert shot.has((217, 119, 6)) > 100
