"""Charts as inline SVG, drawn on the server: the dashboard needs no JavaScript and no CDN.

Each chart is a pure function from numbers to SVG markup (:class:`markupsafe.Markup`, so
the templates embed it as it is):

- :func:`series`: lines over time on real axes (time ticks at round minutes, hours or
  days; value ticks at 1-2-5 steps), with dashed threshold lines named in the legend;
- :func:`histogram`: reference vs live proportions per bin, with readable bin labels
  (numbers shortened to three significant digits, the exact bin in each bar's tooltip);
- :func:`heatmap`: a verdict per row and time step (the drift index: features × windows);
- :func:`bars`: counts by category, optionally coloured per category;
- :func:`gauge`: one value against its threshold (a rollout gate).

Every text that reaches the SVG is escaped; numbers are formatted, never interpolated raw,
so a hostile device label or feature name cannot inject markup. Each chart carries
``role="img"`` and a ``<title>`` for screen readers. Ticks are computed by
:func:`nice_ticks` and :func:`time_ticks`, pure and tested on their own.

This module does not fetch data or know the API.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from html import escape

from markupsafe import Markup

__all__ = ["VERDICT_COLOURS", "Frame", "Line", "bars", "cut", "gauge", "heatmap", "histogram",
           "legend", "nice_ticks", "no_data", "open_svg", "series", "short_label",
           "time_ticks"]

BASE, LIVE, WARN, BAD, OK, GRID, INK, MUTED = ("#8da9c4", "#e07a5f", "#e9a23b", "#c1121f",
                                                "#2a9d8f", "#e5e5e5", "#333", "#777")
VERDICT_COLOURS = {"ok": OK, "warn": WARN, "drift": BAD, "insufficient": "#cfcfcf",
                   None: "#f3f3f3"}
FONT = 11
# the padding around a chart over time's plotting area (Frame): left, right, top, bottom
PAD_L, PAD_R, PAD_T, PAD_B = 46, 22, 26, 30
_TIME_STEPS = (60, 120, 300, 600, 900, 1800, 3600, 2 * 3600, 3 * 3600, 6 * 3600, 12 * 3600,
               86400, 2 * 86400, 7 * 86400, 14 * 86400, 30 * 86400)


@dataclass(frozen=True)
class Line:
    """One named line of a :func:`series` chart: ``(epoch seconds, value or None)``."""

    name: str
    points: Sequence[tuple[float, float | None]]
    colour: str = LIVE


def _num(x: float) -> str:
    return f"{x:.1f}"


def fmt(value: float) -> str:
    """A tick or value label: short, and exact enough to tell ticks apart."""
    if value == 0:
        return "0"
    a = abs(value)
    if a >= 10_000:
        return f"{value / 1000:.0f}k"
    if a >= 100:
        return f"{value:.0f}"
    if a >= 1:
        return f"{value:.3g}"
    if a >= 0.001:
        return f"{value:.3f}".rstrip("0").rstrip(".")
    return f"{value:.1e}"


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2, 2.5 or 5 × 10ⁿ steps) covering ``[lo, hi]``, at least two."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0, 1.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    # a span too small for floats to step through is widened (a flat series, a denormal)
    hi = max(hi, lo + 1e-6 * max(abs(lo), abs(hi)), lo + 1e-12)
    raw = (hi - lo) / max(1, count - 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * 0.999)
    first = math.floor(lo / step + 1e-9) * step
    first = min(first, lo)  # never above lo by a float's last bit
    ticks = []
    k = 0
    while True:
        t = first + k * step
        ticks.append(t if k else first)
        if t >= hi - 1e-9 * step:
            break
        k += 1
    return ticks


def time_ticks(t0: float, t1: float, count: int = 6) -> list[tuple[float, str]]:
    """Ticks at round times between ``t0`` and ``t1`` (UTC), labelled to the step."""
    span = max(t1 - t0, 1.0)
    step = next((s for s in _TIME_STEPS if span / s <= count), _TIME_STEPS[-1])
    first = math.ceil(t0 / step) * step
    days = span >= 2 * 86400 or step >= 86400
    out = []
    t = first
    while t <= t1 + 1e-6:
        d = datetime.fromtimestamp(t, tz=timezone.utc)
        out.append((float(t), d.strftime("%b %d") if step >= 86400 else
                    d.strftime("%d %H:%M") if days else d.strftime("%H:%M")))
        t += step
    return out


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def short_label(text: str, n: int = 18) -> str:
    """A bin label for an axis: every number to three significant digits, then cut."""
    return cut(_NUMBER.sub(lambda m: f"{float(m.group()):.3g}", text), n)


def cut(text: str, n: int) -> str:
    """``text`` in at most ``n`` characters (an ellipsis marks the cut)."""
    return text if len(text) <= n else text[: n - 1] + "…"


def open_svg(width: int, height: int, title: str, css: str = "") -> str:
    """The ``<svg>`` element's opening, with its accessible title."""
    cls = f' class="{escape(css, quote=True)}"' if css else ""
    return (f'<svg xmlns="http://www.w3.org/2000/svg" role="img"{cls} width="{width}" '
            f'height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" '
            f'font-size="{FONT}" fill="{INK}"><title>{escape(title)}</title>')


