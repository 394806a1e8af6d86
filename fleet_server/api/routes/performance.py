"""``/api/v1/performance``: realized and estimated performance of a bundle over time."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool

from fleet_server.api.deps import BundleQ, DeviceQ, GroupQ, ServicesDep, UntilQ, Viewer
from fleet_server.api.schemas import PerformancePublic

router = APIRouter(prefix="/api/v1/performance", tags=["performance"])

Since = Annotated[str | None, Query(max_length=40, description="7d, 12h (ago) or unix "
                                                               "seconds; default: 7 days "
                                                               "before until")]


@router.get("", response_model=PerformancePublic)
async def performance(services: ServicesDep, _: Viewer, bundle: BundleQ, group: GroupQ = None,
                      device: DeviceQ = None, since: Since = None, until: UntilQ = None
                      ) -> PerformancePublic:
    """Realized and estimated performance of one bundle version over the fleet, a group or
    a device, as a time series (hourly up to two days, else daily) and in total.

    Realized metrics come from outcomes joined on the devices (each with its 95 % interval
    and n, the labelled rows); estimated ones from every served row's calibrated
    confidence (no labels needed). ``expected`` holds the bundle's metrics measured at
    packaging; ``verdicts`` says for each side whether it dropped below them (beyond the
    server's tolerance, with the interval excluding the expectation). Classifiers also get
    the realized confusion matrix and reliability diagram over the range.
    """
    result = await run_in_threadpool(lambda: services.performance.report(
        bundle, group=group, device=device, since=since, until=until, now=services.clock()))
    return PerformancePublic.model_validate(result.to_dict())
