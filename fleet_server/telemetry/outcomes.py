"""Outcomes uploaded centrally: reading the upload, and cutting it into numbered batches.

Pure: bytes in, typed rows and batches out; nothing here reads the store or the clock.
An upload is one of three forms, each read incrementally (:class:`RowReader`, fed the
body as it arrives, so the server never holds more than one chunk of unparsed text):

- ``text/csv``: a header naming the columns ``device``, ``id`` and ``label`` (in any
  order; other columns are refused), then one outcome a row;
- ``application/x-ndjson``: one JSON object ``{"device", "id", "label"}`` a line;
- ``application/json``: ``{"outcomes": [{"device", "id", "label"}, ...]}`` (read whole:
  JSON has no line structure to stream on; bounded by the route's body limit).

Labels. JSON forms keep the label's JSON type. A CSV cell is text, so a CSV label becomes
a number when it is written as one, and stays a string otherwise (:func:`csv_label`):
``-?(0|[1-9][0-9]*)`` is an integer, a decimal with a ``.`` and/or an exponent
(``0.5``, ``-1e3``, ``2.5E-2``) is a float, anything else (``"07"``, ``"nan"``,
``"inf"``, ``"1_000"``, ``" 1"``, ``"yes"``) is the string as written. To send ``"1"``
as a string, use a JSON form. Here a label is checked only as a JSON scalar (a string up
to 256 characters, an integer, a finite number; never a boolean or null); the device
checks it against its bundle's classes.

Every refusal names the row (``line 7`` of a CSV or JSON-lines body, ``outcomes[6]`` of
JSON) and the field, with its own class:

    InvalidRequestError (422)
    └── OutcomeError                 names the row (``where``) and the field
        ├── OutcomeFormatError       not the form it says (header, JSON, encoding, empty)
        ├── UnknownOutcomeDeviceError not a registered device (or not a device id at all)
        ├── OutcomeIdError           not a prediction id (``ID_RE``)
        ├── OutcomeLabelError        not a JSON scalar label
        └── DuplicateOutcomeError    the same (device, id) twice in one upload
    OutcomeQueueFullError (409)      the upload would take a device's undelivered outcomes
                                     past the cap (names the device and the numbers)

Batches (:func:`make_batches`): a device's outcomes in upload order, cut at
:data:`~edgefleet.contract.messages.MAX_OUTCOMES` outcomes or when the encoded message would
pass :data:`MAX_BATCH_BYTES` (1,000 outcomes with 64-character ids and 256-character labels
would be 340 kB, past :data:`~edgefleet.contract.messages.MAX_PAYLOAD`), whichever comes first.
"""

from __future__ import annotations

import codecs
import csv
import functools
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from edgefleet.contract.errors import SchemaError
from edgefleet.contract.messages import (
    ID_RE,
    MAX_OUTCOMES,
    MAX_PAYLOAD,
    Outcome,
    valid_device_id,
)
from edgefleet.contract.wire import canonical_json
from fleet_server.errors import FleetError, InvalidRequestError

__all__ = [
    "CSV_COLUMNS",
    "FORMATS",
    "MAX_BATCH_BYTES",
    "DuplicateOutcomeError",
    "OutcomeError",
    "OutcomeFormatError",
    "OutcomeIdError",
    "OutcomeLabelError",
    "OutcomeQueueFullError",
    "PlannedBatch",
    "RowReader",
    "UnknownOutcomeDeviceError",
    "UploadRow",
    "csv_label",
    "make_batches",
    "parse_json_body",
]

CSV_COLUMNS = ("device", "id", "label")
FORMATS = {"text/csv": "csv", "application/x-ndjson": "ndjson", "application/jsonl": "ndjson",
           "application/json": "json"}
# room for the envelope (schema, type, a 64-character device, a 20-digit batch, the time)
MAX_BATCH_BYTES = MAX_PAYLOAD - 1024
MAX_LINE_CHARS = 4096  # a row is at most about 400 characters; a longer line is not a row
_INT = re.compile(r"-?(?:0|[1-9][0-9]*)\Z")
_FLOAT = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+(?:[eE][-+]?[0-9]+)?|[eE][-+]?[0-9]+)\Z")


class OutcomeError(InvalidRequestError):
    """An upload refused at one row; ``where`` names the row, ``field`` the column."""

    def __init__(self, where: str, message: str, *, field: str | None = None) -> None:
        super().__init__(f"{where}: {message}", field=field)
        self.where = where


class OutcomeFormatError(OutcomeError):
    """The body is not the form its content type says (header, JSON, encoding, empty)."""


