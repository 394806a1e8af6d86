"""Data capture on the server: batches devices upload, the export, retention.

:class:`CaptureService` (what the API calls):

- :meth:`~CaptureService.ingest` checks a batch (:func:`edgefleet.contract.capture.decode_batch`)
  from the device its credential names (never one the body names) and stores it once per
  batch id; a row is stored once per (device, prediction id). A row whose outcome was
  uploaded centrally before it arrived is labelled as it is stored; outcomes uploaded
  later label it then (:meth:`fleet_server.telemetry.routing.OutcomeService.upload`), and
  so do a batch's ``outcomes``: labels that joined on the device for rows it captured.
- :meth:`~CaptureService.export` yields one bundle's captured rows (of a group, served
  since a time, labelled only if asked), flat, ready to train on: ``device``, ``id``,
  ``time``, the features, the model's ``predicted`` label (or ``value``) and ``label``, the
  true one (empty when none).
- :meth:`~CaptureService.housekeeping` applies the retention (``capture.retention_s``) and
  the disk budget (``capture.max_bytes``, the oldest rows first); the engine's housekeeping
  calls it.

This module does not sample (the device does) and does not judge the rows' features
against the bundle's schema: a row is data as the device served it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from edgefleet.contract.capture import decode_batch
from edgefleet.contract.errors import SchemaError
from fleet_server.config import DEFAULT_CAPTURE, CaptureConfig
from fleet_server.errors import InvalidRequestError, NotFoundError
from fleet_server.registry.devices import Registry
from fleet_server.store import Store

__all__ = ["CaptureFormatError", "CaptureService", "CaptureStored", "UnknownCaptureBundleError"]

PAGE = 1000


class CaptureFormatError(InvalidRequestError):
    """A capture batch that breaks its schema; the message names the field."""


class UnknownCaptureBundleError(NotFoundError):
    """An export of a bundle the server does not know."""


@dataclass(frozen=True)
class CaptureStored:
    """What one upload did: the batch id, rows stored, whether the batch was a repeat."""

    batch: str
    rows: int
    stored: int
    duplicate: bool


class CaptureService:
    def __init__(self, store: Store, registry: Registry,
                 config: CaptureConfig = DEFAULT_CAPTURE,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.registry = registry
        self.config = config
        self.clock = clock

    def ingest(self, device: str, body: bytes) -> CaptureStored:
        """Store one batch from ``device`` (the authenticated one).

        Raises:
            CaptureFormatError: the body is not a capture batch (names the field).
            StoreError: the database failed; nothing was stored.
        """
        try:
            batch = decode_batch(body, max_bytes=self.config.max_batch_bytes)
        except SchemaError as exc:
            raise CaptureFormatError(str(exc), field=exc.field) from exc
        rows = []
        for r in batch.rows:
            name, _, version = r.bundle.partition("@")
            prediction = {"label": r.label, "probabilities": None if r.probabilities is None
                          else list(r.probabilities), "value": r.value}
            rows.append((r.id, r.time, name, version,
                         json.dumps(r.features, separators=(",", ":"), sort_keys=True),
                         json.dumps(prediction, separators=(",", ":"))))
        now = self.clock()
        with self.store.transaction():
            stored, duplicate = self.store.add_capture_batch(device, batch.batch, rows, now)
            if batch.outcomes and not duplicate:
                # labels joined on the device, for rows it captured: as an outcome uploaded
                # centrally (kept for a row stored later; the first label stands)
                self.store.record_capture_labels(
                    [(device, pid, json.dumps(label)) for pid, label in batch.outcomes], now)
        return CaptureStored(batch.batch, len(rows), stored, duplicate)

    def export(self, name: str, version: str, *, group: str | None = None,
               since: float = 0.0, labelled: bool = False) -> Iterator[dict]:
        """One bundle's captured rows (of ``group``'s members now, if given), flat, oldest
        first, at most ``max_export_rows``. Checks happen at the call, rows as iterated.

        Raises:
            UnknownCaptureBundleError: no such bundle is stored.
            NotFoundError: no such group.
        """
        if self.store.bundle_id(name, version) is None:
            raise UnknownCaptureBundleError("bundle", f"{name}@{version}")
        devices = None if group is None else \
            self.registry.members(self.registry.group(group))
        return self._rows(name, version, devices, since, labelled)

    def _rows(self, name: str, version: str, devices: list[str] | None, since: float,
              labelled: bool) -> Iterator[dict]:
        after, left = 0, self.config.max_export_rows
        while left > 0:
            page = self.store.captured_rows(name, version, since=since, labelled=labelled,
                                            devices=devices, after=after,
                                            limit=min(PAGE, left))
            for r in page:
                prediction = json.loads(r.prediction)
                row = {"device": r.device, "id": r.pid, "time": r.served}
                row.update(json.loads(r.features))
                label = prediction.get("label")
                row["predicted"] = prediction.get("value") if label is None else label
                row["label"] = None if r.label is None else json.loads(r.label)
                yield row
            if len(page) < PAGE:
                return
            left -= len(page)
            after = page[-1].id

    def housekeeping(self, now: float) -> int:
        """Retention and the disk budget; returns the captured rows deleted."""
        return self.store.prune_capture(now - self.config.retention_s, self.config.max_bytes)
