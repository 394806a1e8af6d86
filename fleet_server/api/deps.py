"""Dependencies every route takes, and query parameters several take, as ``Annotated``
aliases.

``Viewer``, ``Operator`` and ``Approver`` are the authenticated principal, refused with 403
unless it is an operator token of at least that role; ``AnyPrincipal`` is any valid
token, a device's too (bundle downloads, a device's own desired state). Every credential
error is a :class:`~fleet_server.errors.AuthenticationError` (401) or
:class:`~fleet_server.errors.PermissionDeniedError` (403), mapped by the one handler.

The bearer scheme is declared (``HTTPBearer``) so the OpenAPI document shows it; the
check itself is :meth:`fleet_server.registry.auth.Auth.authenticate`.
"""

from __future__ import annotations

import typing
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Annotated, Any

from fastapi import Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from fleet_server.api.schemas import BUNDLE_PATTERN
from fleet_server.errors import InvalidRequestError
from fleet_server.registry.auth import Auth, Principal
from fleet_server.services import Services

__all__ = ["AnyPrincipal", "Approver", "BundleQ", "DeviceQ", "GroupQ", "Operator",
           "ServicesDep", "UntilQ", "Viewer", "strict_query"]

_bearer = HTTPBearer(auto_error=False, scheme_name="bearer",
                     description="An operator token (efo_…) or a device secret (efd_…)")


def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


def authenticated(request: Request, services: ServicesDep,
                  _: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
                  ) -> Principal:
    return services.auth.authenticate(request.headers.get("authorization"), services.clock())


def _role(role: str) -> Callable[[Principal], Principal]:
    def check(principal: Annotated[Principal, Depends(authenticated)]) -> Principal:
        Auth.require(principal, role)
        return principal

    check.__name__ = f"require_{role}"
    return check


AnyPrincipal = Annotated[Principal, Depends(authenticated)]
Viewer = Annotated[Principal, Depends(_role("viewer"))]
Operator = Annotated[Principal, Depends(_role("operator"))]
Approver = Annotated[Principal, Depends(_role("approver"))]

# the scope and range of a report (drift, performance) or an export (capture)
BundleQ = Annotated[str, Query(pattern=BUNDLE_PATTERN, description="name@version")]
GroupQ = Annotated[str | None, Query(max_length=64)]
DeviceQ = Annotated[str | None, Query(max_length=64)]
UntilQ = Annotated[float | None, Query(description="unix seconds; default: now")]


def _is_sequence(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (list, tuple, set, frozenset):
        return True
    return any(_is_sequence(a) for a in typing.get_args(annotation))


def _query_params(dependant: Any) -> Iterator[tuple[str, bool]]:
    for param in dependant.query_params:
        yield param.alias, _is_sequence(param.field_info.annotation)
    for sub in dependant.dependencies:
        yield from _query_params(sub)


def strict_query(request: Request) -> None:
    """Refuse query parameters the endpoint does not take, and repeated single ones.

    FastAPI ignores both by default, so ``?lable=site=a`` would silently list every
    device; an operator API should say so instead.

    Raises:
        InvalidRequestError: an unknown or a repeated single-valued parameter.
    """
    dependant = getattr(request.scope.get("route"), "dependant", None)
    if dependant is None:
        return
    declared = dict(_query_params(dependant))
    for key, n in Counter(k for k, _ in request.query_params.multi_items()).items():
        if key not in declared:
            known = ", ".join(sorted(declared)) or "none"
            raise InvalidRequestError(f"unknown query parameter {key[:64]!r} (this endpoint "
                                      f"takes: {known})", field=key[:64])
        if n > 1 and not declared[key]:
            raise InvalidRequestError(f"query parameter {key!r} given {n} times; it takes one "
                                      "value", field=key)
