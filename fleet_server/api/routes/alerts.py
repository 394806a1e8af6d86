"""``/api/v1/alerts``: drift, suspect-sensor and review alerts, with their webhook deliveries."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query

from fleet_server.api.deps import Operator, ServicesDep, Viewer
from fleet_server.api.schemas import BUNDLE_PATTERN, AlertDetail, AlertPublic, Joined
from fleet_server.monitoring.alerts import KINDS

router = APIRouter(prefix="/api/v1/alerts", tags=["alerts"])
AlertId = Annotated[int, Path(ge=1, le=2**62)]


@router.get("", response_model=list[AlertPublic])
def list_alerts(services: ServicesDep, _: Viewer,
                state: Literal["open", "resolved"] | None = None,
                kind: Literal[KINDS] | None = None,  # type: ignore[valid-type]
                bundle: Annotated[str | None, Query(pattern=BUNDLE_PATTERN)] = None,
                limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[AlertPublic]:
    """Alerts, newest first; filter by state, kind and bundle (name@version)."""
    record = services.bundles.by_label(bundle) if bundle else None
    found = services.alerts.list(state=state, kind=kind, bundle=record, limit=limit)
    return [AlertPublic.model_validate(a) for a in found]


@router.get("/{alert_id}", response_model=AlertDetail)
def get_alert(alert_id: AlertId, services: ServicesDep, _: Viewer) -> AlertDetail:
    """One alert with every webhook delivery attempt."""
    alert = services.alerts.get(alert_id)
    return AlertDetail.model_validate(
        Joined(alert, deliveries=services.alerts.attempts(alert_id)))


@router.post("/{alert_id}/resolve", response_model=AlertPublic)
def resolve_alert(alert_id: AlertId, services: ServicesDep, who: Operator) -> AlertPublic:
    """Resolve an open alert by hand (the evaluator also resolves it when drift clears)."""
    alert = services.alerts.resolve_by_id(alert_id, who.actor, services.clock())
    return AlertPublic.model_validate(alert)
