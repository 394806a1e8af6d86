"""The API schemas' shared pieces: the server's id patterns, the strict request base
(``_In``), the record-reading response base (``_Out``), :class:`Joined`, the error body,
a bundle reference and the health answer.

Part of :mod:`fleet_server.api.schemas` (which re-exports every name); nothing here holds
logic.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

# The server's own rules, stated in the document (pydantic checks them with Rust regexes,
# where "$" is the end of the text; the services check them again).
DEVICE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
LABEL_KEY_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,62}$"
GROUP_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
_ID = r"(0|[1-9][0-9]*|[0-9]*[a-zA-Z-][0-9a-zA-Z-]*)"
SEMVER_PATTERN = (r"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)"
                  rf"(-{_ID}(\.{_ID})*)?")
BUNDLE_PATTERN = rf"^[a-z0-9][a-z0-9._-]{{0,63}}@{SEMVER_PATTERN}$"

DeviceId = Annotated[str, Field(pattern=DEVICE_PATTERN, description="A device id")]
GroupName = Annotated[str, Field(pattern=GROUP_PATTERN)]
BundleLabel = Annotated[str, Field(pattern=BUNDLE_PATTERN, description="name@version")]
Labels = Annotated[dict[Annotated[str, Field(pattern=LABEL_KEY_PATTERN)],
                        Annotated[str, Field(max_length=128)]], Field(max_length=32)]


class _In(BaseModel):
    # strict: JSON 0 is not false, "1" is not 1; unknown fields are refused
    model_config = ConfigDict(extra="forbid", strict=True)


class _Out(BaseModel):
    # reads a record's attributes (a frozen dataclass from the services), or a dict
    model_config = ConfigDict(from_attributes=True)


class Joined:
    """A record read with more attributes beside it, for a detail schema that extends the
    record's own (``DeviceDetail``: a device, its desired state and its reports).

    ``Joined(device, desired=d, reports=r)`` answers ``desired`` and ``reports`` itself and
    every other attribute from ``device``.
    """

    __slots__ = ("_extra", "_record")

    def __init__(self, record: object, **extra: object) -> None:
        self._record, self._extra = record, extra

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # copy, pickle and friends: not a record's
            raise AttributeError(name)
        extra = object.__getattribute__(self, "_extra")
        if name in extra:
            return extra[name]
        return getattr(object.__getattribute__(self, "_record"), name)


class ErrorDetail(_Out):
    type: str = Field(description="The error's class, e.g. NotFoundError, SignatureError")
    message: str = Field(description="What went wrong, naming the thing at fault")


class ErrorBody(_Out):
    error: ErrorDetail


class BundleRefPublic(_Out):
    name: str
    version: str
    sha256: str = ""
    url: str = ""
    size: int = 0


# -- system ---------------------------------------------------------------------------------


class HealthPublic(_Out):
    status: str
    version: str
    db_version: int
    mqtt: str = Field(description="connected, disconnected or disabled")

