"""``/api/v1/rollouts``: create, list, inspect, preview, act (approve, start, pause,
resume, promote, abort). The rules are :class:`~fleet_server.rollouts.engine.Rollouts`'."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path

from fleet_server.api.deps import Operator, ServicesDep, Viewer
from fleet_server.api.schemas import (
    ROLLOUT_ID_PATTERN,
    RolloutActionIn,
    RolloutCreate,
    RolloutPreview,
    RolloutPublic,
    RolloutSummary,
)
from fleet_server.models import ROLES, RolloutAction, RolloutStatus
from fleet_server.registry.auth import Principal

router = APIRouter(prefix="/api/v1/rollouts", tags=["rollouts"])
RolloutIdPath = Annotated[str, Path(pattern=ROLLOUT_ID_PATTERN, description="The rollout id")]


def roles_of(who: Principal) -> set[str]:
    """The roles a principal holds (each role includes the ones before it)."""
    return {r for r in ROLES if who.has_role(r)}


def _spec(body: RolloutCreate) -> dict[str, Any]:
    """The plan's fields as the operator gave them (what they left out, the engine's
    defaults fill), gates too."""
    spec = body.model_dump(exclude_unset=True)
    if body.gates is not None:
        spec["gates"] = body.gates.model_dump(exclude_unset=True)
    return spec


@router.get("", response_model=list[RolloutSummary])
def list_rollouts(services: ServicesDep, _: Viewer,
                  status: RolloutStatus | None = None) -> list[RolloutSummary]:
    """Rollouts, newest first; filter by status."""
    return [RolloutSummary.model_validate(r) for r in services.rollouts.list(
        status=None if status is None else status.value)]


@router.post("", response_model=RolloutPublic, status_code=201)
def create_rollout(body: RolloutCreate, services: ServicesDep,
                   who: Operator) -> RolloutPublic:
    """Create a staged rollout of a bundle to a group (``start``: start it at once).

    One unfinished rollout per group (and per device) at a time: 409 otherwise. A group
    marked ``requires_approval`` makes the rollout wait for an approver.
    """
    return RolloutPublic.model_validate(
        services.rollouts.create(_spec(body), actor=who.actor, roles=roles_of(who)))


@router.post("/preview", response_model=RolloutPreview)
def preview_rollout(body: RolloutCreate, services: ServicesDep, _: Viewer) -> RolloutPreview:
    """A dry run: which devices each stage would hold (for the id given or generated)."""
    return RolloutPreview.model_validate(services.rollouts.preview(_spec(body)))


@router.get("/{rollout_id}", response_model=RolloutPublic)
def get_rollout(rollout_id: RolloutIdPath, services: ServicesDep, _: Viewer) -> RolloutPublic:
    """One rollout: plan, stages, last gate results, devices and the audit log."""
    return RolloutPublic.model_validate(services.rollouts.get(rollout_id))


@router.post("/{rollout_id}/{action}", response_model=RolloutPublic)
def act_on_rollout(rollout_id: RolloutIdPath, action: RolloutAction, services: ServicesDep,
                   who: Operator, body: RolloutActionIn | None = None) -> RolloutPublic:
    """An operator action. ``approve`` needs the approver role and a bundle signed by an
    approver key; finished rollouts refuse every action (409)."""
    reason = body.reason if body is not None else ""
    return RolloutPublic.model_validate(services.rollouts.act(
        rollout_id, action.value, actor=who.actor, roles=roles_of(who), reason=reason))
