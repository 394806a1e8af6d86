"""``/api/v1/capture``: rows devices captured for retraining, and their export.

The upload takes a device's secret only (an operator token is refused: the device a row
comes from is the credential's, never the body's); its body is bounded by the route's own
limit (``capture.max_batch_bytes``, :mod:`fleet_server.api.guard`). The export is for
viewers, as JSON lines (one flat row each; ``fleet dataset export`` writes CSV or
Parquet from it). The rules are the capture service's.
"""

from __future__ import annotations

from typing import Annotated

import orjson
from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from fleet_server.api.deps import AnyPrincipal, BundleQ, GroupQ, ServicesDep, Viewer
from fleet_server.errors import PermissionDeniedError
from fleet_server.monitoring.performance import parse_since

router = APIRouter(prefix="/api/v1/capture", tags=["capture"])

_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["schema", "batch", "rows"],
    "properties": {"schema": {"type": "integer"}, "batch": {"type": "string"},
                   "rows": {"type": "array", "items": {"type": "object"}}}}}}}}


class CaptureStoredPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    batch: str
    rows: int
    stored: int  # rows new to the server (a row seen before is not stored twice)
    duplicate: bool  # this batch id was stored before: nothing stored now


@router.post("", response_model=CaptureStoredPublic, status_code=201,
             openapi_extra=_BODY)
async def upload_capture(request: Request, services: ServicesDep,
                         who: AnyPrincipal) -> CaptureStoredPublic:
    """Store a device's batch of captured rows (device secret only). A batch id stored
    before answers ``duplicate: true`` and stores nothing, so a device may send a batch
    again until it gets an answer."""
    if who.kind != "device":
        raise PermissionDeniedError("capture uploads come from devices (their secret); "
                                    "an operator token cannot upload rows")
    body = await request.body()
    stored = await run_in_threadpool(services.capture.ingest, who.name, body)
    return CaptureStoredPublic.model_validate(stored)


@router.get("/export", responses={200: {"content": {"application/x-ndjson": {
    "schema": {"type": "string"}}}, "description": "One captured row a line"}})
def export_capture(
    services: ServicesDep, _: Viewer,
    bundle: BundleQ,
    group: GroupQ = None,
    since: Annotated[str | None, Query(max_length=40,
                                       description="14d, 12h (ago) or unix seconds")] = None,
    labelled: bool = False,
) -> StreamingResponse:
    """One bundle's captured rows as JSON lines, oldest first: ``device``, ``id``,
    ``time``, the captured features, ``predicted`` (the model's label or value) and
    ``label`` (the true label joined from outcomes uploaded centrally; null when none).
    ``labelled=true`` keeps only labelled rows; ``group`` only its members' rows."""
    name, _, version = bundle.partition("@")
    start = parse_since(since, services.clock()) if since is not None else 0.0
    rows = services.capture.export(name, version, group=group, since=start or 0.0,
                                   labelled=labelled)

    def lines():
        for row in rows:
            yield orjson.dumps(row) + b"\n"

    return StreamingResponse(iterate_in_threadpool(lines()),
                             media_type="application/x-ndjson")
