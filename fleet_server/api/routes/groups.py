"""``/api/v1/groups``: named label selectors."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response

from fleet_server.api.deps import Operator, ServicesDep, Viewer
from fleet_server.api.schemas import (
    GROUP_PATTERN,
    CaptureIn,
    GroupCreate,
    GroupPublic,
    GroupUpdate,
    Joined,
)
from fleet_server.models import Group
from fleet_server.registry.capture_policy import CaptureChange
from fleet_server.services import Services

router = APIRouter(prefix="/api/v1/groups", tags=["groups"])
GroupName = Annotated[str, Path(pattern=GROUP_PATTERN)]


def _capture(body: CaptureIn | None) -> CaptureChange | None:
    if body is None:
        return None
    return CaptureChange(body.enabled, body.rate, body.max_rows,
                         None if body.features is None else tuple(body.features), body.reset)


def _public(services: Services, group: Group) -> GroupPublic:
    return GroupPublic.model_validate(
        Joined(group, members=len(services.registry.members(group))))


@router.get("", response_model=list[GroupPublic])
def list_groups(services: ServicesDep, _: Viewer) -> list[GroupPublic]:
    """Every group with its selector and current member count."""
    return [_public(services, g) for g in services.registry.groups()]


@router.post("", response_model=GroupPublic, status_code=201)
def create_group(body: GroupCreate, services: ServicesDep, who: Operator) -> GroupPublic:
    """Create a group: devices whose labels match every selector pair are members.

    ``important_features``: a drift of any of these makes the group drift;
    ``requires_approval``: rollouts to it need an approver; ``requires``: what a bundle
    must carry before a rollout to it (``card``, ``approval``, ``fairness``, ``champion``);
    an unknown name is refused (422) naming it; ``drift``: the group's own drift settings
    over the server's, ``performance`` its own performance alert tolerances (an unknown
    key or a bad value is a 400 naming it); ``capture``: data capture on its devices (a
    rate in [0, 1], a cap of rows a window, an allowlist of inputs of the bundles its
    devices run), carried in their desired states; the devices' own configs stay an upper
    bound.
    """
    group = services.registry.create_group(
        body.name, body.selector, who.actor, services.clock(),
        requires_approval=body.requires_approval, important_features=body.important_features,
        requires=body.requires, drift=body.drift, performance=body.performance,
        capture=_capture(body.capture))
    return _public(services, group)


@router.patch("/{name}", response_model=GroupPublic)
def update_group(name: GroupName, body: GroupUpdate, services: ServicesDep, who: Operator
                 ) -> GroupPublic:
    """Change a group's important features, drift settings (``drift`` sets keys,
    ``reset_drift`` returns keys to the server's) and performance tolerances
    (``performance``, ``reset_performance``): the next evaluated window uses them; and its
    data capture (``capture``: values over the current ones, ``enabled: false`` off,
    ``reset: true`` none; its devices' desired states change at once)."""
    group = services.registry.update_group(
        name, who.actor, services.clock(), important_features=body.important_features,
        drift=body.drift, reset_drift=body.reset_drift, performance=body.performance,
        reset_performance=body.reset_performance, capture=_capture(body.capture))
    return _public(services, group)


@router.get("/{name}", response_model=GroupPublic)
def get_group(name: GroupName, services: ServicesDep, _: Viewer) -> GroupPublic:
    """One group."""
    return _public(services, services.registry.group(name))


@router.delete("/{name}", status_code=204, response_class=Response)
def delete_group(name: GroupName, services: ServicesDep, who: Operator) -> Response:
    """Delete a group (its devices are untouched)."""
    services.registry.delete_group(name, who.actor, services.clock())
    return Response(status_code=204)
