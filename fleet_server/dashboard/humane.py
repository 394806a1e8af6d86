"""Numbers for people: times as "3 min ago", durations as "2 h 5 min", sizes as "12.3 MiB".

Pure functions (``now`` is a parameter). The dashboard shows these and keeps the exact value
beside them (a ``title`` attribute), so nothing is lost by rounding. This module does not
render markup.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone

__all__ = ["ago", "duration", "percent", "size", "when"]

_UNITS = (("d", 86400), ("h", 3600), ("min", 60), ("s", 1))


def when(ts: float | None) -> str:
    """An exact UTC time, or "—"."""
    if ts is None:
        return "—"
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def duration(seconds: float | None, parts: int = 2) -> str:
    """``3725`` → ``"1 h 2 min"``: the ``parts`` largest units, rounded down."""
    if seconds is None or not math.isfinite(seconds):
        return "—"
    s = int(abs(seconds))
    if s == 0:
        return "0 s"
    out = []
    for unit, size_ in _UNITS:
        if s >= size_ and len(out) < parts:
            out.append(f"{s // size_} {unit}")
            s %= size_
        elif out:
            break
    return ("-" if seconds < 0 else "") + " ".join(out)


def ago(ts: float | None, now: float) -> str:
    """``"3 min ago"``, ``"in 5 s"`` for a time ahead of ``now``, ``"never"`` for None."""
    if ts is None:
        return "never"
    d = now - ts
    if abs(d) < 1:
        return "just now"
    text = duration(abs(d), parts=1)
    return f"{text} ago" if d > 0 else f"in {text}"


def size(n: float | None) -> str:
    """Bytes in binary units: ``1536`` → ``"1.5 KiB"``."""
    if n is None or not math.isfinite(n):
        return "—"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover - the loop returns


def percent(x: float | None, digits: int = 0) -> str:
    """``0.5`` → ``"50 %"`` (a space before the sign, as the rollout pages write it)."""
    if x is None or not math.isfinite(x):
        return "—"
    return f"{x * 100:.{digits}f} %"
