"""``/api/v1/summaries`` and ``/api/v1/dead-letters``: what devices sent, and what was refused."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from fleet_server.api.deps import ServicesDep, Viewer
from fleet_server.api.schemas import BUNDLE_PATTERN, DeadLetterPublic, SummaryPublic
from fleet_server.registry.bundles import parse_label

router = APIRouter(prefix="/api/v1", tags=["telemetry"])


@router.get("/summaries", response_model=list[SummaryPublic])
def list_summaries(
    services: ServicesDep, _: Viewer,
    device: Annotated[str | None, Query(max_length=64)] = None,
    bundle: Annotated[str | None, Query(pattern=BUNDLE_PATTERN, description="name@version")] = None,
    since: Annotated[float | None, Query(description="window end >= (unix seconds)")] = None,
    until: Annotated[float | None, Query(description="window end < (unix seconds)")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
) -> list[SummaryPublic]:
    """Stored window summaries (headers: rows, errors, latency, shadow), newest first.

    ``folded`` says whether a summary is counted in drift reports yet (false while its
    bundle has not been uploaded).
    """
    found = services.store.list_summaries(
        device=device, bundle=parse_label(bundle) if bundle else None, since=since,
        until=until, limit=limit, offset=offset)
    return [SummaryPublic.model_validate(s) for s in found]


@router.get("/dead-letters", response_model=list[DeadLetterPublic])
def list_dead_letters(
    services: ServicesDep, _: Viewer,
    device: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
) -> list[DeadLetterPublic]:
    """Refused messages, newest first: topic, the error's class and message, size."""
    return [DeadLetterPublic.model_validate(d)
            for d in services.store.list_dead_letters(limit=limit, offset=offset,
                                                      device=device)]
