"""``/api/v1/outcomes``: true labels uploaded centrally for their devices, and where they are.

The upload's body is read as it arrives and parsed chunk by chunk (CSV and JSON lines;
:class:`~fleet_server.telemetry.outcomes.RowReader`), bounded by the route's own limit
(``outcomes.max_upload_bytes``, :mod:`fleet_server.api.guard`); the rules are the outcome
service's. The response schemas live here: they serve this route only.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from fleet_server.api.deps import Operator, ServicesDep, Viewer
from fleet_server.api.schemas import DEVICE_PATTERN
from fleet_server.telemetry.outcomes import (
    FORMATS,
    OutcomeFormatError,
    RowReader,
    UploadRow,
    parse_json_body,
)

router = APIRouter(prefix="/api/v1/outcomes", tags=["outcomes"])

_BODY = {"requestBody": {"required": True, "content": {
    "text/csv": {"schema": {"type": "string"},
                 "example": "device,id,label\npress-1,evt-001,ok\npress-1,evt-002,1\n"},
    "application/x-ndjson": {"schema": {"type": "string"},
                             "example": '{"device": "press-1", "id": "evt-001", "label": "ok"}'},
    "application/json": {"schema": {
        "type": "object", "required": ["outcomes"], "additionalProperties": False,
        "properties": {"outcomes": {"type": "array", "items": {
            "type": "object", "required": ["device", "id", "label"],
            "properties": {"device": {"type": "string"}, "id": {"type": "string"},
                           "label": {"anyOf": [{"type": "string"}, {"type": "number"}]}}}}}}},
}}}


class OutcomesQueued(BaseModel):
    model_config = ConfigDict(extra="forbid")

    outcomes: int
    devices: dict[str, int]  # device -> outcomes queued for it


class OutcomeQueuePublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    device: str
    batches: int
    receipt: int
    receipt_at: float | None
    queued: int
    sent: int
    receipted: int
    last_sent: float | None


async def _rows(request: Request) -> list[UploadRow]:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    form = FORMATS.get(ctype)
    if form is None:
        raise OutcomeFormatError("body", f"content type {ctype[:64]!r}: send text/csv, "
                                         "application/x-ndjson or application/json")
    if form == "json":
        return await run_in_threadpool(parse_json_body, await request.body())
    reader, rows = RowReader(form), []
    async for chunk in request.stream():
        if chunk:
            rows += await run_in_threadpool(reader.feed, chunk)
    return rows + reader.close()


@router.post("", response_model=OutcomesQueued, status_code=201, openapi_extra=_BODY)
async def upload_outcomes(request: Request, services: ServicesDep,
                          who: Operator) -> OutcomesQueued:
    """Queue true labels for their devices: CSV (header ``device,id,label``), JSON lines,
    or ``{"outcomes": [{"device", "id", "label"}]}``.

    The upload is queued whole or not at all; a refusal names the row and the field
    (unknown device, bad id, bad label, duplicate). A CSV label written as a number is
    sent as one. Each device gets its outcomes over MQTT in numbered batches, applied
    exactly once; ``GET /api/v1/outcomes`` shows how far they are.
    """
    rows = await _rows(request)
    queued = await run_in_threadpool(services.outcomes.upload, rows, who.actor)
    return OutcomesQueued(outcomes=sum(queued.values()), devices=queued)


@router.get("", response_model=list[OutcomeQueuePublic])
def outcome_status(
    services: ServicesDep, _: Viewer,
    device: Annotated[str | None, Query(pattern=DEVICE_PATTERN)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> list[OutcomeQueuePublic]:
    """Per device with outcomes: outcomes queued (never sent), sent and not receipted,
    and receipted (applied on the device); the last batch made and the last receipted."""
    return [OutcomeQueuePublic.model_validate(r)
            for r in services.outcomes.status(device, limit=limit)]
