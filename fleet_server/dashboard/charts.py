"""Charts as inline SVG, drawn on the server: the dashboard needs no JavaScript and no CDN.

Three kinds, each a pure function from numbers to an SVG string:

- :func:`histogram`: reference vs live proportions per bin, side by side (the drift page);
- :func:`series`: a score over time with its threshold line (drift per feature, rollouts);
- :func:`bars`: counts by category (the fleet overview: devices by status, bundle, group);
- :func:`gauge`: one value against its threshold (a rollout gate).

Every text that reaches the SVG is escaped; numbers are formatted, never interpolated raw,
so a hostile device label or feature name cannot inject markup. The charts carry
``role="img"`` and a ``<title>`` for screen readers.

This module does not fetch data or know the API.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime, timezone
from html import escape

__all__ = ["bars", "gauge", "histogram", "series"]

BASE, LIVE, WARN, BAD, GRID, INK = "#8da9c4", "#e07a5f", "#f2cc8f", "#c1121f", "#e5e5e5", "#333"


def _num(x: float) -> str:
    return f"{x:.1f}"


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 100 or abs(value) < 0.01:
        return f"{value:.3g}"
    return f"{value:.2f}"


def histogram(labels: Sequence[str], base: Sequence[float], live: Sequence[float], *,
              title: str, width: int = 420, height: int = 180) -> str:
    """Reference (``base``) against ``live`` proportions, one pair of bars per slot."""
    n = max(1, len(labels))
    pad_l, pad_b, pad_t = 36, 46, 18
    inner_w, inner_h = width - pad_l - 8, height - pad_b - pad_t
    top = max([*base, *live, 0.01])
    slot = inner_w / n
    bar = max(1.0, slot * 0.4)
    out = [_open(width, height, title)]
    for frac in (0.5, 1.0):
        y = pad_t + inner_h * (1 - frac)
        out.append(f'<line x1="{pad_l}" x2="{width - 8}" y1="{_num(y)}" y2="{_num(y)}" '
                   f'stroke="{GRID}"/><text x="{pad_l - 4}" y="{_num(y + 4)}" '
                   f'text-anchor="end" font-size="9">{_fmt(top * frac)}</text>')
    for i, label in enumerate(labels):
        x0 = pad_l + i * slot + slot * 0.1
        for j, (values, colour) in enumerate(((base, BASE), (live, LIVE))):
            v = values[i] if i < len(values) else 0.0
            h = inner_h * (v / top)
            out.append(f'<rect x="{_num(x0 + j * bar)}" y="{_num(pad_t + inner_h - h)}" '
                       f'width="{_num(bar)}" height="{_num(h)}" fill="{colour}">'
                       f'<title>{escape(label)}: {"reference" if j == 0 else "live"} '
                       f'{v:.3f}</title></rect>')
        if n <= 16 or i % math.ceil(n / 16) == 0:
            cx = pad_l + (i + 0.5) * slot
            out.append(f'<text x="{_num(cx)}" y="{height - pad_b + 12}" font-size="8" '
                       f'text-anchor="end" transform="rotate(-40 {_num(cx)} '
                       f'{height - pad_b + 12})">{escape(_short(label))}</text>')
    out.append(_legend(width, [("reference", BASE), ("live", LIVE)]))
    out.append("</svg>")
    return "".join(out)


def series(points: Sequence[tuple[float, float | None]], *, title: str,
           threshold: float | None = None, warn: float | None = None, width: int = 420,
           height: int = 140, unit: str = "") -> str:
    """A line over time (``(epoch seconds, value)``; None values leave a gap)."""
    pad_l, pad_b, pad_t = 40, 22, 14
    inner_w, inner_h = width - pad_l - 10, height - pad_b - pad_t
    known = [(t, v) for t, v in points if v is not None and math.isfinite(v)]
    out = [_open(width, height, title)]
    if not known:
        out.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" '
                   f'font-size="11" fill="#777">no data yet</text></svg>')
        return "".join(out)
    t0 = min(t for t, _ in known)
    t1 = max(max(t for t, _ in known), t0 + 1)
    top = max([v for _, v in known] + [threshold or 0.0, warn or 0.0]) * 1.1 or 1.0

    def xy(t: float, v: float) -> tuple[float, float]:
        return (pad_l + inner_w * (t - t0) / (t1 - t0), pad_t + inner_h * (1 - v / top))

    for level, colour, name in ((warn, WARN, "warn"), (threshold, BAD, "drift")):
        if level is not None:
            _, y = xy(t0, level)
            out.append(f'<line x1="{pad_l}" x2="{width - 10}" y1="{_num(y)}" y2="{_num(y)}" '
                       f'stroke="{colour}" stroke-dasharray="4 3"><title>{name} at '
                       f'{_fmt(level)}</title></line>')
    segments: list[list[tuple[float, float]]] = [[]]
    for t, v in points:
        if v is None or not math.isfinite(v):
            if segments[-1]:
                segments.append([])
            continue
        segments[-1].append(xy(t, v))
    for seg in segments:
        if len(seg) > 1:
            path = " ".join(f"{_num(x)},{_num(y)}" for x, y in seg)
            out.append(f'<polyline points="{path}" fill="none" stroke="{LIVE}" '
                       'stroke-width="1.6"/>')
        for x, y in seg:
            out.append(f'<circle cx="{_num(x)}" cy="{_num(y)}" r="2" fill="{LIVE}"/>')
    out.append(f'<text x="{pad_l - 4}" y="{pad_t + 4}" text-anchor="end" font-size="9">'
               f'{_fmt(top)}{escape(unit)}</text><text x="{pad_l - 4}" '
               f'y="{pad_t + inner_h}" text-anchor="end" font-size="9">0</text>')
    for t in (t0, t1):
        x, _ = xy(t, 0)
        anchor = "start" if t == t0 else "end"
        out.append(f'<text x="{_num(x)}" y="{height - 6}" text-anchor="{anchor}" '
                   f'font-size="9">{_clock(t)}</text>')
    out.append("</svg>")
    return "".join(out)


def bars(counts: Sequence[tuple[str, int]], *, title: str, width: int = 300) -> str:
    """Horizontal bars, one per ``(label, count)``."""
    row = 18
    height = 16 + row * max(1, len(counts))
    top = max([c for _, c in counts] + [1])
    label_w = 110
    out = [_open(width, height, title)]
    for i, (label, count) in enumerate(counts):
        y = 8 + i * row
        w = (width - label_w - 40) * count / top
        out.append(f'<text x="{label_w - 6}" y="{y + 12}" text-anchor="end" font-size="11">'
                   f'{escape(_short(label, 18))}</text><rect x="{label_w}" y="{y + 2}" '
                   f'width="{_num(w)}" height="{row - 6}" fill="{BASE}"/><text '
                   f'x="{_num(label_w + w + 4)}" y="{y + 12}" font-size="11">{count}</text>')
    out.append("</svg>")
    return "".join(out)


def gauge(value: float | None, threshold: float | None, *, op: str = "<=", outcome: str = "",
          title: str, width: int = 180, height: int = 18) -> str:
    """A bar for ``value`` with a tick at ``threshold``; coloured by ``outcome``."""
    colour = {"pass": "#2a9d8f", "fail": BAD, "wait": WARN}.get(outcome, "#999")
    known = [abs(v) for v in (value, threshold) if v is not None and math.isfinite(v)]
    top = max([*known, 1e-9]) * 1.25
    out = [_open(width, height, title)]
    out.append(f'<rect x="0" y="3" width="{width}" height="{height - 6}" fill="{GRID}"/>')
    if value is not None and math.isfinite(value):
        w = width * min(abs(value), top) / top
        out.append(f'<rect x="0" y="3" width="{_num(w)}" height="{height - 6}" '
                   f'fill="{colour}"/>')
    if threshold is not None and math.isfinite(threshold):
        x = width * min(abs(threshold), top) / top
        out.append(f'<line x1="{_num(x)}" x2="{_num(x)}" y1="0" y2="{height}" stroke="{INK}" '
                   f'stroke-width="2"><title>threshold {escape(op)} {_fmt(threshold)}'
                   '</title></line>')
    out.append("</svg>")
    return "".join(out)


def _open(width: int, height: int, title: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" role="img" width="{width}" '
            f'height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" '
            f'fill="{INK}"><title>{escape(title)}</title>')


def _legend(width: int, items: Sequence[tuple[str, str]]) -> str:
    out = []
    x = width - 8 - 80 * len(items)
    for name, colour in items:
        out.append(f'<rect x="{x}" y="2" width="9" height="9" fill="{colour}"/>'
                   f'<text x="{x + 12}" y="10" font-size="9">{escape(name)}</text>')
        x += 80
    return "".join(out)


def _short(text: str, n: int = 14) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _clock(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%H:%M:%S")
