"""Render a :class:`~embassy.audit.model.Report` as one self-contained HTML page.

Inline CSS and inline SVG only: no script, no font, image or style from anywhere else, and
a Content-Security-Policy that forbids them all, so the file reads the same offline, in a
mail attachment or on a phone (a viewport meta and a layout that wraps). Every value from
the log goes through :func:`html.escape`; the page's structure is this module's alone.

The sections have stable ids (``#verified``, ``#not-proved``, ``#timeline``,
``#releases``, ``#meters``, ``#rejections``, ``#statements``) for people linking to them
and for the browser test that checks they are drawn. Pure.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from html import escape

from embassy.audit.charts import meter_counts_svg, reading_values_svg, timeline_svg
from embassy.audit.model import Report, StatementRow
from embassy.audit.story import JobSpan, Point, SessionSpan, WorkloadTimeline

CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; "
    "form-action 'none'"
)

CSS = """
:root{--fg:#111827;--muted:#4b5563;--line:#d1d5db;--ok:#047857;--bad:#b91c1c;--warn:#92400e;
--bg:#ffffff;--panel:#f9fafb}
*{box-sizing:border-box}
body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);
background:var(--bg)}
main{max-width:1180px;margin:0 auto;padding:12px}
h1{font-size:1.45rem;margin:.2rem 0 .6rem}
h2{font-size:1.15rem;margin:1.6rem 0 .5rem;border-bottom:2px solid var(--line);padding-bottom:.2rem}
h3{font-size:1rem;margin:1rem 0 .3rem}
section{margin-bottom:1rem}
.banner{border-radius:8px;padding:.6rem .8rem;margin:.4rem 0 .8rem;font-weight:600}
.banner.ok{background:#ecfdf5;border:1px solid #6ee7b7;color:var(--ok)}
.banner.partial{background:#fffbeb;border:1px solid #fcd34d;color:var(--warn)}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{flex:1 1 300px;min-width:0;background:var(--panel);border:1px solid var(--line);
border-radius:8px;padding:.6rem .8rem}
dl{display:grid;grid-template-columns:max-content minmax(0,1fr);gap:.25rem .8rem;margin:0}
dt{color:var(--muted)}
dd{margin:0;min-width:0}
.d,code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.86em;
overflow-wrap:anywhere;word-break:break-all}
.badges{display:flex;flex-wrap:wrap;gap:4px;margin:.3rem 0}
.badge{font-size:.78rem;border:1px solid var(--line);border-radius:999px;padding:0 .5rem;
background:#fff}
.badge.ok{border-color:#6ee7b7;color:var(--ok)}
.badge.bad{border-color:#fca5a5;color:var(--bad)}
#not-proved{background:#fffbeb;border:1px solid #fcd34d;border-radius:8px;padding:.2rem .9rem}
#not-proved h2{border-color:#fcd34d}
.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch;border:1px solid var(--line);
border-radius:8px}
table{border-collapse:collapse;width:100%;font-size:.88rem}
th,td{text-align:left;vertical-align:top;padding:.35rem .5rem;border-bottom:1px solid var(--line)}
th{background:var(--panel);position:sticky;top:0}
td ul{margin:0;padding-left:1rem}
.fields{min-width:260px}
#statement-table{min-width:980px}
#statement-table td:last-child{min-width:170px}
.empty{color:var(--muted);font-style:italic}
svg.chart{width:100%;height:auto;display:block;background:#fff;border:1px solid var(--line);
border-radius:8px;margin:.4rem 0}
svg .axis{stroke:#6b7280;stroke-width:1}
svg .tick{font-size:11px;fill:#4b5563}
svg .lane{font-size:12px;fill:#111827}
svg .restart{stroke:#6b7280;stroke-dasharray:5 4;stroke-width:1.5}
svg .launch{stroke:#7c3aed;stroke-dasharray:2 3;stroke-width:1.5}
svg .abort-mark{stroke:#fff;stroke-width:2.5}
.outcome-aborted{color:var(--bad);font-weight:600}
.outcome-unsealed,.outcome-destroyed{color:var(--ok);font-weight:600}
.outcome-open{color:var(--warn);font-weight:600}
@media (max-width:600px){body{font-size:14px}main{padding:8px}
dl{grid-template-columns:minmax(0,1fr)}dt{margin-top:.3rem}h1{font-size:1.2rem}}
"""


def e(value: object) -> str:
    """Escape anything for HTML text and attribute values."""
    return escape(str(value), quote=True)


def _code(value: object) -> str:
    return f'<span class="d">{e(value)}</span>'


def _dl(items: Iterable[tuple[str, str]]) -> str:
    """A definition list; the values are HTML already built from escaped parts."""
    return "<dl>" + "".join(f"<dt>{e(k)}</dt><dd>{v}</dd>" for k, v in items) + "</dl>"


def _badges(checks: Sequence[str], prefix: str = "") -> str:
    return (
        '<div class="badges">'
        + "".join(f'<span class="badge ok">✓ {e(prefix + c)}</span>' for c in checks)
        + "</div>"
    )


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], css_id: str = "") -> str:
    if not rows:
        return '<p class="empty">none in the proved log</p>'
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    ident = f' id="{e(css_id)}"' if css_id else ""
    return (
        f'<div class="scroll"><table{ident}><thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table></div>"
    )


def _point(p: Point | None) -> str:
    if p is None:
        return '<span class="empty">not in the proved log</span>'
    wall = "" if p.wall_time_unix is None else f"<br>wall {e(p.wall_time_unix)} (embassy's)"
    return f"seq {e(p.seq)}<br>TPM {e(p.clock_ms)} ms (boot {e(p.boot)}){wall}"


def _outcome(outcome: str) -> str:
    return f'<span class="outcome-{e(outcome.split(maxsplit=1)[0])}">{e(outcome)}</span>'


def _verified(report: Report) -> str:
    v = report.verified
    complete = (
        f"complete: seq {v.last_seq} was the log's head at fresh evidence"
        if v.complete
        else f"inclusion only: the log may go on after seq {v.last_seq}"
    )
    banner_cls = "ok" if v.complete else "partial"
    segments = "<br>".join(
        f"seq {s.first_seq}..{s.last_seq}, boot {s.boot}, "
        + ("starts at an anchor checkpoint" if s.anchored else "starts at its boot's first entry")
        + f", {s.statements} statements"
        for s in v.segments
    )
    ak = (
        '<span class="badge ok">AK certified</span>'
        if v.ak_certified
        else '<span class="badge bad">AK NOT certified</span>'
    )
    identity = _dl(
        [
            ("embassy key id", _code(v.embassy_keyid)),
            ("measurement", _code(v.measurement)),
            ("TPM kind", e(v.tpm_kind)),
            ("AK", ak),
            (
                "TPM facts",
                "<br>".join(e(f) for f in v.tpm_facts) or '<span class="empty">none</span>',
            ),
        ]
    )
    workload = (
        _dl((k, _code(val)) for k, val in v.workload)
        if v.workload
        else '<p class="empty">no workload launched by the identity\'s run</p>'
    )
    log = _dl(
        [
            ("entries", f"seq {e(v.first_seq)}..{e(v.last_seq)}"),
            ("head TPM clock", f"{e(v.head_clock_ms)} ms (boot {e(v.head_boot)})"),
            ("segments", segments),
            ("completeness", e(complete)),
        ]
    )
    proved = "".join(f"<li>{e(f)}</li>" for f in v.proved)
    return (
        '<header id="verified"><h1>Embassy audit report</h1>'
        f'<div class="banner {banner_cls}" id="verdict">Verified: log entries seq '
        f"{e(v.first_seq)}..{e(v.last_seq)} of embassy {e(v.embassy_keyid[:16])}…; "
        f'{e(complete)} (<a href="#not-proved">{len(report.not_proved)} things not proved</a>)'
        "</div>"
        '<div class="cards">'
        f'<div class="card"><h3>Identity</h3>{identity}{_badges(v.identity_checks)}</div>'
        f'<div class="card"><h3>Workload (launch events)</h3>{workload}</div>'
        f'<div class="card"><h3>Log</h3>{log}{_badges(v.log_checks)}</div>'
        f'</div><h3>Proved</h3><ul class="proved">{proved}</ul></header>'
    )


def _session_rows(sessions: Sequence[SessionSpan]) -> list[list[str]]:
    rows = []
    for s in sessions:
        notes = []
        if s.ended is not None and not s.end_names_seal:
            notes.append("its end does NOT name this seal")
        if s.restarted_inside:
            notes.append(
                "the embassy restarted while it was open: the seal is not proven across that"
            )
        if s.reason:
            notes.append(f"reason: {s.reason}")
        rows.append(
            [
                _code(s.session),
                _code(s.payload_id or "-"),
                _point(s.sealed),
                _point(s.ended),
                _outcome(s.outcome),
                "-" if s.tpm_ms is None else f"{e(s.tpm_ms)} ms",
                _code(s.output_sha256 or "-"),
                "<br>".join(e(n) for n in notes) or "-",
            ]
        )
    return rows


def _job_rows(jobs: Sequence[JobSpan]) -> list[list[str]]:
    return [
        [
            _code(j.job),
            _code(j.payload_id or "-"),
            _code(j.container_id or "-"),
            e(f"{j.runtime or '-'} / network {j.network or '-'}"),
            _point(j.started),
            _point(j.ended),
            _outcome(j.outcome) + ("" if j.reason is None else f"<br>{e(j.reason)}"),
            "<br>".join(f"{e(k)}: {e(v)}" for k, v in j.checked_gone) or "-",
        ]
        for j in jobs
    ]


def _workload(w: WorkloadTimeline, report: Report) -> str:
    lo, hi = report.verified.first_seq, report.verified.last_seq
    svg = timeline_svg(w.label, w.sessions, w.jobs, restarts=report.restarts, lo=lo, hi=hi)
    parts = [
        f'<div class="workload"><h3>{e(w.label)}</h3>',
        _dl([("image digest", _code(w.image_digest)), ("launch digest", _code(w.launch_digest))]),
        svg,
    ]
    if w.sessions:
        parts.append(
            _table(
                [
                    "session",
                    "payload",
                    "sealed",
                    "ended",
                    "outcome",
                    "sealed for",
                    "output",
                    "notes",
                ],
                _session_rows(w.sessions),
            )
        )
    if w.jobs:
        parts.append(
            _table(
                [
                    "job",
                    "payload",
                    "container",
                    "runtime",
                    "started",
                    "ended",
                    "outcome",
                    "checked gone",
                ],
                _job_rows(w.jobs),
            )
        )
    parts.append("</div>")
    return "".join(parts)


def _timeline(report: Report) -> str:
    restarts = ", ".join(f"{r.kind} at seq {r.seq}" for r in report.restarts) or "none"
    body = "".join(_workload(w, report) for w in report.workloads)
    if not body:
        lo, hi = report.verified.first_seq, report.verified.last_seq
        body = timeline_svg("the embassy", (), (), restarts=report.restarts, lo=lo, hi=hi)
    return (
        '<section id="timeline"><h2>Timeline per workload</h2>'
        "<p>Bars run from a seal to its unseal or abort (sessions) and from a job's start to "
        "its destruction, on the log's order (seq). Dashed lines: the embassy's starts; "
        f"dotted: workload launches. Starts and launches: {e(restarts)}.</p>{body}</section>"
    )


def _releases(report: Report) -> str:
    rows = [
        [
            _point(r.at),
            f'<span class="outcome-{"unsealed" if r.decision == "released" else "aborted"}">'
            f"{e(r.decision)}</span>",
            _code(r.model_id),
            _code(r.key_id),
            _code(r.tenant),
            _code(r.decision_id),
            _code(r.policy_sha256 or "-"),
            _code(r.broker_keyid),
            _code(r.request_sha256),
            e(r.reason or "-"),
        ]
        for r in report.releases
    ]
    headers = ["at", "decision", "model", "key id", "tenant", "decision id", "policy sha256",
               "broker key id", "request sha256", "reason"]  # fmt: skip
    return f'<section id="releases"><h2>Weights key releases</h2>{_table(headers, rows)}</section>'


def _meters(report: Report) -> str:
    lo, hi = report.verified.first_seq, report.verified.last_seq
    parts = ['<section id="meters"><h2>Meters</h2>']
    if report.meter_updates:
        parts.append(
            f"<p>{len(report.meter_updates)} stated meter update(s); the count per authority "
            "and capability over the log (values are not in the log):</p>"
        )
        parts.append(meter_counts_svg(report.meter_updates, lo, hi))
    else:
        parts.append('<p class="empty">no meter updates in the proved log</p>')
    if report.readings:
        parts.append("<h3>Decrypted readings (your authority's)</h3>")
        parts.append(reading_values_svg(report.readings, lo, hi))
        rows = [
            [e(p.seq), e(p.as_of_seq), e(p.authority), e(p.capability), e(p.value), e(p.count)]
            for p in report.readings
        ]
        parts.append(
            _table(
                ["reading seq", "as of seq", "authority", "capability", "value (µ)", "count"], rows
            )
        )
    parts.append("</section>")
    return "".join(parts)


def _rejections(report: Report) -> str:
    rows = [
        [
            _point(r.at),
            e(r.kind),
            _code(r.session or "-"),
            "<br>".join(f"{e(code)}: {e(n)}" for code, n in r.codes) or "-",
            e(r.detail),
        ]
        for r in report.rejections
    ]
    return (
        '<section id="rejections"><h2>Rejections and aborts</h2>'
        f"{_table(['at', 'what', 'session / job', 'codes', 'detail'], rows)}</section>"
    )


def _statement_row(row: StatementRow) -> list[str]:
    wall = "-" if row.wall_time_unix is None else e(row.wall_time_unix)
    subjects = "<br>".join(f"{e(n)}: {_code(d)}" for n, d in row.subjects)
    fields = (
        "<ul>" + "".join(f"<li>{e(k)}: <code>{e(v)}</code></li>" for k, v in row.fields) + "</ul>"
    )
    verified = "<ul>" + "".join(f"<li>{e(c)}</li>" for c in row.verified) + "</ul>"
    return [
        f'<span id="seq-{row.seq}">{e(row.seq)}</span>',
        f"{e(row.tpm_clock_ms)} ms<br>boot {e(row.boot)}, restart {e(row.restart)}",
        wall,
        f'<span title="{e(row.predicate_type)}">{e(row.kind)}</span>',
        subjects,
        f'<div class="fields">{fields if row.fields else "-"}</div>',
        verified,
    ]


def _statements(report: Report) -> str:
    rows = [_statement_row(r) for r in report.statements]
    headers = ["seq", "TPM clock", "wall (embassy)", "type", "subjects", "fields", "verified"]
    return (
        f'<section id="statements"><h2>Every statement ({len(rows)})</h2>'
        f"{_table(headers, rows, 'statement-table')}</section>"
    )


def _not_proved(report: Report) -> str:
    items = "".join(f"<li>{e(n)}</li>" for n in report.not_proved)
    return f'<section id="not-proved"><h2>Not proved</h2><ul>{items}</ul></section>'


def render_html(report: Report) -> str:
    """The whole page, as text (UTF-8 when written)."""
    v = report.verified
    title = f"Embassy audit: {v.embassy_keyid[:16]}… seq {v.first_seq}..{v.last_seq}"
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta http-equiv="Content-Security-Policy" content="{e(CSP)}">'
        '<meta name="referrer" content="no-referrer">'
        f"<title>{e(title)}</title><style>{CSS}</style></head><body><main>"
        + _verified(report)
        + _not_proved(report)
        + _timeline(report)
        + _releases(report)
        + _meters(report)
        + _rejections(report)
        + _statements(report)
        + '<footer><p class="empty">Made by embassy audit from evidence the embassy\'s '
        "verifier accepted; nothing here is taken on the embassy's word beyond what the "
        "'Not proved' section says.</p></footer>" + "</main></body></html>\n"
    )
