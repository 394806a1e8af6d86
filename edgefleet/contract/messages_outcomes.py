"""The outcome messages: true labels travel to their device, receipts travel back.

:class:`Outcomes` batches are numbered per device and applied exactly once; the device
answers with a :class:`Receipt` (see :mod:`edgefleet.contract.messages`; import them from
there).

This module does not encode or decode payloads and does not join outcomes with
predictions (the agent does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from edgefleet.contract.messages_base import ID_RE, MAX_OUTCOMES, MESSAGE_SCHEMA, Message
from edgefleet.contract.wire import Fields

__all__ = ["Label", "Outcome", "Outcomes", "Receipt"]


Label = str | int | float  # a class label (str or int), or a regressor's true value


@dataclass(frozen=True)
class Outcome:
    """The truth for one prediction: its id and the true label (a class, or a finite
    number for a regressor)."""

    id: str
    label: Label

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "label": self.label}

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> Outcome:
        f = Fields(obj, where)
        pid = f.matching("id", ID_RE,
                         "a prediction id: letters, digits, '_', '.', ':', '-' (max 64)",
                         max_len=64)
        label = f.raw("label")
        if isinstance(label, bool) or not isinstance(label, (str, int, float)):
            raise f.bad("label", "a class label (string or integer) or a finite number")
        if isinstance(label, float) and not math.isfinite(label):
            raise f.bad("label", "must be finite")
        if isinstance(label, str) and len(label) > 256:
            raise f.bad("label", "longer than 256 characters")
        f.done()
        return cls(pid, label)


@dataclass(frozen=True)
class Outcomes(Message):
    """A numbered batch of outcomes for one device (see the top: applied exactly once)."""

    kind: ClassVar[str] = "outcomes"
    device: str
    batch: int  # 1, 2, ... per device
    outcomes: tuple[Outcome, ...]
    time: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"schema": MESSAGE_SCHEMA, "type": self.kind, "device": self.device,
                "batch": self.batch, "outcomes": [o.to_dict() for o in self.outcomes],
                "time": self.time}

    @classmethod
    def from_fields(cls, f: Fields) -> Outcomes:
        batch = f.int("batch", minimum=1)
        items = f.list("outcomes", max_len=MAX_OUTCOMES)
        return cls(f.str("device", max_len=64), batch,
                   tuple(Outcome.from_dict(o, f"{f.where}.outcomes[{i}]")
                         for i, o in enumerate(items)), f.float("time", 0.0))


@dataclass(frozen=True)
class Receipt(Message):
    """What a device has applied: every outcome batch up to ``outcomes`` (0: none)."""

    kind: ClassVar[str] = "receipt"
    device: str
    outcomes: int
    time: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"schema": MESSAGE_SCHEMA, "type": self.kind, "device": self.device,
                "outcomes": self.outcomes, "time": self.time}

    @classmethod
    def from_fields(cls, f: Fields) -> Receipt:
        return cls(f.str("device", max_len=64), f.int("outcomes"), f.float("time", 0.0))
