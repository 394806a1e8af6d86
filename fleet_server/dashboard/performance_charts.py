"""The performance page's charts, inline SVG like :mod:`.charts`: a metric over time with
its interval band, and a reliability diagram.

- :func:`band_series`: lines over time, each with an optional 95 % band (a shaded polygon
  from the lower to the upper bound, broken where a step has no value), and dashed
  reference lines (the packaged expectation, the alert limit) named in the legend;
- :func:`reliability`: mean predicted probability against the observed frequency per bin,
  on the unit square with the diagonal of perfect calibration; each point's area follows
  its rows.

The confusion matrix is an HTML table (the template's), not a chart. Every text is
escaped and every number formatted, as in :mod:`.charts`, whose axis helpers these reuse.
This module does not fetch data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

from markupsafe import Markup

from fleet_server.dashboard.charts import GRID, INK, LIVE, MUTED, fmt, nice_ticks, time_ticks

__all__ = ["Band", "band_series", "reliability"]


@dataclass(frozen=True)
class Band:
    """One named line with its band: ``(epoch seconds, value, low, high)`` per step."""

    name: str
    points: Sequence[tuple[float, float | None, float | None, float | None]]
    colour: str = LIVE


def _n(x: float) -> str:
    return f"{x:.1f}"


def _svg(width: int, height: int, title: str, css: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" role="img" class="chart {css}" '
            f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
            f'font-family="sans-serif" font-size="11" fill="{INK}">'
            f'<title>{escape(title)}</title>')


def _legend(x: float, y: float, items: Sequence[tuple[str, str, bool]]) -> str:
    out = []
    for name, colour, dashed in items:
        if dashed:
            out.append(f'<line x1="{_n(x)}" x2="{_n(x + 16)}" y1="{_n(y - 4)}" y2="{_n(y - 4)}" '
                       f'stroke="{colour}" stroke-width="2" stroke-dasharray="4 3"/>')
        else:
            out.append(f'<rect x="{_n(x + 3)}" y="{_n(y - 9)}" width="10" height="10" '
                       f'fill="{colour}"/>')
        out.append(f'<text x="{_n(x + 20)}" y="{_n(y)}">{escape(name)}</text>')
        x += 28 + 6.2 * len(name)
    return "".join(out)


def _finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def band_series(lines: Sequence[Band], *, title: str, since: float, until: float,
                references: Sequence[tuple[str, float, str]] = (), y_label: str = "",
                unit_range: bool = False, width: int = 640, height: int = 230) -> Markup:
    """Lines with their interval bands over ``[since, until]``; ``references``: (name,
    value, colour), dashed. ``unit_range`` pins the axis to [0, 1] (rates)."""
    pad_l, pad_r, pad_t, pad_b = 46, 22, 26, 30
    inner_w, inner_h = width - pad_l - pad_r, height - pad_t - pad_b
    values = [v for ln in lines for _, *vs in ln.points for v in vs if _finite(v)]
    out = [_svg(width, height, title, "series band")]
    out.append(_legend(pad_l, 14, [(ln.name, ln.colour, False) for ln in lines]
                       + [(f"{name} {fmt(v)}", c, True) for name, v, c in references]))
    if not values:
        out.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" '
                   f'fill="{MUTED}">no data in this range</text></svg>')
        return Markup("".join(out))
    span = values + [v for _, v, _ in references]
    lo, hi = (0.0, 1.0) if unit_range else (min(0.0, *span), max(span) * 1.05 or 1.0)
    yt = nice_ticks(lo, hi, 5)
    y0, y1 = yt[0], yt[-1]
    t0, t1 = since, max(until, since + 60)

    def x_of(t: float) -> float:
        return pad_l + inner_w * (t - t0) / (t1 - t0)

    def y_of(v: float) -> float:
        return pad_t + inner_h * (1 - (v - y0) / (y1 - y0))

    for v in yt:
        out.append(f'<line x1="{pad_l}" x2="{width - pad_r}" y1="{_n(y_of(v))}" '
                   f'y2="{_n(y_of(v))}" stroke="{GRID}"/><text x="{pad_l - 5}" '
                   f'y="{_n(y_of(v) + 4)}" text-anchor="end">{fmt(v)}</text>')
    for t, label in time_ticks(t0, t1, max(2, inner_w // 80)):
        out.append(f'<text x="{_n(x_of(t))}" y="{pad_t + inner_h + 16}" '
                   f'text-anchor="middle">{escape(label)}</text>')
    out.append(f'<line x1="{pad_l}" x2="{pad_l}" y1="{pad_t}" y2="{pad_t + inner_h}" '
               f'stroke="{INK}"/><line x1="{pad_l}" x2="{width - pad_r}" '
               f'y1="{pad_t + inner_h}" y2="{pad_t + inner_h}" stroke="{INK}"/>')
    if y_label:
        mid = _n(pad_t + inner_h / 2)
        out.append(f'<text x="12" y="{mid}" text-anchor="middle" '
                   f'transform="rotate(-90 12 {mid})" fill="{MUTED}">{escape(y_label)}</text>')
    for ln in lines:  # bands first, under every line
        run: list[tuple[float, float, float]] = []
        for t, _, low, high in [*ln.points, (t1, None, None, None)]:
            if _finite(low) and _finite(high):
                run.append((x_of(t), y_of(low), y_of(high)))  # type: ignore[arg-type]
                continue
            if run:
                upper = " ".join(f"{_n(x)},{_n(h)}" for x, _, h in run)
                lower = " ".join(f"{_n(x)},{_n(lo_)}" for x, lo_, _ in reversed(run))
                if len(run) == 1:  # one step: a bar, not a polygon of no width
                    x, lo_, h = run[0]
                    out.append(f'<rect class="band" x="{_n(x - 2)}" y="{_n(h)}" width="4" '
                               f'height="{_n(max(lo_ - h, 0.5))}" fill="{ln.colour}" '
                               'fill-opacity="0.25"/>')
                else:
                    out.append(f'<polygon class="band" points="{upper} {lower}" '
                               f'fill="{ln.colour}" fill-opacity="0.2" stroke="none"/>')
                run = []
    for name, v, colour in references:
        out.append(f'<line x1="{pad_l}" x2="{width - pad_r}" y1="{_n(y_of(v))}" '
                   f'y2="{_n(y_of(v))}" stroke="{colour}" stroke-width="1.5" '
                   f'stroke-dasharray="4 3"><title>{escape(name)} {fmt(v)}</title></line>')
    for ln in lines:
        seg: list[tuple[float, float]] = []
        for t, v, low, high in [*ln.points, (t1, None, None, None)]:
            if _finite(v):
                x, y = x_of(t), y_of(v)  # type: ignore[arg-type]
                seg.append((x, y))
                interval = f" [{fmt(low)}, {fmt(high)}]" if _finite(low) and _finite(high) \
                    else ""
                out.append(f'<circle cx="{_n(x)}" cy="{_n(y)}" r="2.5" fill="{ln.colour}">'
                           f'<title>{escape(ln.name)} {fmt(v)}{interval}</title></circle>')
                continue
            if len(seg) > 1:
                path = " ".join(f"{_n(x)},{_n(y)}" for x, y in seg)
                out.append(f'<polyline points="{path}" fill="none" stroke="{ln.colour}" '
                           'stroke-width="1.8"/>')
            seg = []
    out.append("</svg>")
    return Markup("".join(out))


def reliability(bins: Sequence[tuple[float, float, int]], *, title: str,
                size: int = 260) -> Markup:
    """Observed frequency against mean predicted probability, per ``(confidence,
    observed, n)`` bin; the diagonal is perfect calibration."""
    pad = 36
    inner = size - 2 * pad
    out = [_svg(size, size, title, "reliability")]

    def at(p: float, q: float) -> tuple[float, float]:
        return pad + inner * p, pad + inner * (1 - q)

    for v in (0.0, 0.25, 0.5, 0.75, 1.0):
        x, _ = at(v, 0)
        _, y = at(0, v)
        out.append(f'<line x1="{pad}" x2="{pad + inner}" y1="{_n(y)}" y2="{_n(y)}" '
                   f'stroke="{GRID}"/><text x="{pad - 4}" y="{_n(y + 4)}" '
                   f'text-anchor="end">{fmt(v)}</text><text x="{_n(x)}" '
                   f'y="{pad + inner + 14}" text-anchor="middle">{fmt(v)}</text>')
    x0, y0 = at(0, 0)
    x1, y1 = at(1, 1)
    out.append(f'<line class="diagonal" x1="{_n(x0)}" y1="{_n(y0)}" x2="{_n(x1)}" '
               f'y2="{_n(y1)}" stroke="{MUTED}" stroke-dasharray="4 3"/>')
    out.append(f'<text x="{size / 2}" y="{size - 4}" text-anchor="middle" fill="{MUTED}">'
               'predicted probability</text>')
    total = sum(n for _, _, n in bins) or 1
    if not bins:
        out.append(f'<text x="{size / 2}" y="{size / 2}" text-anchor="middle" '
                   f'fill="{MUTED}">no labelled rows with scores</text>')
    pts = []
    for p, q, n in bins:
        x, y = at(p, q)
        pts.append(f"{_n(x)},{_n(y)}")
        r = 2.5 + 6 * math.sqrt(n / total)
        out.append(f'<circle class="bin" cx="{_n(x)}" cy="{_n(y)}" r="{_n(r)}" '
                   f'fill="{LIVE}" fill-opacity="0.75"><title>predicted {fmt(p)}, observed '
                   f'{fmt(q)} over {n} rows</title></circle>')
    if len(pts) > 1:
        out.append(f'<polyline points="{" ".join(pts)}" fill="none" stroke="{LIVE}"/>')
    out.append("</svg>")
    return Markup("".join(out))
