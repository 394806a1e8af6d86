"""Store tables of the outcomes queue: true labels uploaded centrally, waiting for their device.

Per device, numbered batches (``outcome_batches``: 1, 2, ... as the protocol of
:class:`edgefleet.contract.messages.Outcomes` numbers them) and one queue row
(``outcome_queues``: the highest batch made, the highest batch the device has receipted,
and how many outcomes it has receipted). A batch is immutable once made: a device may have
applied it, so later uploads make new batches. A receipted batch's row is deleted in the
transaction that records the receipt, so the table holds only what is undelivered (the
per-device cap bounds it); its count stays in the queue row.

The store decides nothing: the cap, who may upload, what is due and when to resend are the
routing service's (:mod:`fleet_server.telemetry.routing`); every time is a parameter.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from fleet_server.store._base import StoreBase, chunks


@dataclass(frozen=True)
class OutcomeBatchRow:
    """One batch due to be published: its outcomes as the canonical JSON list stored."""

    device: str
    batch: int
    outcomes: str
    count: int
    sends: int


@dataclass(frozen=True)
class OutcomeQueueRow:
    """Where a device's outcomes stand: counts of outcomes (not batches) by state."""

    device: str
    batches: int  # the highest batch made
    receipt: int  # the highest batch the device has receipted
    receipt_at: float | None
    queued: int  # outcomes in batches never sent
    sent: int  # outcomes in batches sent and not receipted yet
    receipted: int  # outcomes the device has receipted
    last_sent: float | None


