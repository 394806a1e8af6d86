"""``/api/v1/retrains``: the retraining runs (``edgepack retrain``) and their lineage.

A runner (an operator token) starts or claims a run, reports on it and finishes it;
``fleet retrain start`` asks for one; anyone with a viewer token follows the chain from an
alert to the devices (``GET /api/v1/retrains/{id}``'s ``lineage``).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response

from fleet_server.api.deps import Operator, ServicesDep, Viewer
from fleet_server.api.schemas import (
    RECIPE_PATTERN,
    Joined,
    RetrainClaim,
    RetrainCreate,
    RetrainDetail,
    RetrainPublic,
    RetrainStatus,
    RetrainUpdate,
)

router = APIRouter(prefix="/api/v1/retrains", tags=["retrains"])
RunId = Annotated[int, Path(ge=1, le=2**62)]


@router.get("", response_model=list[RetrainPublic])
def list_retrains(services: ServicesDep, _: Viewer,
                  recipe: Annotated[str | None, Query(pattern=RECIPE_PATTERN)] = None,
                  status: RetrainStatus | None = None,
                  alert: Annotated[int | None, Query(ge=1, le=2**62)] = None,
                  limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[RetrainPublic]:
    """Runs, newest first; filter by recipe, status and the alert that triggered them."""
    return [RetrainPublic.model_validate(r)
            for r in services.retrains.list(recipe=recipe, status=status, alert_id=alert,
                                            limit=limit)]


@router.post("", response_model=RetrainPublic, status_code=201)
def start_retrain(body: RetrainCreate, services: ServicesDep, who: Operator) -> RetrainPublic:
    """Record a run a runner starts now, or (``requested``) one for a runner to claim.
    409 if a run of the recipe is running."""
    run = services.retrains.start(
        recipe=body.recipe, recipe_hash=body.recipe_hash, revision=body.revision,
        trigger=body.trigger, group=body.group, bundle=body.bundle, actor=who.actor,
        now=services.clock(), requested=body.requested)
    return RetrainPublic.model_validate(run)


@router.post("/claim", response_model=RetrainPublic,
             responses={204: {"description": "Nothing requested"}})
def claim_retrain(body: RetrainClaim, services: ServicesDep,
                  who: Operator) -> RetrainPublic | Response:
    """The oldest requested run of a recipe, now running; 204 if there is none (or one
    runs already)."""
    run = services.retrains.claim(body.recipe, who.actor, services.clock())
    if run is None:
        return Response(status_code=204)
    return RetrainPublic.model_validate(run)


@router.get("/{run_id}", response_model=RetrainDetail)
def get_retrain(run_id: RunId, services: ServicesDep, _: Viewer) -> RetrainDetail:
    """One run with its lineage: trigger (or alert), run, champion, challenger, rollout."""
    run = services.retrains.get(run_id)
    return RetrainDetail.model_validate(Joined(run, lineage=services.retrains.lineage(run)))


@router.patch("/{run_id}", response_model=RetrainPublic)
def update_retrain(run_id: RunId, body: RetrainUpdate, services: ServicesDep,
                   who: Operator) -> RetrainPublic:
    """Report on a running run, or finish it (promoted, rejected or failed). 409 once it
    is finished."""
    changes = body.model_dump(exclude_none=True)
    run = services.retrains.update(run_id, changes, who.actor, services.clock())
    return RetrainPublic.model_validate(run)
