"""The page: self-contained, every section drawn, and every string from the log inert."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pytest

from embassy.audit import audit_report, render_html
from embassy.audit.charts import MAX_LANES, timeline_svg
from embassy.audit.story import Point, SessionSpan
from tests.unit.audit.conftest import HOSTILE, RichLog, load_vector

ROOT = Path(__file__).resolve().parents[3]
SECTIONS = ("verified", "not-proved", "timeline", "releases", "meters", "rejections", "statements")


class _Elements(HTMLParser):
    """Every element and attribute the browser would build from the page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str, str | None]] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        for name, value in attrs:
            self.attrs.append((tag, name, value))
            if name == "id" and value is not None:
                self.ids.add(value)


def _parse(page: str) -> _Elements:
    parser = _Elements()
    parser.feed(page)
    parser.close()
    return parser


@pytest.fixture
def page(rich: RichLog) -> str:
    _, report = audit_report(
        rich.verifier, rich.identity, [rich.segment], authority_key=rich.authority_key
    )
    return render_html(report)


def test_every_section_is_drawn(page: str) -> None:
    found = _parse(page)
    assert set(SECTIONS) <= found.ids
    assert found.tags.count("svg") >= 3  # a timeline per workload, meter counts, values
    assert "statement-table" in found.ids
    assert page.count("<tr>") > 15


def test_a_hostile_string_renders_inert(page: str) -> None:
    found = _parse(page)
    assert "script" not in found.tags
    assert "img" not in found.tags
    assert not [a for a in found.attrs if a[1].startswith("on")], "no event handler attribute"
    # The one <style> is ours: the hostile "</style>" did not close it early.
    assert page.count("<style>") == 1
    assert page.count("</style>") == 1
    escaped = "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;"
    assert escaped in page
    assert HOSTILE not in page


def test_no_external_reference_at_all(page: str) -> None:
    assert "http" not in page.lower().replace("http-equiv", "")
    found = _parse(page)
    for tag, name, value in found.attrs:
        if name in ("src", "href", "xlink:href", "action", "srcset"):
            assert (value or "").startswith("#"), (tag, name, value)
    assert "url(" not in page
    assert "@import" not in page


def test_phone_ready_and_locked_down(page: str) -> None:
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in page
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page)
    assert csp is not None
    assert "default-src &#x27;none&#x27;" in csp.group(1)
    assert "@media (max-width:600px)" in page


def test_every_svg_is_well_formed(page: str) -> None:
    svgs = re.findall(r"<svg .*?</svg>", page, flags=re.DOTALL)
    assert len(svgs) >= 3
    for svg in svgs:
        root = ET.fromstring(svg.replace("&nbsp;", " "))
        assert root.tag == "svg"
        assert root.get("viewBox", "").startswith("0 0 800 ")


def test_a_vector_log_renders_with_no_session_or_meter() -> None:
    v = load_vector("good-log")
    _, report = audit_report(v.verifier, v.identity, v.segments)
    page = render_html(report)
    assert set(SECTIONS) <= _parse(page).ids
    assert "no sessions or jobs in the proved log" in page
    assert "no meter updates in the proved log" in page
    assert "The log may go on after seq 6" in page


def test_many_sessions_draw_a_bounded_chart() -> None:
    point = Point(seq=1, clock_ms=1, boot=1, restart=0, wall_time_unix=None)
    spans = [
        SessionSpan(f"{i:032x}", None, point, None, "open", None, None, None, False, False)
        for i in range(MAX_LANES + 5)
    ]
    svg = timeline_svg("w", spans, (), restarts=(), lo=0, hi=10)
    assert svg.count("<rect") == MAX_LANES
    assert "5 more not drawn" in svg


def test_importing_the_audit_loads_nothing_impure() -> None:
    code = (
        "import json, sys; import embassy.audit, embassy.audit.charts; "
        "print(json.dumps(sorted(sys.modules)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        check=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )
    loaded = set(json.loads(done.stdout))
    assert "embassy.audit.render" in loaded
    forbidden = (
        "yaml",
        "docker",
        "tpm2_pytss",
        "numpy",
        "embassy.config",
        "embassy.daemon",
        "embassy.tpm",
        "embassy.seal",
        "embassy.net",
        "embassy.sessions",
        "embassy.cli",
    )
    bad = [m for m in loaded if any(m == p or m.startswith(p + ".") for p in forbidden)]
    assert bad == []


def test_counts_start_at_zero_and_readings_only_where_read() -> None:
    from embassy.audit.charts import LEFT, RIGHT, WIDTH, meter_counts_svg, reading_values_svg
    from embassy.audit.story import MeterPoint, ReadingPoint

    counts = meter_counts_svg(
        [MeterPoint(5, "a", "c", None), MeterPoint(7, "a", "c", None)], lo=0, hi=10
    )
    path = re.search(r'<path d="([^"]+)"[^>]*class="series"', counts)
    assert path is not None
    d = path.group(1)
    assert d.startswith(f"M{LEFT:.1f} ")  # zero at the proved log's first seq
    assert d.endswith(f"H{WIDTH - RIGHT:.1f}")  # held to its last
    assert "(last 2)" in counts
    values = reading_values_svg([ReadingPoint(6, 5, "a", "c", 42, 1)], lo=0, hi=10)
    path = re.search(r'<path d="([^"]+)"[^>]*class="series"', values)
    assert path is not None
    x6 = LEFT + 6 / 10 * (WIDTH - LEFT - RIGHT)
    assert path.group(1).startswith(f"M{x6:.1f} ")  # nothing drawn before the reading
    assert "(last 42)" in values
