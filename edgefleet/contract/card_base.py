"""The model card's shared pieces: its bounds, the date reader, the field readers, Estimate.

Both halves of the card (:mod:`edgefleet.contract.card`, and the champion comparison in
:mod:`edgefleet.contract.card_champion`) read their fields with these; import the card's
names from :mod:`edgefleet.contract.card`.

This module reads no files and computes nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date
from typing import Any

from edgefleet.contract.wire import Fields

__all__ = ["CARD_SCHEMA", "DATE_RE", "MAX_COLUMNS", "MAX_GROUPS", "MAX_NAME", "MAX_TEXT", "METHODS",
           "Estimate", "items_of", "opt_floats", "opt_str", "parse_date"]

CARD_SCHEMA = 1
MAX_TEXT = 4096  # one free-text answer of the statement
MAX_GROUPS = 64  # groups of one slice or sensitive column
MAX_COLUMNS = 16  # slice columns, sensitive columns
MAX_NAME = 128
METHODS = ("wilson", "bootstrap", "normal", "none")
DATE_RE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}\Z")


def parse_date(text: str, where: str) -> date:
    """``YYYY-MM-DD`` → a date.

    Raises:
        ValueError: not a calendar date in that form (the message names ``where``).
    """
    if not DATE_RE.match(text):
        raise ValueError(f"{where}: {text!r} is not a date like 2027-06-30")
    try:
        return date.fromisoformat(text)
    except ValueError as exc:
        raise ValueError(f"{where}: {text!r} is not a calendar date") from exc


def opt_str(f: Fields, key: str, max_len: int = MAX_NAME) -> str | None:
    value = f.raw(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > max_len:
        raise f.bad(key, f"expected a string of at most {max_len} characters or null")
    return value


def opt_floats(f: Fields, key: str) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for k, v in f.mapping(key).items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise f.bad(key, f"{k!r} is not a number or null")
        out[k] = None if v is None else float(v)
    return out


def items_of(f: Fields, key: str, cls: Any, max_len: int) -> tuple:
    return tuple(cls.from_dict(o, f"{f.where}.{key}[{i}]")
                 for i, o in enumerate(f.list(key, max_len=max_len)))


@dataclass(frozen=True)
class Estimate:
    """A measured value with its 95 % interval and how the interval was found."""

    name: str
    value: float | None
    low: float | None = None
    high: float | None = None
    method: str = "none"  # wilson | bootstrap | normal | none

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "low": self.low, "high": self.high,
                "method": self.method}

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> Estimate:
        f = Fields(obj, where)
        out = cls(f.str("name", max_len=MAX_NAME), f.opt_float("value"), f.opt_float("low"),
                  f.opt_float("high"), f.choice("method", METHODS))
        f.done()
        return out
