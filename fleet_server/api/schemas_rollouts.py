"""The API's schemas of rollouts: the plan a client sends (stages, gates), the views the
engine answers with (stages, devices, gate results, previews) and the audit log.

Part of :mod:`fleet_server.api.schemas` (which re-exports every name); nothing here holds
logic.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from fleet_server.api.schemas_base import BundleLabel, GroupName, _In, _Out

# -- rollouts -------------------------------------------------------------------------------

ROLLOUT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
RolloutId = Annotated[str, Field(pattern=ROLLOUT_ID_PATTERN)]
Seconds = Annotated[float, Field(ge=0, le=10 * 365 * 86400)]
Share = Annotated[float, Field(ge=0, le=1)]
Count = Annotated[int, Field(ge=0, le=1_000_000_000)]


class StageIn(_In):
    fraction: Annotated[float, Field(gt=0, le=1, description="Share of the group, (0, 1]")]
    min_devices: Count = 1
    soak_s: Seconds = 3600.0


class GatesIn(_In):
    """Gate thresholds; a field left out keeps its default, null disables a gate."""

    min_canary_predictions: Count | None = None
    min_control_predictions: Count | None = None
    min_healthy_predictions: Count | None = None
    min_healthy_share: Share | None = None
    max_install_failures: Count | None = None
    max_install_failure_rate: Share | None = None
    max_error_rate: Share | None = None
    max_error_rate_delta: Share | None = None
    max_latency_p95_ratio: Annotated[float, Field(ge=0, le=1e9)] | None = None
    max_prediction_psi: Annotated[float, Field(ge=0, le=1e9)] | None = None
    max_prediction_js: Share | None = None
    max_input_drift_share: Share | None = None
    block_on_input_drift: bool | None = None
    min_shadow_rows: Count | None = None
    min_shadow_agreement: Share | None = None
    max_accuracy_drop: Share | None = None
    max_mae_rise: Annotated[float, Field(ge=0, le=1e9)] | None = None
    min_labels: Count | None = None
    max_wait_s: Seconds | None = None
    on_insufficient_data: Literal["abort", "pause"] | None = None


class RolloutCreate(_In):
    bundle: BundleLabel
    group: GroupName
    stages: list[StageIn] | None = Field(None, min_length=1, max_length=20,
                                         description="Default: 1 %, 10 %, 50 %, 100 %")
    gates: GatesIn | None = None
    shadow_first: bool = False
    shadow_soak_s: Seconds = 3600.0
    install_timeout_s: Seconds = 1800.0
    requires_approval: bool = Field(False, description="Also forced by the group's flag")
    id: RolloutId | None = Field(None, description="Default: generated")
    start: bool = Field(False, description="Start at once unless it needs approval")


class RolloutActionIn(_In):
    reason: str = Field("", max_length=4096)


class AuditEntryPublic(_Out):
    time: float
    actor: str
    action: str
    from_status: str | None
    to_status: str
    stage: int
    numbers: dict[str, Any]
    reason: str


class AuditLinkPublic(_Out):
    """One audit log entry as stored, with its place in the hash chain."""

    id: int
    time: float
    actor: str
    action: str
    target: str
    details: dict[str, Any]
    details_text: str
    prev: str | None
    hash: str | None


class AuditFindingPublic(_Out):
    kind: Literal["edited", "inserted", "deleted", "unchained"]
    entry: int
    message: str


class AuditChainPublic(_Out):
    intact: bool
    entries: int
    legacy: int
    head: str | None
    head_id: int | None
    findings: list[AuditFindingPublic]


class GateResultPublic(_Out):
    name: str
    outcome: str = Field(description="pass, fail, wait or skip")
    value: float | None
    threshold: float | None
    op: str
    reason: str


class RolloutDevicePublic(_Out):
    device: str
    role: str = Field(description="control, shadow, canary, complete, rollback, kept, left")
    stage: int | None
    phase: str
    running: str | None
    online: bool


class RolloutStagePublic(_Out):
    index: int
    fraction: float
    min_devices: int
    soak_s: float
    size: int
    state: str = Field(description="done, current or pending")


class RolloutSummary(_Out):
    id: str
    bundle: str
    group: str
    status: str
    stage: int
    created_at: float
    finished_at: float | None


class RolloutPublic(RolloutSummary):
    plan: dict[str, Any]
    audit: list[AuditEntryPublic]
    gate_results: list[GateResultPublic]
    devices: list[RolloutDevicePublic]
    stages: list[RolloutStagePublic]


class PreviewStagePublic(_Out):
    index: int
    fraction: float
    min_devices: int
    soak_s: float
    size: int
    devices: list[str]


class RolloutPreview(_Out):
    id: str
    bundle: str
    group: str
    devices: int
    shadow_first: bool
    requires_approval: bool
    stages: list[PreviewStagePublic]
