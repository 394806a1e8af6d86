"""``/api/v1/drift``: reports on demand, per-feature time series, evaluated windows."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool

from fleet_server.api.deps import BundleQ, DeviceQ, GroupQ, ServicesDep, UntilQ, Viewer
from fleet_server.api.schemas import DriftResultPublic, DriftWindowPublic, SeriesPublic
from fleet_server.models import FLEET_SCOPE

router = APIRouter(prefix="/api/v1/drift", tags=["drift"])

Since = Annotated[float | None, Query(description="unix seconds; default: an hour before "
                                                  "until")]


@router.get("", response_model=DriftResultPublic)
async def drift_report(services: ServicesDep, _: Viewer, bundle: BundleQ, group: GroupQ = None,
                       device: DeviceQ = None, since: Since = None,
                       until: UntilQ = None) -> DriftResultPublic:
    """The drift report of one bundle version over the fleet, a group or a device.

    Summaries are merged exactly (only those over this bundle's reference) over the range,
    widened to whole rollup buckets (``since``/``until`` in the answer). Per feature:
    PSI, KS, Wasserstein, Jensen-Shannon, missing/out-of-range/unseen rates, the verdict
    (ok, warn, drift, insufficient) with its reasons, and the reference and live
    histograms. A device report also says which features drift on it alone (``suspect``).
    """
    result = await run_in_threadpool(lambda: services.drift.report(
        bundle, group=group, device=device, since=since, until=until, now=services.clock()))
    return DriftResultPublic.model_validate(result.to_dict())


@router.get("/series", response_model=SeriesPublic)
async def drift_series(services: ServicesDep, _: Viewer, bundle: BundleQ, group: GroupQ = None,
                       device: DeviceQ = None, since: Since = None, until: UntilQ = None,
                       step: Annotated[int | None, Query(ge=1, le=366 * 86400)] = None,
                       ) -> SeriesPublic:
    """Drift over time: per feature and step, PSI, KS, Wasserstein, JS, values and verdict."""
    series = await run_in_threadpool(lambda: services.drift.series(
        bundle, group=group, device=device, since=since, until=until, step=step,
        now=services.clock()))
    return SeriesPublic.model_validate(series.to_dict())


@router.get("/windows", response_model=list[DriftWindowPublic])
def drift_windows(services: ServicesDep, _: Viewer, bundle: BundleQ, group: GroupQ = None,
                  since: Since = None, until: UntilQ = None,
                  limit: Annotated[int, Query(ge=1, le=5000)] = 500) -> list[DriftWindowPublic]:
    """The windows the periodic evaluator judged (oldest first), for the fleet or a group."""
    record = services.bundles.by_label(bundle)
    if group is not None:
        services.registry.group(group)
    found = services.store.list_windows(record.id, group or FLEET_SCOPE, since=since, until=until,
                                        limit=limit)
    return [DriftWindowPublic.model_validate(w) for w in found]
