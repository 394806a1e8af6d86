"""``/api/v1/devices``: the registry, device credentials, labels, desired state, reports."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from edgefleet.contract.errors import SchemaError
from edgefleet.parsing import parse_pairs
from fleet_server.api.deps import AnyPrincipal, Operator, ServicesDep, Viewer
from fleet_server.api.schemas import (
    DEVICE_PATTERN,
    LABEL_KEY_PATTERN,
    DesiredPublic,
    DesiredUpdate,
    DeviceCreate,
    DeviceCreated,
    DeviceDetail,
    DevicePublic,
    DeviceRemoved,
    Joined,
    LabelsUpdate,
    ReportPublic,
)
from fleet_server.errors import InvalidRequestError, NotFoundError, PermissionDeniedError

router = APIRouter(prefix="/api/v1/devices", tags=["devices"])
LABEL_QUERY_PATTERN = LABEL_KEY_PATTERN[:-1] + r"=.{0,128}$"
DeviceId = Annotated[str, Path(pattern=DEVICE_PATTERN, description="The device id")]


def parse_selector(items: list[str], field: str = "label") -> dict[str, str]:
    """``["site=a", "line=3"]`` → ``{"site": "a", "line": "3"}``.

    Raises:
        InvalidRequestError: an item without ``=``, or a key given twice.
    """
    try:
        return parse_pairs(items, field)
    except SchemaError as exc:
        raise InvalidRequestError(str(exc), field=field) from None


@router.get("", response_model=list[DevicePublic])
def list_devices(
    services: ServicesDep, _: Viewer,
    label: Annotated[list[Annotated[str, Query(pattern=LABEL_QUERY_PATTERN)]],
                     Query(description="key=value; repeat to require several",
                           max_length=32)] = [],  # noqa: B006
    online: bool | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
) -> list[DevicePublic]:
    """Devices, by id; filter by labels (all must match) and by online state."""
    found = services.registry.list(parse_selector(label), online=online, limit=limit,
                                   offset=offset)
    return [DevicePublic.model_validate(d) for d in found]


@router.post("", response_model=DeviceCreated, status_code=201)
def add_device(body: DeviceCreate, services: ServicesDep, who: Operator) -> DeviceCreated:
    """Register a device and issue its secret (its MQTT password and HTTP token).

    The secret is in this response only; the server keeps its hashes. With
    ``rotate: true`` an existing device gets a new secret and the old one stops working.
    """
    device, issued = services.registry.add_device(body.id, body.labels, who.actor,
                                                  services.clock(), rotate=body.rotate)
    return DeviceCreated(device=DevicePublic.model_validate(device),
                         secret=issued.secret)


@router.get("/{device}", response_model=DeviceDetail)
def get_device(device: DeviceId, services: ServicesDep, _: Viewer) -> DeviceDetail:
    """One device: labels, online state, last heartbeat (health), the bundle it reports,
    its desired state and its latest install reports."""
    found = services.registry.get(device)
    desired = services.desired.record(device)
    reports = services.store.list_reports(device, limit=20)
    return DeviceDetail.model_validate(Joined(found, desired=desired, reports=reports))


@router.delete("/{device}", response_model=DeviceRemoved)
def remove_device(device: DeviceId, services: ServicesDep, who: Operator) -> DeviceRemoved:
    """Decommission a device: its secret stops working at once (no more downloads, no
    API), its labels and desired state go, and its retained desired state is cleared on
    the broker. Its summaries and reports stay. Its broker account goes when the broker
    configuration is written again (``fleet broker-config``, then SIGHUP to Mosquitto).
    """
    services.registry.remove_device(device, who.actor, services.clock())
    services.desired.clear_removed()
    cleared = device not in services.store.retained_to_clear()
    return DeviceRemoved(id=device, retained_cleared=cleared,
                         broker_account="run `fleet broker-config` again and send "
                                        "mosquitto SIGHUP")


@router.put("/{device}/labels", response_model=DevicePublic)
def set_labels(device: DeviceId, body: LabelsUpdate, services: ServicesDep,
               who: Operator) -> DevicePublic:
    """Replace the operator-set labels of a device (they override what it reports)."""
    found = services.registry.set_labels(device, body.labels, who.actor, services.clock())
    return DevicePublic.model_validate(found)


@router.get("/{device}/desired", response_model=DesiredPublic)
def get_desired(device: DeviceId, services: ServicesDep, who: AnyPrincipal) -> DesiredPublic:
    """The desired state of a device; a device may read its own (with its secret)."""
    if who.kind == "device" and who.name != device:
        raise PermissionDeniedError(f"device {who.name!r} may read only its own desired "
                                    "state")
    if who.kind == "operator" and not who.has_role("viewer"):
        raise PermissionDeniedError("needs role 'viewer'")
    record = services.desired.record(device)
    if record is None:
        raise NotFoundError("desired state", device, f"device {device!r} has no desired "
                                                     "state")
    return DesiredPublic.model_validate(record)


@router.put("/{device}/desired", response_model=DesiredPublic)
def set_desired(device: DeviceId, body: DesiredUpdate, services: ServicesDep,
                who: Operator) -> DesiredPublic:
    """Set what a device should run (``bundle``, optional ``shadow``, as name@version).

    The revision increases when anything changes; the state is published retained to
    the device's ``desired`` topic. A bundle (or shadow) new to the device that is past its
    review date, or lacks what a group of the device requires, is refused with 409
    (``ReviewOverdueError``, ``RequirementsMissingError``) naming why.
    """
    services.governance.check_desired(device, body.bundle, body.shadow, services.clock())
    services.desired.assign(device, body.bundle, body.shadow, body.allow_downgrade,
                            actor=who.actor)
    record = services.desired.record(device)
    assert record is not None
    return DesiredPublic.model_validate(record)


@router.get("/{device}/reports", response_model=list[ReportPublic])
def list_reports(device: DeviceId, services: ServicesDep, _: Viewer,
                 limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[ReportPublic]:
    """Install and shadow reports of a device, newest first."""
    services.registry.get(device)
    return [ReportPublic.model_validate(r)
            for r in services.store.list_reports(device, limit=limit)]