class UnknownOutcomeDeviceError(OutcomeError):
    """A row names a device the fleet does not know."""


class OutcomeIdError(OutcomeError):
    """A row's id is not a prediction id."""


class OutcomeLabelError(OutcomeError):
    """A row's label is not a JSON scalar label."""


class DuplicateOutcomeError(OutcomeError):
    """The same (device, id) twice in one upload."""


class OutcomeQueueFullError(FleetError):
    """The upload would take a device's undelivered outcomes past the cap; nothing queued."""

    status = 409

    def __init__(self, device: str, undelivered: int, adding: int, cap: int) -> None:
        super().__init__(f"device {device!r}: {undelivered} outcome(s) undelivered and "
                         f"{adding} more in this upload would pass the cap of {cap} per "
                         "device (nothing was queued; wait for its receipts)")
        self.device = device


@dataclass(frozen=True)
class UploadRow:
    where: str  # "line 7", "outcomes[6]"
    device: str
    outcome: Outcome
    text: str  # the outcome's canonical JSON, as a batch holds it

    @property
    def size(self) -> int:
        """Bytes the outcome takes in a batch, its comma included."""
        return len(self.text.encode("utf-8")) + 1


def csv_label(text: str) -> str | int | float:
    """A CSV cell as a label: an integer or a decimal number when written as one, else the
    string itself (see the module docstring)."""
    if _INT.match(text):
        return int(text)
    if _FLOAT.match(text):
        value = float(text)
        if value not in (float("inf"), float("-inf")):
            return value
    return text


def _row(where: str, device: Any, pid: Any, label: Any) -> UploadRow:
    """Check one outcome's fields; the device's registration is checked later, at once."""
    if not isinstance(device, str) or not valid_device_id(device):
        raise UnknownOutcomeDeviceError(where, f"device {str(device)[:80]!r} is not a device "
                                               "id", field="device")
    if not isinstance(pid, str) or not ID_RE.match(pid):
        raise OutcomeIdError(where, f"id {str(pid)[:80]!r} is not a prediction id (letters, "
                                    "digits, '_', '.', ':', '-', at most 64)", field="id")
    try:
        text = _label_json(type(label), label)
    except (SchemaError, TypeError) as exc:
        raise OutcomeLabelError(where, f"label {str(label)[:80]!r}: a string (at most 256 "
                                       "characters), an integer or a finite number "
                                       f"({exc})", field="label") from None
    # canonical JSON of {"id", "label"}: keys sorted, no spaces; an id needs no escapes
    return UploadRow(where, device, Outcome(pid, label), f'{{"id":"{pid}","label":{text}}}')


@functools.lru_cache(maxsize=4096)
def _label_json(kind: type, label: Any) -> str:
    """A label's canonical JSON, after the contract's check (:meth:`Outcome.from_dict`).
    Cached by type and value: class labels repeat row after row (``kind`` keeps ``1``
    and ``1.0`` apart); an unhashable label is refused by the cache itself (TypeError).

    Raises:
        SchemaError: not a label the contract takes, or not writable as JSON.
    """
    Outcome.from_dict({"id": "x", "label": label}, "outcome")
    return canonical_json(label).decode("utf-8")


def _object_row(where: str, obj: Any) -> UploadRow:
    if not isinstance(obj, dict):
        raise OutcomeFormatError(where, "an outcome is an object {device, id, label}")
    missing = [k for k in CSV_COLUMNS if k not in obj]
    extra = sorted(set(obj) - set(CSV_COLUMNS))
    if missing or extra:
        raise OutcomeFormatError(where, f"fields must be device, id and label (missing: "
                                        f"{', '.join(missing) or '-'}; unknown: "
                                        f"{', '.join(map(repr, extra)) or '-'})")
    return _row(where, obj["device"], obj["id"], obj["label"])


def parse_json_body(body: bytes) -> list[UploadRow]:
    """``{"outcomes": [...]}`` as rows.

    Raises:
        OutcomeError: naming the row at fault.
    """
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise OutcomeFormatError("body", f"not JSON ({exc})") from None
    if not isinstance(doc, dict) or set(doc) != {"outcomes"} or \
            not isinstance(doc["outcomes"], list):
        raise OutcomeFormatError("body", 'expected {"outcomes": [{"device", "id", "label"}, '
                                         '...]}')
    return [_object_row(f"outcomes[{i}]", o) for i, o in enumerate(doc["outcomes"])]


