"""The API's schemas of retraining runs: creating, claiming and updating a run, and a run
with its lineage.

Part of :mod:`fleet_server.api.schemas` (which re-exports every name); nothing here holds
logic.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field

from fleet_server.api.schemas_base import BUNDLE_PATTERN, GroupName, _In, _Out
from fleet_server.api.schemas_rollouts import ROLLOUT_ID_PATTERN

# -- retraining runs ------------------------------------------------------------------------

RECIPE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
BUNDLE_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
RetrainStatus = Literal["requested", "running", "promoted", "rejected", "failed"]


class RetrainCreate(_In):
    recipe: Annotated[str, Field(pattern=RECIPE_PATTERN)]
    recipe_hash: Annotated[str, Field(max_length=128)] = ""
    revision: Annotated[str, Field(max_length=128)] = ""
    trigger: Annotated[str, Field(pattern=r"^(manual|schedule|alert:[1-9][0-9]{0,17})$",
                                  description="manual, schedule or alert:<id>")] = "manual"
    group: GroupName
    bundle: Annotated[str, Field(pattern=BUNDLE_NAME_PATTERN,
                                 description="The bundle name the recipe builds")]
    requested: bool = Field(False, description="Ask a runner to start it (fleet retrain "
                                               "start) rather than start it now")


class RetrainClaim(_In):
    recipe: Annotated[str, Field(pattern=RECIPE_PATTERN)]


class RetrainUpdate(_In):
    status: Literal["running", "promoted", "rejected", "failed"] | None = None
    champion: Annotated[str, Field(pattern=BUNDLE_PATTERN)] | None = None
    challenger: Annotated[str, Field(pattern=BUNDLE_PATTERN)] | None = None
    rollout: Annotated[str, Field(pattern=ROLLOUT_ID_PATTERN)] | None = None
    data: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    reason: Annotated[str, Field(max_length=4096)] | None = None


class RetrainPublic(_Out):
    id: int
    recipe: str
    recipe_hash: str
    revision: str
    trigger: str
    alert_id: int | None
    status: RetrainStatus
    group: str
    bundle: str
    champion: str | None
    challenger: str | None
    rollout: str | None
    created: float
    started: float | None
    finished: float | None
    actor: str
    data: dict[str, Any]
    metrics: dict[str, Any]
    reason: str


class LineageLink(_Out):
    model_config = ConfigDict(extra="allow")  # each step adds what it knows
    step: Literal["trigger", "alert", "run", "champion", "challenger", "rollout"]
    id: int | str
    state: str


class RetrainDetail(RetrainPublic):
    lineage: list[LineageLink]
