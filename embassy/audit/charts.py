"""Inline SVG charts for the audit report: a timeline per workload, meter movements.

Each function returns one ``<svg>`` element as text, sized by its ``viewBox`` so that CSS
scales it to any screen. Log positions (seq) are the horizontal axis everywhere: they are
what the verifier ordered, across restarts and TPM boots alike. Every piece of text is
escaped here; nothing of a statement's reaches the markup raw. Pure.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from embassy.audit.story import JobSpan, MeterPoint, ReadingPoint, Restart, SessionSpan

WIDTH = 800
LEFT = 150  # room for lane labels
RIGHT = 16
LANE = 26
TOP = 34
MAX_LANES = 80
PALETTE = ("#2563eb", "#d97706", "#059669", "#7c3aed", "#db2777", "#0891b2", "#65a30d", "#dc2626")
COLORS = {
    "unsealed": "#059669",
    "destroyed": "#2563eb",
    "aborted": "#dc2626",
}
OPEN_COLOR = "#d97706"


def _t(value: object) -> str:
    return escape(str(value), quote=True)


def _x(seq: float, lo: int, hi: int) -> float:
    span = max(hi - lo, 1)
    return LEFT + (seq - lo) / span * (WIDTH - LEFT - RIGHT)


def _svg(height: float, label: str, body: list[str], css_class: str) -> str:
    return (
        f'<svg class="chart {_t(css_class)}" viewBox="0 0 {WIDTH} {height:.0f}" '
        f'role="img" aria-label="{_t(label)}">'
        f"<title>{_t(label)}</title>{''.join(body)}</svg>"
    )


def _seq_axis(lo: int, hi: int, y: float) -> list[str]:
    out = [f'<line x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}" class="axis"/>']
    ticks = sorted({lo, hi, *(lo + round((hi - lo) * k / 4) for k in range(1, 4))})
    for seq in ticks:
        x = _x(seq, lo, hi)
        out.append(f'<line x1="{x:.1f}" y1="{y:.1f}" x2="{x:.1f}" y2="{y + 4:.1f}" class="axis"/>')
        out.append(
            f'<text x="{x:.1f}" y="{y + 16:.1f}" class="tick" text-anchor="middle">{seq}</text>'
        )
    out.append(
        f'<text x="{LEFT - 8}" y="{y + 16:.1f}" class="tick" text-anchor="end">log seq</text>'
    )
    return out


# A lane of the timeline: its label, first and last seq (None: still going at the log's
# end), outcome and tooltip.
Lane = tuple[str, int, int | None, str, str]


def _lane(y: float, lane: Lane, lo: int, hi: int) -> list[str]:
    label, start, end, outcome, tip = lane
    x1 = _x(start, lo, hi)
    x2 = _x(end if end is not None else hi, lo, hi)
    width = max(x2 - x1, 4.0)
    color = COLORS.get(outcome, OPEN_COLOR)
    dash = "" if end is not None else ' stroke-dasharray="4 3" fill-opacity="0.35"'
    out = [
        f'<text x="{LEFT - 8}" y="{y + 15:.1f}" class="lane" text-anchor="end">{_t(label)}</text>',
        f'<rect x="{x1:.1f}" y="{y + 4:.1f}" width="{width:.1f}" height="16" rx="3" '
        f'fill="{color}" stroke="{color}"{dash} class="bar {_t(outcome.split(maxsplit=1)[0])}">'
        f"<title>{_t(tip)}</title></rect>",
    ]
    if outcome == "aborted":
        cx = x1 + width
        out.append(
            f'<path d="M{cx - 5:.1f} {y + 7:.1f} l10 10 m0 -10 l-10 10" class="abort-mark"/>'
        )
    return out


def _session_tip(s: SessionSpan) -> str:
    end = "no end in the proved log" if s.ended is None else f"{s.outcome} at seq {s.ended.seq}"
    tpm = "" if s.tpm_ms is None else f", {s.tpm_ms} ms sealed (TPM clock)"
    why = "" if s.reason is None else f" ({s.reason})"
    return f"session {s.session}: sealed at seq {s.sealed.seq}, {end}{why}{tpm}"


def _job_tip(j: JobSpan) -> str:
    start = "start not in the log" if j.started is None else f"started at seq {j.started.seq}"
    end = "no end in the proved log" if j.ended is None else f"{j.outcome} at seq {j.ended.seq}"
    why = "" if j.reason is None else f" ({j.reason})"
    return f"job {j.job}: {start}, {end}{why}"


def timeline_svg(
    label: str,
    sessions: Sequence[SessionSpan],
    jobs: Sequence[JobSpan],
    *,
    restarts: Sequence[Restart],
    lo: int,
    hi: int,
) -> str:
    """Sessions (sealed to unsealed or aborted) and jobs (started to destroyed) as bars on
    the log's seq axis, with the embassy's restarts and workload launches as lines."""
    lanes: list[Lane] = []
    for s in sessions:
        end = s.ended.seq if s.ended is not None else None
        lanes.append((f"session {s.session[:8]}", s.sealed.seq, end, s.outcome, _session_tip(s)))
    for j in jobs:
        first = j.started or j.ended
        assert first is not None
        end = j.ended.seq if j.ended is not None else None
        lanes.append((f"job {j.job[:8]}", first.seq, end, j.outcome, _job_tip(j)))
    lanes.sort(key=lambda lane: lane[1])
    hidden = max(len(lanes) - MAX_LANES, 0)
    lanes = lanes[:MAX_LANES]
    height = TOP + LANE * max(len(lanes), 1) + 40 + (18 if hidden else 0)
    body: list[str] = []
    bottom = TOP + LANE * max(len(lanes), 1)
    for r in restarts:
        x = _x(r.seq, lo, hi)
        cls = "restart" if r.kind == "embassy start" else "launch"
        body.append(
            f'<line x1="{x:.1f}" y1="{TOP - 8}" x2="{x:.1f}" y2="{bottom:.1f}" class="{cls}">'
            f"<title>{_t(r.kind)} at seq {r.seq}</title></line>"
        )
        body.append(
            f'<text x="{x:.1f}" y="{TOP - 12}" class="tick" text-anchor="middle">'
            f"{'start' if cls == 'restart' else 'launch'}</text>"
        )
    for i, lane in enumerate(lanes):
        body += _lane(TOP + i * LANE, lane, lo, hi)
    if not lanes:
        body.append(
            f'<text x="{LEFT}" y="{TOP + 15}" class="lane">'
            "no sessions or jobs in the proved log</text>"
        )
    body += _seq_axis(lo, hi, bottom + 6)
    if hidden:
        body.append(
            f'<text x="{LEFT}" y="{bottom + 52:.1f}" class="tick">{hidden} more not drawn '
            "(all are in the table)</text>"
        )
    return _svg(height, f"timeline of {label}", body, "timeline-chart")


def _series_svg(
    series: dict[tuple[str, str], list[tuple[int, int]]],
    lo: int,
    hi: int,
    *,
    label: str,
    y_label: str,
    css_class: str,
    counts: bool,
) -> str:
    """Step lines, one per (authority, capability), with a legend under the plot."""
    plot_h = 180
    top = 16
    names = sorted(series)
    height = top + plot_h + 34 + 20 * len(names)
    ymax = max((v for pts in series.values() for _, v in pts), default=0)
    ymax = max(ymax, 1)
    body = [
        f'<line x1="{LEFT}" y1="{top}" x2="{LEFT}" y2="{top + plot_h}" class="axis"/>',
        f'<text x="{LEFT - 8}" y="{top + 10}" class="tick" text-anchor="end">{_t(ymax)}</text>',
        f'<text x="{LEFT - 8}" y="{top + plot_h}" class="tick" text-anchor="end">0</text>',
        f'<text x="{LEFT - 8}" y="{top + plot_h / 2:.1f}" class="tick" text-anchor="end">'
        f"{_t(y_label)}</text>",
    ]

    def y(v: int) -> float:
        return top + plot_h - v / ymax * plot_h

    for i, name in enumerate(names):
        color = PALETTE[i % len(PALETTE)]
        pts = sorted(series[name])
        # A count starts at zero with the proved log and holds to its end; a reading's value
        # is known only from one reading to the next, so its line starts and ends with them.
        first_seq, first_value = pts[0]
        start = (lo, 0) if counts else (first_seq, first_value)
        path = [f"M{_x(start[0], lo, hi):.1f} {y(start[1]):.1f}"]
        prev = start[1]
        for seq, value in pts:
            path.append(f"H{_x(seq, lo, hi):.1f} V{y(value):.1f}")
            prev = value
        if counts:
            path.append(f"H{_x(hi, lo, hi):.1f}")
        body.append(
            f'<path d="{" ".join(path)}" fill="none" stroke="{color}" stroke-width="2" '
            f'class="series"><title>{_t(name[0])} / {_t(name[1])}: {prev}</title></path>'
        )
        for seq, value in pts:
            body.append(
                f'<circle cx="{_x(seq, lo, hi):.1f}" cy="{y(value):.1f}" r="3" fill="{color}">'
                f"<title>seq {seq}: {_t(value)}</title></circle>"
            )
        ly = top + plot_h + 40 + 20 * i
        body.append(f'<rect x="{LEFT}" y="{ly - 10}" width="14" height="10" fill="{color}"/>')
        body.append(
            f'<text x="{LEFT + 20}" y="{ly}" class="lane">{_t(name[0])} / {_t(name[1])} '
            f"(last {prev})</text>"
        )
    body += _seq_axis(lo, hi, top + plot_h)
    return _svg(height, label, body, css_class)


def meter_counts_svg(points: Sequence[MeterPoint], lo: int, hi: int) -> str:
    """How many meter updates each (authority, capability) had, cumulatively, over seq."""
    series: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for p in sorted(points, key=lambda p: p.seq):
        pts = series.setdefault((p.authority, p.capability), [])
        pts.append((p.seq, (pts[-1][1] if pts else 0) + 1))
    return _series_svg(
        series,
        lo,
        hi,
        label="meter updates per capability over the log",
        y_label="updates",
        css_class="meter-counts",
        counts=True,
    )


def reading_values_svg(points: Sequence[ReadingPoint], lo: int, hi: int) -> str:
    """Meter values (micro-units) as the authority's readings reported them, at each
    reading statement's position."""
    series: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for p in points:
        series.setdefault((p.authority, p.capability), []).append((p.seq, p.value))
    return _series_svg(
        series,
        lo,
        hi,
        label="decrypted meter values over the log",
        y_label="value (µ)",
        css_class="meter-values",
        counts=False,
    )
