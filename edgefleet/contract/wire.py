"""Canonical JSON and strict field readers shared by every wire format.

Canonical JSON here is: UTF-8, keys sorted, no insignificant white space, no NaN or
infinity, floats in Python's shortest round-trip form. It is what signatures cover
and what hashes are taken over, so the same value always gives the same bytes.

This module deliberately does not know any schema: manifests, profiles and MQTT
messages read their fields through :class:`Fields`, which names the field at fault
in every :class:`~edgefleet.contract.errors.SchemaError` and refuses unknown fields.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from edgefleet.contract.errors import SchemaError

try:  # optional: the server installs it (ingest parses thousands of summaries a second)
    import orjson
except ImportError:  # pragma: no cover - the device's light install
    orjson = None
# parse_json(fast=True) refuses floats that overflow to infinity itself (orjson)
FAST_CHECKS_FLOATS = orjson is not None

__all__ = ["Fields", "canonical_json", "parse_json", "sha256_hex"]

T = TypeVar("T")


def canonical_json(value: Any) -> bytes:
    """Serialise ``value`` to canonical JSON bytes.

    Raises:
        SchemaError: the value holds NaN, infinity, a type JSON cannot carry, or an
            object key that is not a string.
    """
    _check_keys(value)
    try:
        text = json.dumps(
            value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
        # inside the try: a lone surrogate passes json.dumps but has no UTF-8 form
        return text.encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise SchemaError(f"value cannot be written as canonical JSON: {exc}") from exc


def _check_keys(value: Any) -> None:
    # json.dumps sorts int keys as numbers, then writes them as strings: {2:…, 10:…}
    # gives '{"2":…,"10":…}', which re-serialises to other bytes once parsed.
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise SchemaError(f"object key {key!r} is not a string; canonical JSON "
                                  "needs string keys")
            _check_keys(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _check_keys(item)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


def _finite_float(text: str) -> float:
    # json reads 1e400 as inf without calling parse_constant
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} overflows a float")
    return value


def parse_json(data: bytes, *, what: str, max_bytes: int, fast: bool = False) -> Any:
    """Parse JSON bytes with a size bound; NaN and infinity are refused.

    ``fast=True`` is for message payloads whose every field is checked by a schema
    reader: with orjson installed (the server) it parses 5-10x faster, refusing NaN,
    Infinity and literals that overflow to infinity itself; integers beyond 64 bits come
    back as floats there, which the readers refuse as "not an integer". Without orjson,
    the check that no float literal overflows is skipped (a Python call per float): the
    caller checks every float itself. Manifests and other signed documents use the exact
    standard-library path.

    Raises:
        SchemaError: too large, not UTF-8 or not JSON; the message names ``what``.
    """
    if len(data) > max_bytes:
        raise SchemaError(f"{what}: {len(data)} bytes exceeds the limit of {max_bytes}")
    if fast and orjson is not None:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise SchemaError(f"{what}: not valid JSON ({exc})") from exc
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_no_constants,
                          parse_float=None if fast else _finite_float)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SchemaError(f"{what}: not valid JSON ({exc})") from exc


class Fields:
    """Strict reader over one JSON object: typed getters, unknown fields refused.

    ``where`` is a dotted path used in messages (``manifest.inputs[2].name``).
    Call :meth:`done` after reading to refuse fields that were not consumed.
    """

    def __init__(self, obj: Any, where: str) -> None:
        if not isinstance(obj, Mapping):
            raise SchemaError(f"{where}: expected an object, got {_kind(obj)}", field=where)
        self._obj = obj
        self._seen: set[str] = set()
        self.where = where

    def _path(self, key: str) -> str:
        return f"{self.where}.{key}"

    def has(self, key: str) -> bool:
        return key in self._obj

    def raw(self, key: str, default: Any = ..., /) -> Any:
        self._seen.add(key)
        if key not in self._obj:
            if default is ...:
                raise SchemaError(f"{self._path(key)}: missing", field=self._path(key))
            return default
        return self._obj[key]

    def str(self, key: str, default: Any = ..., /, *, max_len: int = 256) -> str:
        value = self.raw(key, default)
        if value is default and default is not ...:
            return value
        if not isinstance(value, str):
            raise self.bad(key, f"expected a string, got {_kind(value)}")
        if len(value) > max_len:
            raise self.bad(key, f"longer than {max_len} characters")
        return value

    def matching(self, key: str, pattern: re.Pattern[str], why: str, /, *,
                 max_len: int = 256) -> str:
        """A string (at most ``max_len`` characters) that ``pattern`` matches: a name, an
        id, a digest. ``why`` says what it must be; ``{value!r}`` in it quotes the value."""
        value = self.str(key, max_len=max_len)
        if not pattern.match(value):
            raise self.bad(key, why.format(value=value))
        return value

    def int(self, key: str, default: Any = ..., /, *, minimum: int | None = 0,
            maximum: int = 2**63 - 1) -> int:
        value = self.raw(key, default)
        if value is default and default is not ...:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.bad(key, f"expected an integer, got {_kind(value)}")
        if minimum is not None and value < minimum:
            raise self.bad(key, f"must be >= {minimum}, got {value}")
        if value > maximum:  # 64-bit by default: what SQLite and numpy hold
            raise self.bad(key, f"must be <= {maximum}")
        return value

    def float(self, key: str, default: Any = ..., /) -> float:
        value = self.raw(key, default)
        if value is default and default is not ...:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.bad(key, f"expected a number, got {_kind(value)}")
        if not math.isfinite(value):
            raise self.bad(key, "must be finite")
        return float(value)

    def opt_float(self, key: str) -> float | None:
        if self._obj.get(key) is None:
            self._seen.add(key)
            return None
        return self.float(key)

    def bool(self, key: str, default: Any = ..., /) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise self.bad(key, f"expected true or false, got {_kind(value)}")
        return value

    def list(self, key: str, default: Any = ..., /, *, max_len: int = 100_000) -> list[Any]:
        value = self.raw(key, default)
        if not isinstance(value, list):
            raise self.bad(key, f"expected a list, got {_kind(value)}")
        if len(value) > max_len:
            raise self.bad(key, f"more than {max_len} items")
        return value

    def obj(self, key: str, default: Any = ..., /) -> Fields:
        value = self.raw(key, default)
        return Fields(value, self._path(key))

    def mapping(self, key: str, default: Any = ..., /) -> dict[str, Any]:
        value = self.raw(key, default)
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise self.bad(key, f"expected an object, got {_kind(value)}")
        return dict(value)

    def choice(self, key: str, options: Iterable[str], default: Any = ..., /) -> str:
        value = self.str(key, default)
        allowed = tuple(options)
        if value not in allowed:
            raise self.bad(key, f"must be one of {', '.join(allowed)}, got {value!r}")
        return value

    def bad(self, key: str, why: str) -> SchemaError:
        return SchemaError(f"{self._path(key)}: {why}", field=self._path(key))

    def done(self) -> None:
        """Refuse fields that no getter consumed."""
        extra = sorted(set(self._obj) - self._seen)
        if extra:
            raise SchemaError(
                f"{self.where}: unknown field(s) {', '.join(map(repr, extra))}",
                field=self._path(extra[0]),
            )


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(value), type(value).__name__)
