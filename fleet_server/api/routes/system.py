"""Liveness and metrics: ``GET /health`` and ``GET /metrics`` (both without credentials)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from edgefleet import __version__
from fleet_server.api.deps import ServicesDep
from fleet_server.api.schemas import HealthPublic
from fleet_server.metrics import CONTENT_TYPE

router = APIRouter(tags=["system"])


@router.get("/health", response_model=HealthPublic)
def health(services: ServicesDep) -> HealthPublic:
    """Liveness: the database answers; whether the MQTT link is up.

    No credentials needed, so a load balancer can probe it.
    """
    return HealthPublic(status="ok", version=__version__, db_version=services.store.version,
                        mqtt=services.mqtt_state())


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                             "description": "Prometheus text exposition format"}})
def metrics(services: ServicesDep) -> Response:
    """Prometheus metrics of this server: messages ingested by type, dead letters,
    duplicates, ingest lag, devices online, alerts, webhook failures."""
    return Response(services.metrics.render(), media_type=CONTENT_TYPE)