def legend(x: float, y: float, items: Sequence[tuple[str, str, bool]]) -> tuple[str, float]:
    """Legend entries from ``x`` (name, colour, dashed line?); returns markup and end x."""
    out = []
    for name, colour, dashed in items:
        if dashed:
            out.append(f'<line x1="{_num(x)}" x2="{_num(x + 16)}" y1="{_num(y - 4)}" '
                       f'y2="{_num(y - 4)}" stroke="{colour}" stroke-width="2" '
                       'stroke-dasharray="4 3"/>')
        else:
            out.append(f'<rect x="{_num(x + 3)}" y="{_num(y - 9)}" width="10" height="10" '
                       f'fill="{colour}"/>')
        out.append(f'<text x="{_num(x + 20)}" y="{_num(y)}">{escape(name)}</text>')
        x += 28 + 6.2 * len(name)
    return "".join(out), x


@dataclass(frozen=True)
class Frame:
    """The plotting area of a chart over time (:func:`series`, the performance page's
    ``band_series``): where a time and a value land, and the grid, axes and labels around
    them. ``ticks`` are the value ticks, the first and last the axis' ends."""

    width: int
    height: int
    t0: float
    t1: float
    ticks: Sequence[float]

    @property
    def inner_w(self) -> int:
        return self.width - PAD_L - PAD_R

    @property
    def inner_h(self) -> int:
        return self.height - PAD_T - PAD_B

    def x(self, t: float) -> float:
        return PAD_L + self.inner_w * (t - self.t0) / (self.t1 - self.t0)

    def y(self, v: float) -> float:
        y0, y1 = self.ticks[0], self.ticks[-1]
        return PAD_T + self.inner_h * (1 - (v - y0) / (y1 - y0))

    def grid(self) -> str:
        """A grid line and a label at each value tick."""
        return "".join(
            f'<line x1="{PAD_L}" x2="{self.width - PAD_R}" y1="{_num(self.y(v))}" '
            f'y2="{_num(self.y(v))}" stroke="{GRID}"/><text x="{PAD_L - 5}" '
            f'y="{_num(self.y(v) + 4)}" text-anchor="end">{fmt(v)}</text>' for v in self.ticks)

    def time_axis(self, spacing: int, *, marks: bool) -> str:
        """Time labels (with tick marks if ``marks``) about every ``spacing`` pixels."""
        base = PAD_T + self.inner_h
        out = []
        for t, label in time_ticks(self.t0, self.t1, max(2, self.inner_w // spacing)):
            x = _num(self.x(t))
            if marks:
                out.append(f'<line x1="{x}" x2="{x}" y1="{base}" y2="{base + 4}" '
                           f'stroke="{INK}"/>')
            out.append(f'<text x="{x}" y="{base + 16}" text-anchor="middle">'
                       f'{escape(label)}</text>')
        return "".join(out)

    def axes(self, y_label: str = "") -> str:
        """The two axis lines, and the value axis' label written upwards beside it."""
        base = PAD_T + self.inner_h
        out = (f'<line x1="{PAD_L}" x2="{PAD_L}" y1="{PAD_T}" y2="{base}" '
               f'stroke="{INK}"/><line x1="{PAD_L}" x2="{self.width - PAD_R}" '
               f'y1="{base}" y2="{base}" stroke="{INK}"/>')
        if y_label:
            mid = _num(PAD_T + self.inner_h / 2)
            out += (f'<text x="12" y="{mid}" text-anchor="middle" '
                    f'transform="rotate(-90 12 {mid})" fill="{MUTED}">{escape(y_label)}</text>')
        return out

    def reference(self, value: float, colour: str, tooltip: str) -> str:
        """A dashed line across the chart at ``value`` (a threshold, an expectation)."""
        y = _num(self.y(value))
        return (f'<line x1="{PAD_L}" x2="{self.width - PAD_R}" y1="{y}" y2="{y}" '
                f'stroke="{colour}" stroke-width="1.5" stroke-dasharray="4 3">'
                f'<title>{escape(tooltip)}</title></line>')


def no_data(width: int, height: int) -> str:
    """The chart's middle says there is nothing to draw; closes the SVG."""
    return (f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" '
            f'fill="{MUTED}">no data in this range</text></svg>')


def series(lines: Sequence[Line], *, title: str,
           thresholds: Sequence[tuple[str, float, str]] = (), y_label: str = "",
           since: float | None = None, until: float | None = None,
           width: int = 440, height: int = 190) -> Markup:
    """Lines over time on labelled axes; ``thresholds``: (name, value, colour), dashed."""
    known = [(t, v) for ln in lines for t, v in ln.points if v is not None and math.isfinite(v)]
    out = [open_svg(width, height, title, "chart series"),
           legend(PAD_L, 14, [(ln.name, ln.colour, False) for ln in lines]
                  + [(f"{name} {fmt(v)}", colour, True) for name, v, colour in thresholds])[0]]
    if not known:
        return Markup("".join([*out, no_data(width, height)]))
    times = [t for ln in lines for t, _ in ln.points]
    t0 = since if since is not None else min(times, default=0.0)
    t1 = until if until is not None else max(times, default=1.0)
    top = max([v for _, v in known] + [v for _, v, _ in thresholds])
    bottom = min(0.0, *(v for _, v in known))
    frame = Frame(width, height, t0, max(t1, t0 + 60),
                  nice_ticks(bottom, top * 1.05 if top > 0 else 1.0, 5))
    out += [frame.grid(), frame.time_axis(70, marks=True), frame.axes(y_label)]
    out += [frame.reference(v, colour, f"{name} at {fmt(v)}") for name, v, colour in thresholds]
    out += [_line_marks(frame, ln) for ln in lines]
    out.append("</svg>")
    return Markup("".join(out))


def _line_marks(frame: Frame, line: Line) -> str:
    """A line's runs of known values as polylines, each point a dot with its tooltip."""
    segments: list[list[tuple[float, float, float, float]]] = [[]]
    for t, v in line.points:
        if v is None or not math.isfinite(v):
            if segments[-1]:
                segments.append([])
            continue
        segments[-1].append((frame.x(t), frame.y(v), t, v))
    out = []
    for seg in segments:
        if len(seg) > 1:
            path = " ".join(f"{_num(x)},{_num(y)}" for x, y, _, _ in seg)
            out.append(f'<polyline points="{path}" fill="none" stroke="{line.colour}" '
                       'stroke-width="1.8"/>')
        for x, y, t, v in seg:
            out.append(f'<circle cx="{_num(x)}" cy="{_num(y)}" r="2.5" fill="{line.colour}">'
                       f'<title>{escape(line.name)} {fmt(v)} at {_clock(t)}</title>'
                       '</circle>')
    return "".join(out)


def histogram(labels: Sequence[str], base: Sequence[float], live: Sequence[float], *,
              title: str, width: int = 440, height: int = 230) -> Markup:
    """Reference (``base``) against ``live`` proportions, one pair of bars per bin."""
    n = max(1, len(labels))
    pad_l, pad_r, pad_t, pad_b = 46, 12, 26, 74
    inner_w, inner_h = width - pad_l - pad_r, height - pad_t - pad_b
    yt = nice_ticks(0.0, max([*base, *live, 0.01]), 4)
    top = yt[-1]
    slot = inner_w / n
    bar = max(1.0, slot * 0.4)
    out = [open_svg(width, height, title, "chart histogram")]
    out.append(legend(pad_l, 14, [("reference", BASE, False), ("live", LIVE, False)])[0])
    for v in yt:
        y = pad_t + inner_h * (1 - v / top)
        out.append(f'<line x1="{pad_l}" x2="{width - pad_r}" y1="{_num(y)}" y2="{_num(y)}" '
                   f'stroke="{GRID}"/><text x="{pad_l - 5}" y="{_num(y + 4)}" '
                   f'text-anchor="end">{v:.0%}</text>')
    every = max(1, math.ceil(n / max(1, inner_w // 16)))
    for i, label in enumerate(labels):
        x0 = pad_l + i * slot + slot * 0.1
        for j, (values, colour) in enumerate(((base, BASE), (live, LIVE))):
            v = values[i] if i < len(values) else 0.0
            h = inner_h * (v / top)
            out.append(f'<rect x="{_num(x0 + j * bar)}" y="{_num(pad_t + inner_h - h)}" '
                       f'width="{_num(bar)}" height="{_num(h)}" fill="{colour}">'
                       f'<title>{escape(label)}: {"reference" if j == 0 else "live"} '
                       f'{v:.1%}</title></rect>')
        if i % every == 0:
            cx = pad_l + (i + 0.5) * slot
            cy = pad_t + inner_h + 10
            out.append(f'<text x="{_num(cx)}" y="{_num(cy)}" font-size="10" '
                       f'text-anchor="end" transform="rotate(-45 {_num(cx)} {_num(cy)})">'
                       f'<title>{escape(label)}</title><tspan>{escape(short_label(label))}</tspan></text>')
    out.append(f'<line x1="{pad_l}" x2="{width - pad_r}" y1="{pad_t + inner_h}" '
               f'y2="{pad_t + inner_h}" stroke="{INK}"/>')
    out.append("</svg>")
    return Markup("".join(out))


def heatmap(rows: Sequence[tuple[str, Sequence[str | None]]], starts: Sequence[float],
            step: float, *, title: str, links: Mapping[str, str] | None = None,
            width: int = 1200) -> Markup:
    """One row per name, one cell per time step, coloured by verdict (None: no data)."""
    label_w, pad_r, pad_t, pad_b, row_h = 190, 24, 26, 24, 20
    n = max(1, len(starts))
    inner_w = width - label_w - pad_r
    cell = inner_w / n
    height = pad_t + row_h * max(1, len(rows)) + pad_b
    out = [open_svg(width, height, title, "chart heatmap")]
    out.append(legend(label_w, 14, [(v, VERDICT_COLOURS[v], False) for v in
                                     ("ok", "warn", "drift", "insufficient")]
                       + [("no data", VERDICT_COLOURS[None], False)])[0])
    for r, (name, verdicts) in enumerate(rows):
        y = pad_t + r * row_h
        text = escape(cut(name, 30))
        href = (links or {}).get(name)
        label = (f'<text x="{label_w - 6}" y="{y + 14}" text-anchor="end">{text}</text>')
        if href:
            label = f'<a href="{escape(href, quote=True)}">{label}</a>'
        out.append(label)
        out.append(f'<rect x="{label_w}" y="{y + 2}" width="{_num(inner_w)}" '
                   f'height="{row_h - 4}" fill="{VERDICT_COLOURS[None]}"/>')  # no data
        cells = list(verdicts[:n])
        i = 0
        while i < len(cells):  # one rectangle per run of equal verdicts
            v = cells[i]
            j = i + 1
            while j < len(cells) and cells[j] == v:
                j += 1
            if v is not None:
                colour = VERDICT_COLOURS.get(v, VERDICT_COLOURS[None])
                t0 = starts[i] if i < len(starts) else 0.0
                t1 = (starts[j - 1] if j - 1 < len(starts) else t0) + step
                out.append(f'<rect x="{_num(label_w + i * cell)}" y="{y + 2}" '
                           f'width="{_num(max((j - i) * cell - 1, 0.5))}" '
                           f'height="{row_h - 4}" fill="{colour}"><title>{escape(name)} · '
                           f'{_clock(t0)} – {_clock(t1)}: {escape(v)}</title></rect>')
            i = j
    if starts:
        t0, t1 = starts[0], starts[-1] + step
        base_y = pad_t + row_h * max(1, len(rows))
        for t, tick in time_ticks(t0, t1, max(2, inner_w // 80)):
            x = label_w + inner_w * (t - t0) / (t1 - t0)
            out.append(f'<line x1="{_num(x)}" x2="{_num(x)}" y1="{base_y}" y2="{base_y + 4}" '
                       f'stroke="{INK}"/><text x="{_num(x)}" y="{base_y + 16}" '
                       f'text-anchor="middle">{escape(tick)}</text>')
    out.append("</svg>")
    return Markup("".join(out))


def bars(counts: Sequence[tuple[str, int]], *, title: str, width: int = 320,
         colours: Mapping[str, str] | None = None) -> Markup:
    """Horizontal bars, one per ``(label, count)``, the count written after each."""
    row = 20
    height = 10 + row * max(1, len(counts))
    top = max([c for _, c in counts] + [1])
    label_w = 130
    out = [open_svg(width, height, title, "chart bars")]
    if not counts:
        out.append(f'<text x="{width / 2}" y="20" text-anchor="middle" fill="{MUTED}">'
                   'nothing yet</text>')
    for i, (label, count) in enumerate(counts):
        y = 5 + i * row
        w = (width - label_w - 50) * count / top
        colour = (colours or {}).get(label, BASE)
        out.append(f'<text x="{label_w - 6}" y="{y + 13}" text-anchor="end">'
                   f'<title>{escape(label)}</title>{escape(cut(label, 20))}</text>'
                   f'<rect x="{label_w}" y="{y + 3}" width="{_num(w)}" height="{row - 6}" '
                   f'fill="{colour}"/><text x="{_num(label_w + w + 4)}" y="{y + 13}">'
                   f'{count}</text>')
    out.append("</svg>")
    return Markup("".join(out))


def gauge(value: float | None, threshold: float | None, *, op: str = "<=", outcome: str = "",
          title: str, width: int = 180, height: int = 18) -> Markup:
    """A bar for ``value`` with a tick at ``threshold``; coloured by ``outcome``."""
    colour = {"pass": OK, "fail": BAD, "wait": WARN}.get(outcome, "#999")
    known = [abs(v) for v in (value, threshold) if v is not None and math.isfinite(v)]
    top = max([*known, 1e-9]) * 1.25
    out = [open_svg(width, height, title, "chart gauge")]
    out.append(f'<rect x="0" y="3" width="{width}" height="{height - 6}" fill="{GRID}"/>')
    if value is not None and math.isfinite(value):
        w = width * min(abs(value), top) / top
        out.append(f'<rect x="0" y="3" width="{_num(w)}" height="{height - 6}" '
                   f'fill="{colour}"/>')
    if threshold is not None and math.isfinite(threshold):
        x = width * min(abs(threshold), top) / top
        out.append(f'<line x1="{_num(x)}" x2="{_num(x)}" y1="0" y2="{height}" stroke="{INK}" '
                   f'stroke-width="2"><title>threshold {escape(op)} {fmt(threshold)}'
                   '</title></line>')
    out.append("</svg>")
    return Markup("".join(out))


def _clock(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
