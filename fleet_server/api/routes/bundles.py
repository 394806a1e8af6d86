"""``/api/v1/bundles``: upload (verified against the trust store), list, inspect, download."""

from __future__ import annotations

import os
from typing import Annotated, BinaryIO

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse

from fleet_server.api.deps import AnyPrincipal, Operator, ServicesDep, Viewer
from fleet_server.api.schemas import BundleDetail, BundleGovernance, BundlePublic
from fleet_server.errors import PayloadTooLargeError, PermissionDeniedError

router = APIRouter(prefix="/api/v1/bundles", tags=["bundles"])
Name = Annotated[str, Path(max_length=64)]
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"  # edgefleet.contract.manifest.NAME_RE
Version = Annotated[str, Path(max_length=128)]

_UPLOAD_BODY = {"requestBody": {"required": True, "content": {"application/octet-stream": {
    "schema": {"type": "string", "format": "binary"}}}}}


async def receive_bounded(request: Request, limit: int, out: BinaryIO) -> int:
    """Stream the request body into ``out``, refused with 413 as soon as it passes ``limit``
    bytes; return its length. The body is never held in memory whole.

    Raises:
        PayloadTooLargeError: declared or streamed past the limit.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"upload of {declared} bytes exceeds the limit of {limit}")
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"upload exceeds the limit of {limit} bytes")
        out.write(chunk)
    return size


@router.post("", response_model=BundlePublic, status_code=201, openapi_extra=_UPLOAD_BODY)
async def upload_bundle(request: Request, response: Response, services: ServicesDep,
                        who: Operator) -> BundlePublic:
    """Upload a bundle file (the raw ``.edgebundle`` bytes as the body).

    It is verified as a device would verify it: signatures against the server's trust
    store and policy, every member's size and sha256, no unsafe members; its
    ``reference.json`` must match the manifest. A refusal is a 4xx whose error type is
    the reason's class (``UntrustedSignerError``, ``DigestMismatchError``, …) and whose
    message names the member. The same bytes again answer 200; other bytes under an
    existing name@version answer 409, except the same manifest signed again with new approval
    statements (an approver's renewal): they are recorded (200), the stored file unchanged.
    """
    # to a file first, verified from there, moved into the blob store only if it passed
    fd, temp = services.bundles.blobs.temp_file()
    try:
        with os.fdopen(fd, "wb") as out:
            await receive_bounded(request, services.config.max_upload_bytes, out)
        record, created = await run_in_threadpool(services.bundles.upload_file, temp,
                                                  who.actor, services.clock())
    finally:
        temp.unlink(missing_ok=True)
    response.status_code = 201 if created else 200
    return BundlePublic.model_validate(record)


@router.get("", response_model=list[BundlePublic])
def list_bundles(services: ServicesDep, _: Viewer,
                 name: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
                 ) -> list[BundlePublic]:
    """Stored bundles, by name then upload time; ``name`` filters."""
    return [BundlePublic.model_validate(b) for b in services.bundles.list(name)]


@router.get("/{name}/{version}", response_model=BundleDetail)
def get_bundle(name: Name, version: Version, services: ServicesDep, _: Viewer) -> BundleDetail:
    """One bundle with its full manifest (inputs, outputs, lineage, fidelity, files)."""
    record = services.bundles.get(name, version)
    return BundleDetail.model_validate(record)


@router.get("/{name}/{version}/governance", response_model=BundleGovernance)
def bundle_governance(name: Name, version: Version, services: ServicesDep,
                      _: Viewer) -> BundleGovernance:
    """The six questions of one bundle (who approved it, what data trained it, how it was
    evaluated and against what, what biases were tested and found, when it is reviewed
    next, how its decisions are explained), each with its evidence, and where it runs."""
    record = services.bundles.get(name, version)
    return BundleGovernance.model_validate(services.governance.show(record, services.clock()))


@router.get("/{name}/{version}/download", response_class=FileResponse,
            responses={200: {"content": {"application/octet-stream": {
                "schema": {"type": "string", "format": "binary"}}},
                "description": "The bundle file"}})
def download_bundle(name: Name, version: Version, services: ServicesDep,
                    who: AnyPrincipal) -> FileResponse:
    """The bundle file, for operators (viewer or more) and for a device (with its secret)
    only when the bundle is assigned to it: its desired bundle, its shadow, or its
    rollback slot (the desired bundle before the current one); any other is 403.

    ``X-Edgefleet-Sha256`` carries the file's sha256; the device verifies the bundle
    itself before installing it anyway.
    """
    if who.kind == "operator" and not who.has_role("viewer"):
        raise PermissionDeniedError("needs role 'viewer'")
    if who.kind == "device" and not services.desired.may_download(who.name, name, version):
        raise PermissionDeniedError(f"bundle {name}@{version} is not assigned to device "
                                    f"{who.name!r} (desired, shadow or rollback)")
    record = services.bundles.get(name, version)
    path = services.bundles.file(record)
    return FileResponse(path, media_type="application/octet-stream",
                        filename=f"{record.name}-{record.version}.edgebundle",
                        headers={"X-Edgefleet-Sha256": record.sha256,
                                 "ETag": f'"{record.sha256}"'})
