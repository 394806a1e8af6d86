"""``/api/v1/audit``: the hash-chained audit log, its verification and its export."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from fleet_server.api.deps import ServicesDep, Viewer
from fleet_server.api.schemas import AuditChainPublic, AuditLinkPublic
from fleet_server.registry.audit import MAX_EXPORT, link_dict

router = APIRouter(prefix="/api/v1/audit", tags=["audit"])


@router.get("", response_model=list[AuditLinkPublic])
def export_audit(services: ServicesDep, _: Viewer,
                 since: Annotated[float | None, Query(ge=0, description="Unix seconds")] = None,
                 limit: Annotated[int, Query(ge=1, le=MAX_EXPORT)] = 10_000,
                 ) -> list[dict[str, Any]]:
    """Entries at or after `since`, oldest first, each with `prev` and `hash` (and the exact
    stored `details_text` the hash covers), so an export can be checked and kept elsewhere."""
    return [link_dict(x) for x in services.audit.export(since, limit)]


@router.get("/verify", response_model=AuditChainPublic)
def verify_audit(services: ServicesDep, _: Viewer) -> AuditChainPublic:
    """Walk the whole chain: `intact`, the `head` hash to keep elsewhere, and every edited,
    inserted or deleted entry named."""
    return AuditChainPublic.model_validate(services.audit.verify())
