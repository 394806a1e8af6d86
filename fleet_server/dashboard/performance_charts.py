"""The performance page's charts, inline SVG like :mod:`.charts`: a metric over time with
its interval band, and a reliability diagram.

- :func:`band_series`: lines over time, each with an optional 95 % band (a shaded polygon
  from the lower to the upper bound, broken where a step has no value), and dashed
  reference lines (the packaged expectation, the alert limit) named in the legend;
- :func:`reliability`: mean predicted probability against the observed frequency per bin,
  on the unit square with the diagonal of perfect calibration; each point's area follows
  its rows.

The confusion matrix is an HTML table (the template's), not a chart. Every text is
escaped and every number formatted, as in :mod:`.charts`, whose plotting frame (axes, grid,
time labels, reference lines) and legend these reuse.
This module does not fetch data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

from markupsafe import Markup

from fleet_server.dashboard.charts import (
    GRID,
    LIVE,
    MUTED,
    PAD_L,
    Frame,
    fmt,
    legend,
    nice_ticks,
    no_data,
    open_svg,
)

__all__ = ["Band", "band_series", "reliability"]


@dataclass(frozen=True)
class Band:
    """One named line with its band: ``(epoch seconds, value, low, high)`` per step."""

    name: str
    points: Sequence[tuple[float, float | None, float | None, float | None]]
    colour: str = LIVE


def _n(x: float) -> str:
    return f"{x:.1f}"


def _finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def band_series(lines: Sequence[Band], *, title: str, since: float, until: float,
                references: Sequence[tuple[str, float, str]] = (), y_label: str = "",
                unit_range: bool = False, width: int = 640, height: int = 230) -> Markup:
    """Lines with their interval bands over ``[since, until]``; ``references``: (name,
    value, colour), dashed. ``unit_range`` pins the axis to [0, 1] (rates)."""
    values = [v for ln in lines for _, *vs in ln.points for v in vs if _finite(v)]
    out = [open_svg(width, height, title, "chart series band"),
           legend(PAD_L, 14, [(ln.name, ln.colour, False) for ln in lines]
                  + [(f"{name} {fmt(v)}", c, True) for name, v, c in references])[0]]
    if not values:
        return Markup("".join([*out, no_data(width, height)]))
    span = values + [v for _, v, _ in references]
    lo, hi = (0.0, 1.0) if unit_range else (min(0.0, *span), max(span) * 1.05 or 1.0)
    frame = Frame(width, height, since, max(until, since + 60), nice_ticks(lo, hi, 5))
    out += [frame.grid(), frame.time_axis(80, marks=False), frame.axes(y_label)]
    out += [_band(frame, ln) for ln in lines]  # bands first, under every line
    out += [frame.reference(v, colour, f"{name} {fmt(v)}") for name, v, colour in references]
    out += [_line(frame, ln) for ln in lines]
    out.append("</svg>")
    return Markup("".join(out))


def _band(frame: Frame, line: Band) -> str:
    """Each run of steps with an interval as a shaded polygon (a single step: a bar)."""
    out = []
    run: list[tuple[float, float, float]] = []
    for t, _, low, high in [*line.points, (frame.t1, None, None, None)]:
        if _finite(low) and _finite(high):
            run.append((frame.x(t), frame.y(low), frame.y(high)))  # type: ignore[arg-type]
            continue
        if len(run) == 1:  # one step: a bar, not a polygon of no width
            x, lo_, h = run[0]
            out.append(f'<rect class="band" x="{_n(x - 2)}" y="{_n(h)}" width="4" '
                       f'height="{_n(max(lo_ - h, 0.5))}" fill="{line.colour}" '
                       'fill-opacity="0.25"/>')
        elif run:
            upper = " ".join(f"{_n(x)},{_n(h)}" for x, _, h in run)
            lower = " ".join(f"{_n(x)},{_n(lo_)}" for x, lo_, _ in reversed(run))
            out.append(f'<polygon class="band" points="{upper} {lower}" '
                       f'fill="{line.colour}" fill-opacity="0.2" stroke="none"/>')
        run = []
    return "".join(out)


def _line(frame: Frame, line: Band) -> str:
    """Each point a dot whose tooltip gives its interval, each run of points a polyline."""
    out = []
    seg: list[tuple[float, float]] = []
    for t, v, low, high in [*line.points, (frame.t1, None, None, None)]:
        if _finite(v):
            x, y = frame.x(t), frame.y(v)  # type: ignore[arg-type]
            seg.append((x, y))
            interval = f" [{fmt(low)}, {fmt(high)}]" if _finite(low) and _finite(high) \
                else ""
            out.append(f'<circle cx="{_n(x)}" cy="{_n(y)}" r="2.5" fill="{line.colour}">'
                       f'<title>{escape(line.name)} {fmt(v)}{interval}</title></circle>')
            continue
        if len(seg) > 1:
            path = " ".join(f"{_n(x)},{_n(y)}" for x, y in seg)
            out.append(f'<polyline points="{path}" fill="none" stroke="{line.colour}" '
                       'stroke-width="1.8"/>')
        seg = []
    return "".join(out)


def reliability(bins: Sequence[tuple[float, float, int]], *, title: str,
                size: int = 260) -> Markup:
    """Observed frequency against mean predicted probability, per ``(confidence,
    observed, n)`` bin; the diagonal is perfect calibration."""
    pad = 36
    inner = size - 2 * pad
    out = [open_svg(size, size, title, "chart reliability")]

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