class RowReader:
    """Reads a CSV or JSON-lines body chunk by chunk (:meth:`feed`, then :meth:`close`),
    returning the rows each chunk completes.

    Raises (from both):
        OutcomeError: naming the line at fault.
    """

    def __init__(self, form: str) -> None:
        if form not in ("csv", "ndjson"):
            raise ValueError(f"form {form!r}")
        self.form = form
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._pending = ""
        self._line = 0
        self._columns: tuple[int, int, int] | None = None  # positions of device, id, label
        self.rows = 0

    def feed(self, chunk: bytes) -> list[UploadRow]:
        try:
            text = self._decoder.decode(chunk)
        except UnicodeDecodeError as exc:
            raise OutcomeFormatError(f"line {self._line + 1}", f"not UTF-8 ({exc})") from None
        text = self._pending + text
        lines = text.split("\n")
        self._pending = lines.pop()
        if len(self._pending) > MAX_LINE_CHARS:
            raise OutcomeFormatError(f"line {self._line + len(lines) + 1}",
                                     f"longer than {MAX_LINE_CHARS} characters")
        return list(self._lines(lines))

    def close(self) -> list[UploadRow]:
        try:
            tail = self._pending + self._decoder.decode(b"", final=True)
        except UnicodeDecodeError as exc:
            raise OutcomeFormatError(f"line {self._line + 1}", f"not UTF-8 ({exc})") from None
        self._pending = ""
        out = list(self._lines([tail] if tail else []))
        if self.form == "csv" and self._columns is None:
            raise OutcomeFormatError("line 1", "empty: expected the header device,id,label")
        return out

    def _lines(self, lines: Iterable[str]) -> Iterator[UploadRow]:
        for line in lines:
            self._line += 1
            where = f"line {self._line}"
            line = line.removesuffix("\r")
            if len(line) > MAX_LINE_CHARS:
                raise OutcomeFormatError(where, f"longer than {MAX_LINE_CHARS} characters")
            if self.form == "ndjson":
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as exc:
                    raise OutcomeFormatError(where, f"not JSON ({exc})") from None
                self.rows += 1
                yield _object_row(where, obj)
                continue
            if self._line == 1:
                line = line.removeprefix("\ufeff")  # a spreadsheet's byte-order mark
            if not line:
                continue
            try:
                cells = next(csv.reader([line], strict=True))
            except csv.Error as exc:
                raise OutcomeFormatError(where, f"not a CSV row ({exc}; a quoted field "
                                                "cannot span lines)") from None
            if self._columns is None:
                self._columns = self._header(where, cells)
                continue
            if len(cells) != 3:
                raise OutcomeFormatError(where, f"{len(cells)} column(s); expected 3 "
                                                "(device,id,label)")
            d, i, lab = self._columns
            self.rows += 1
            yield _row(where, cells[d], cells[i], csv_label(cells[lab]))

    @staticmethod
    def _header(where: str, cells: Sequence[str]) -> tuple[int, int, int]:
        names = [c.strip().lower() for c in cells]
        if sorted(names) != sorted(CSV_COLUMNS):
            raise OutcomeFormatError(where, f"header {','.join(cells)[:200]!r}: expected the "
                                            "columns device,id,label")
        return names.index("device"), names.index("id"), names.index("label")


@dataclass(frozen=True)
class PlannedBatch:
    """A batch to number: ``outcomes`` the canonical JSON list the store keeps."""

    device: str
    outcomes: str
    count: int


def make_batches(rows: Sequence[UploadRow], *, max_outcomes: int = MAX_OUTCOMES,
                 max_bytes: int = MAX_BATCH_BYTES) -> list[PlannedBatch]:
    """Each device's outcomes in upload order, cut into batches (see the module docstring).

    Raises:
        DuplicateOutcomeError: a (device, id) given twice, naming both rows.
    """
    seen: dict[tuple[str, str], str] = {}
    by_device: dict[str, list[UploadRow]] = {}
    for row in rows:
        key = (row.device, row.outcome.id)
        if key in seen:
            raise DuplicateOutcomeError(row.where, f"device {row.device!r} id "
                                                   f"{row.outcome.id!r} is given at "
                                                   f"{seen[key]} already", field="id")
        seen[key] = row.where
        by_device.setdefault(row.device, []).append(row)
    out: list[PlannedBatch] = []
    for device in sorted(by_device):
        part: list[str] = []
        size = 2
        for row in by_device[device]:
            n = row.size
            if part and (len(part) >= max_outcomes or size + n > max_bytes):
                out.append(PlannedBatch(device, f"[{','.join(part)}]", len(part)))
                part, size = [], 2
            part.append(row.text)
            size += n
        if part:
            out.append(PlannedBatch(device, f"[{','.join(part)}]", len(part)))
    return out
