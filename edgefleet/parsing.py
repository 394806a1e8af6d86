"""The small text forms every program reads from people: ``key=value``, durations and
thresholds (``accuracy>=+0.01``).

One parser each, so ``fleet``, ``edgepack``, the agent's config, the REST API and the
dashboard accept exactly the same spellings and refuse the same mistakes with the same
words. A refusal is a :class:`~edgefleet.contract.errors.SchemaError` naming the option or
field (``what``); each caller maps it to its own seam (a click usage error, a 422, a 400
page) without re-parsing.

This module deliberately knows no option names and no units beyond s, m, h and d.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from edgefleet.contract.errors import SchemaError

__all__ = ["DURATION_UNITS", "Threshold", "parse_bounds", "parse_duration", "parse_pairs",
           "parse_threshold", "split_pair"]

DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])\Z")
_THRESHOLD = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(>=|<=)([+-]?(?:\d+(?:\.\d*)?|\.\d+))"
                        r"(%|x)?\Z")


def split_pair(item: str, what: str, *, default_key: str | None = None) -> tuple[str, str]:
    """``"key=value"`` → ``("key", "value")`` (split at the first ``=``).

    With ``default_key``, an item without ``=`` is ``(default_key, item)`` (``ROLE=PATH`` or
    just ``PATH``); without it, such an item is refused.

    Raises:
        SchemaError: no ``=`` (and no default key), or an empty key.
    """
    key, sep, value = item.partition("=")
    if not sep:
        if default_key is None:
            raise SchemaError(f"{what} {item!r}: expected key=value", field=what)
        return default_key, item
    if not key:
        raise SchemaError(f"{what} {item!r}: the key before '=' is empty", field=what)
    return key, value


def parse_pairs(items: Iterable[str], what: str) -> dict[str, str]:
    """``["site=a", "line=3"]`` → ``{"site": "a", "line": "3"}``.

    A key given twice is refused rather than silently keeping the last value (``--selector
    site=north --selector site=south`` cannot mean both).

    Raises:
        SchemaError: a malformed item, or a repeated key.
    """
    out: dict[str, str] = {}
    for item in items:
        key, value = split_pair(item, what)
        if key in out and out[key] != value:
            raise SchemaError(f"{what} {key!r} given twice ({out[key]!r} and {value!r}); "
                              "a label has one value", field=what)
        out[key] = value
    return out


def parse_duration(text: str, what: str) -> float:
    """``90s``, ``30m``, ``1h``, ``2d`` → seconds. A bare number is refused: ``--soak 1``
    must not silently mean one second.

    Raises:
        SchemaError: anything else.
    """
    m = _DURATION.match(text.strip())
    if not m:
        raise SchemaError(f"{what} {text!r}: a duration with a unit (90s, 30m, 1h, 2d)",
                          field=what)
    return float(m.group(1)) * DURATION_UNITS[m.group(2)]


def parse_bounds(items: Iterable[str], what: str, names: Iterable[str], *,
                 default_key: str | None = None) -> dict[str, float]:
    """``NAME=VALUE`` upper bounds, each a non-negative number and one of ``names`` (with
    ``default_key``, a bare number is that key's bound).

    Raises:
        SchemaError: a malformed item, an unknown name (the known ones listed), or a value
            that is not a non-negative number.
    """
    known = tuple(names)
    out: dict[str, float] = {}
    for item in items:
        key, text = split_pair(item, what, default_key=default_key)
        if key != default_key and key not in known:
            raise SchemaError(f"{what}: unknown bound {key!r} (use {', '.join(known)})",
                              field=what)
        try:
            value = float(text)
        except ValueError:
            raise SchemaError(f"{what} {key}: {text!r} is not a number", field=what) from None
        if not value >= 0:
            raise SchemaError(f"{what} {key}: must be >= 0", field=what)
        out[key] = value
    return out


@dataclass(frozen=True)
class Threshold:
    """``NAME>=VALUE`` or ``NAME<=VALUE``: ``unit`` ``""`` for an absolute value, ``"%"`` for a
    relative one (``value`` is then the fraction: ``+2%`` is 0.02), ``"x"`` for a ratio.
    ``text`` is the item as written (without spaces), for messages."""

    name: str
    op: str  # >= | <=
    value: float
    unit: str  # "" | "%" | "x"
    text: str


def parse_threshold(text: str, what: str) -> Threshold:
    """``accuracy>=+0.01``, ``f1_macro>=+2%``, ``mae<=-0.5``, ``size<=1.5x`` → a
    :class:`Threshold`. Only the syntax is checked: which names exist, and what the value
    means, is the caller's.

    Raises:
        SchemaError: anything else (the message quotes the item).
    """
    compact = "".join(text.split())
    m = _THRESHOLD.match(compact)
    if not m:
        raise SchemaError(f"{what} {text!r}: expected NAME>=VALUE or NAME<=VALUE, the value "
                          "a number, a percentage or a ratio (accuracy>=+0.01, "
                          "f1_macro>=+2%, size<=1.5x)", field=what)
    name, op, number, unit = m.group(1), m.group(2), float(m.group(3)), m.group(4) or ""
    if unit == "x" and not number > 0:
        raise SchemaError(f"{what} {text!r}: a ratio must be positive", field=what)
    return Threshold(name, op, number / 100 if unit == "%" else number, unit, compact)