class OutcomeTables(StoreBase):
    def existing_devices(self, devices: Iterable[str]) -> set[str]:
        """Which of ``devices`` are registered."""
        found: set[str] = set()
        for part in chunks(sorted(set(devices)), 500):
            marks = ", ".join("?" * len(part))
            found.update(r["id"] for r in self._rows(
                f"SELECT id FROM devices WHERE id IN ({marks})", list(part)))
        return found

    def undelivered_outcomes(self, devices: Iterable[str]) -> dict[str, tuple[int, int]]:
        """Per device: (outcomes not receipted yet, the highest batch made); (0, 0) for a
        device without a queue."""
        out = {d: (0, 0) for d in devices}
        for part in chunks(sorted(out), 500):
            marks = ", ".join("?" * len(part))
            for r in self._rows(
                    f"SELECT q.device, q.batches, COALESCE(SUM(b.count), 0) AS n "
                    f"FROM outcome_queues q LEFT JOIN outcome_batches b "
                    f"ON b.device = q.device WHERE q.device IN ({marks}) "
                    f"GROUP BY q.device, q.batches", list(part)):
                out[r["device"]] = (int(r["n"]), int(r["batches"]))
        return out

    def add_outcome_batches(self, batches: Sequence[tuple[str, int, str, int]],
                            now: float) -> None:
        """Insert ``(device, batch, outcomes JSON, count)`` rows and move each device's
        highest batch. Call inside :meth:`transaction`, after reading the numbers with
        :meth:`undelivered_outcomes` in it."""
        self._many("INSERT INTO outcome_batches (device, batch, outcomes, count, created_at) "
                   "VALUES (?, ?, ?, ?, ?)", [(*b, now) for b in batches])
        top: dict[str, int] = {}
        for device, batch, _, _ in batches:
            top[device] = max(top.get(device, 0), batch)
        self._many("INSERT INTO outcome_queues (device, batches) VALUES (?, ?) "
                   "ON CONFLICT (device) DO UPDATE SET batches = "
                   "GREATEST(outcome_queues.batches, excluded.batches)", sorted(top.items()))

    def due_outcome_batches(self, *, resend_before: float, window: int, limit: int,
                            devices: Sequence[str] | None = None) -> list[OutcomeBatchRow]:
        """The batches to publish now, by device and batch: of online devices, within
        ``window`` batches above the device's receipt, never sent, due again (their
        device came online since), or last sent before ``resend_before``."""
        sql = ("SELECT b.device, b.batch, b.outcomes, b.count, b.sends FROM outcome_batches b "
               "JOIN outcome_queues q ON q.device = b.device "
               "JOIN devices d ON d.id = b.device "
               "WHERE d.online = 1 AND b.batch > q.receipt AND b.batch <= q.receipt + ? "
               "AND (b.sent_at IS NULL OR b.sent_at < ?)")
        params: list[object] = [window, resend_before]
        if devices is not None:
            if not devices:
                return []
            sql += f" AND b.device IN ({', '.join('?' * len(devices))})"
            params += list(devices)
        sql += " ORDER BY b.device, b.batch LIMIT ?"
        return [OutcomeBatchRow(r["device"], r["batch"], r["outcomes"], r["count"], r["sends"])
                for r in self._rows(sql, [*params, limit])]

    def mark_outcomes_sent(self, sent: Sequence[tuple[str, int]], now: float) -> None:
        with self.transaction():
            self._many("UPDATE outcome_batches SET sent_at = ?, sends = sends + 1 "
                       "WHERE device = ? AND batch = ?", [(now, d, b) for d, b in sent])

    def unmark_outcomes_sent(self, batches: Sequence[tuple[str, int]]) -> None:
        """Batches recorded as sent that could not be published: due again, not sent."""
        with self.transaction():
            self._many("UPDATE outcome_batches SET sent_at = NULL, sends = sends - 1 "
                       "WHERE device = ? AND batch = ? AND sends > 0", list(batches))

    def outcomes_due_again(self, devices: Iterable[str]) -> None:
        """A device came online: its unreceipted batches are due at once (what was sent
        before may have gone with its previous connection)."""
        self._many("UPDATE outcome_batches SET sent_at = NULL WHERE device = ? "
                   "AND sent_at IS NOT NULL", [(d,) for d in sorted(set(devices))])

    def record_outcome_receipts(self, receipts: Mapping[str, int], now: float
                                ) -> tuple[dict[str, int], dict[str, int]]:
        """Apply receipts (device → the highest batch it has applied). Call inside
        :meth:`transaction`.

        Returns:
            ``(advanced, ignored)``: the devices whose receipt moved (to what), and those
            naming a batch never sent (by what they named); a receipt at or below the
            stored one changes nothing and is in neither.
        """
        advanced: dict[str, int] = {}
        ignored: dict[str, int] = {}
        for device, upto in sorted(receipts.items()):
            queue = self._one("SELECT receipt FROM outcome_queues WHERE device = ?", [device])
            if queue is None:
                if upto > 0:
                    ignored[device] = upto
                continue
            if upto <= queue["receipt"]:
                continue
            sent = self._one("SELECT MAX(batch) AS top FROM outcome_batches "
                             "WHERE device = ? AND sends > 0", [device])
            if sent is None or sent["top"] is None or upto > sent["top"]:
                ignored[device] = upto
                continue
            done = self._one("SELECT COALESCE(SUM(count), 0) AS n FROM outcome_batches "
                             "WHERE device = ? AND batch <= ?", [device, upto])
            self._exec("DELETE FROM outcome_batches WHERE device = ? AND batch <= ?",
                       [device, upto])
            self._exec("UPDATE outcome_queues SET receipt = ?, receipt_at = ?, "
                       "receipted = receipted + ? WHERE device = ?",
                       [upto, now, int(done["n"]) if done else 0, device])
            advanced[device] = upto
        return advanced, ignored

    def outcome_queues(self, device: str | None = None, *, limit: int = 1000
                       ) -> list[OutcomeQueueRow]:
        """Every device's queue (or one device's), by device."""
        sql = ("SELECT q.device, q.batches, q.receipt, q.receipt_at, q.receipted, "
               "COALESCE(SUM(CASE WHEN b.sends = 0 THEN b.count ELSE 0 END), 0) AS queued, "
               "COALESCE(SUM(CASE WHEN b.sends > 0 THEN b.count ELSE 0 END), 0) AS sent, "
               "MAX(b.sent_at) AS last_sent FROM outcome_queues q "
               "LEFT JOIN outcome_batches b ON b.device = q.device")
        params: list[object] = []
        if device is not None:
            sql += " WHERE q.device = ?"
            params.append(device)
        sql += (" GROUP BY q.device, q.batches, q.receipt, q.receipt_at, q.receipted "
                "ORDER BY q.device LIMIT ?")
        return [OutcomeQueueRow(r["device"], r["batches"], r["receipt"], r["receipt_at"],
                                int(r["queued"]), int(r["sent"]), r["receipted"],
                                r["last_sent"])
                for r in self._rows(sql, [*params, limit])]
