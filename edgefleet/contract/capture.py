"""The capture batch: served rows a device uploads for retraining (``POST /api/v1/capture``).

A batch is one JSON object, schema 1::

    {"schema": 1, "batch": "<16-64 chars: the device's idempotency key>",
     "rows": [{"id": "<prediction id>", "time": 1733500000.0, "bundle": "name@version",
               "features": {"temp": 21.5, "site": "a", "gap": null},
               "label": "ok", "probabilities": [0.1, 0.9], "value": null}]}

``label``/``probabilities`` are a classifier's outputs, ``value`` a regressor's; the
features are only those the device's allowlist names (the agent filters before anything
is written to its queue). An optional ``"outcomes": [{"id": "<prediction id>", "label":
<the true label>}]`` carries labels that joined on the device for rows it captured (in
this batch or an earlier one); a batch may then have no rows. The batch id makes an upload
idempotent: the server stores a batch once per device and answers a repeat as a duplicate,
so a device that lost the answer sends it again safely.

Both sides use :func:`decode_batch` and :func:`encode_batch`: one owner of the format.
This module does not sample, queue, send or store.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from edgefleet.contract.errors import SchemaError
from edgefleet.contract.messages import ID_RE
from edgefleet.contract.wire import Fields, parse_json

__all__ = [
    "BATCH_RE",
    "MAX_BATCH_BYTES",
    "MAX_BATCH_ROWS",
    "MAX_FEATURES",
    "SCHEMA",
    "CaptureBatch",
    "CaptureRow",
    "decode_batch",
    "encode_batch",
    "encode_rows",
]

SCHEMA = 1
MAX_BATCH_ROWS = 10_000
MAX_BATCH_BYTES = 4 * 1024 * 1024
MAX_FEATURES = 1024
MAX_TEXT = 256  # a categorical value, a label
MAX_CLASSES = 1024
BATCH_RE = re.compile(r"^[A-Za-z0-9_-]{16,64}\Z")
_BUNDLE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}@[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}\Z")
_FEATURE_RE = re.compile(r"^[^\x00-\x1f]{1,128}\Z")

Scalar = float | int | str | None


@dataclass(frozen=True)
class CaptureRow:
    """One captured row: its prediction id, when it was served, by which bundle, its
    allowed features and the model's outputs."""

    id: str
    time: float
    bundle: str  # name@version
    features: dict[str, Scalar]
    label: Scalar = None
    probabilities: tuple[float, ...] | None = None
    value: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "time": self.time, "bundle": self.bundle,
                "features": self.features, "label": self.label,
                "probabilities": None if self.probabilities is None
                else list(self.probabilities), "value": self.value}

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> CaptureRow:
        f = Fields(obj, where)
        pid = f.matching("id", ID_RE, "{value!r} is not a prediction id", max_len=64)
        time = f.float("time")
        bundle = f.matching("bundle", _BUNDLE_RE, "{value!r}: expected name@version",
                            max_len=200)
        features = f.mapping("features")
        if len(features) > MAX_FEATURES:
            raise f.bad("features", f"more than {MAX_FEATURES} features")
        for name, v in features.items():
            if not _FEATURE_RE.match(name):
                raise f.bad("features", f"feature name {name[:40]!r} refused")
            features[name] = _scalar(v, f"{where}.features.{name}")
        label = _scalar(f.raw("label", None), f"{where}.label")
        proba = f.raw("probabilities", None)
        if proba is not None:
            if not isinstance(proba, list) or len(proba) > MAX_CLASSES or not all(
                    isinstance(p, (int, float)) and not isinstance(p, bool)
                    and math.isfinite(p) for p in proba):
                raise f.bad("probabilities", "expected a list of finite numbers")
            proba = tuple(float(p) for p in proba)
        value = f.opt_float("value")
        f.done()
        return cls(pid, time, bundle, features, label, proba, value)


def _scalar(v: Any, where: str) -> Scalar:
    if v is None or (isinstance(v, str) and len(v) <= MAX_TEXT):
        return v
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int) and abs(v) < 2**53:
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    raise SchemaError(f"{where}: expected a number, a string up to {MAX_TEXT} characters "
                      "or null", field=where)


@dataclass(frozen=True)
class CaptureBatch:
    """A batch of captured rows with the device's idempotency key, and the true labels
    ``(prediction id, label)`` that joined on the device for rows it captured."""

    batch: str
    rows: tuple[CaptureRow, ...]
    outcomes: tuple[tuple[str, Scalar], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"schema": SCHEMA, "batch": self.batch,
                               "rows": [r.to_dict() for r in self.rows]}
        if self.outcomes:
            doc["outcomes"] = [{"id": pid, "label": label} for pid, label in self.outcomes]
        return doc


def encode_batch(batch: CaptureBatch) -> bytes:
    return json.dumps(batch.to_dict(), separators=(",", ":"), allow_nan=False).encode()


def encode_rows(batch_id: str, rows: Sequence[bytes], outcomes: Sequence[bytes] = ()
                ) -> bytes:
    """A batch body from rows (and outcomes) already encoded as JSON objects (the agent's
    queue)."""
    tail = b',"outcomes":[' + b",".join(outcomes) + b"]" if outcomes else b""
    return b'{"schema":1,"batch":"' + batch_id.encode() + b'","rows":[' + \
        b",".join(rows) + b"]" + tail + b"}"


def decode_batch(data: bytes, *, max_bytes: int = MAX_BATCH_BYTES) -> CaptureBatch:
    """Parse and check one batch body.

    Raises:
        SchemaError: too large, not JSON, or a field refused (named: ``capture.rows[3].id``).
    """
    f = Fields(parse_json(data, what="capture batch", max_bytes=max_bytes), "capture")
    schema = f.int("schema")
    if schema != SCHEMA:
        raise f.bad("schema", f"{schema}: this server reads schema {SCHEMA}")
    batch = f.matching("batch", BATCH_RE, "16-64 letters, digits, '_' or '-'", max_len=64)
    raw = f.list("rows", max_len=MAX_BATCH_ROWS)
    labels = f.list("outcomes", max_len=MAX_BATCH_ROWS) if f.has("outcomes") else []
    if not raw and not labels:
        raise f.bad("rows", "no rows")
    rows = tuple(CaptureRow.from_dict(r, f"capture.rows[{i}]") for i, r in enumerate(raw))
    outcomes = tuple(_outcome(o, f"capture.outcomes[{i}]") for i, o in enumerate(labels))
    f.done()
    if len({pid for pid, _ in outcomes}) < len(outcomes):
        raise f.bad("outcomes", "a prediction id twice")
    ids = set()
    for i, r in enumerate(rows):
        if r.id in ids:
            raise SchemaError(f"capture.rows[{i}].id: {r.id!r} twice in the batch",
                              field=f"capture.rows[{i}].id")
        ids.add(r.id)
    return CaptureBatch(batch, rows, outcomes)


def _outcome(obj: Any, where: str) -> tuple[str, Scalar]:
    f = Fields(obj, where)
    pid = f.str("id", max_len=64)
    if not ID_RE.match(pid):
        raise f.bad("id", f"{pid!r} is not a prediction id")
    label = _scalar(f.raw("label", None), f"{where}.label")
    if label is None:
        raise f.bad("label", "missing")
    f.done()
    return pid, label
