"""The API's schemas of the registry: devices, their desired state and reports, groups
(with their drift and performance settings and data capture), bundles and their governance.

Part of :mod:`fleet_server.api.schemas` (which re-exports every name); nothing here holds
logic.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from fleet_server.api.schemas_base import (
    BundleLabel,
    BundleRefPublic,
    DeviceId,
    GroupName,
    Labels,
    _In,
    _Out,
)

# -- devices --------------------------------------------------------------------------------


class DevicePublic(_Out):
    id: str
    labels: dict[str, str]
    set_labels: dict[str, str]
    reported_labels: dict[str, str]
    created: float
    has_secret: bool
    online: bool
    status_time: float | None
    last_seen: float | None
    agent_version: str
    bundle: BundleRefPublic | None
    shadow: BundleRefPublic | None
    health: dict[str, Any] | None
    heartbeat_time: float | None
    last_summary: float | None
    summaries: int
    dropped: int


class DesiredPublic(_Out):
    device: str
    revision: int
    bundle: BundleRefPublic | None
    shadow: BundleRefPublic | None
    allow_downgrade: bool
    updated: float
    updated_by: str


class ReportPublic(_Out):
    device: str
    seq: int
    revision: int
    outcome: str
    bundle: BundleRefPublic
    reason: str
    time: float
    received: float


class DeviceDetail(DevicePublic):
    desired: DesiredPublic | None
    reports: list[ReportPublic]


class DeviceCreate(_In):
    id: DeviceId = Field(description="The device id, also its MQTT username")
    labels: Labels = Field(default_factory=dict)
    rotate: bool = Field(False, description="Issue a new secret for an existing device")


class DeviceCreated(_Out):
    device: DevicePublic
    secret: str = Field(description="The device secret (MQTT password and HTTP token); "
                                    "shown only in this response")


class DeviceRemoved(_Out):
    id: str
    retained_cleared: bool = Field(description="Whether its retained desired state was "
                                   "cleared on the broker now (else on the server's next "
                                   "connection)")
    broker_account: str = Field(description="What to do for its broker account to go")


class LabelsUpdate(_In):
    labels: Labels


class DesiredUpdate(_In):
    bundle: BundleLabel | None = Field(None, description="name@version, or null")
    shadow: BundleLabel | None = Field(None, description="name@version, or null")
    allow_downgrade: bool = False


# -- groups ---------------------------------------------------------------------------------


DriftSettings = Annotated[
    dict[Annotated[str, Field(max_length=64)], float], Field(
        max_length=32, description="The group's own drift settings over the server's: "
        "statistic thresholds (psi_warn, psi_drift, ks_drift, wasserstein_drift, js_drift, "
        "unseen_drift, rate_drift, min_rows, alpha), the group rule (importance_share, "
        "group_share, "
        "group_min), persistence, persistence_of, lateness_s")]
PerformanceSettings = Annotated[
    dict[Annotated[str, Field(max_length=64)], float], Field(
        max_length=8, description="The group's own performance alert tolerances over the "
        "server's: rate (absolute accuracy-like drop), error (relative MAE-like rise), "
        "min_labelled, min_served")]
ImportantFeatures = Annotated[list[Annotated[str, Field(min_length=1, max_length=128)]],
                              Field(max_length=256)]


class CaptureIn(_In):
    """A group's data capture: values over its current policy, ``enabled: false`` to turn
    it off, ``reset: true`` to remove it (the devices' own configs stand again)."""

    enabled: bool | None = Field(None, description="true: on; false: off at once")
    rate: float | None = Field(None, description="Share of served rows sampled, [0, 1]")
    max_rows: int | None = Field(None, description="Rows a window at most, per device")
    features: list[Annotated[str, Field(min_length=1, max_length=128)]] | None = Field(
        None, max_length=1024, description="The allowlist: inputs of the group's bundle")
    reset: bool = False


class CapturePublic(_Out):
    enabled: bool
    rate: float
    max_rows: int
    features: list[str] | None = Field(
        description="The group's allowlist (null: the devices' own allowlists)")


class GroupCreate(_In):
    name: GroupName
    selector: Labels = Field(default_factory=dict, description="Labels a member must all have")
    requires_approval: bool = False
    important_features: ImportantFeatures = Field(default_factory=list)
    requires: list[Annotated[str, Field(min_length=1, max_length=32)]] = Field(
        default_factory=list, max_length=8,
        description="What a bundle needs before a rollout to this group: card, approval, "
                    "fairness, champion")
    drift: DriftSettings = Field(default_factory=dict)
    performance: PerformanceSettings = Field(default_factory=dict)
    capture: CaptureIn | None = Field(None, description="Data capture on the group's devices")


class GroupUpdate(_In):
    important_features: ImportantFeatures | None = Field(
        None, description="Replaces the list when given")
    drift: DriftSettings = Field(default_factory=dict, description="Settings to set")
    reset_drift: list[Annotated[str, Field(max_length=64)]] = Field(
        default_factory=list, max_length=32,
        description="Settings back to the server's (\"all\": every one)")
    performance: PerformanceSettings = Field(default_factory=dict,
                                             description="Tolerances to set")
    reset_performance: list[Annotated[str, Field(max_length=64)]] = Field(
        default_factory=list, max_length=8,
        description="Tolerances back to the server's (\"all\": every one)")
    capture: CaptureIn | None = Field(None, description="Data capture on the group's devices")


class GroupPublic(_Out):
    name: str
    selector: dict[str, str]
    requires_approval: bool
    important_features: list[str]
    created: float
    created_by: str
    drift: dict[str, float | int] = Field(description="The group's own drift settings")
    performance: dict[str, float | int] = Field(
        default_factory=dict, description="The group's own performance tolerances")
    members: int
    # pydantic copies a default per instance; ruff cannot see that _Out is a BaseModel across
    # modules. A literal [] (not default_factory) keeps `default: []` in the OpenAPI document.
    requires: list[str] = []  # noqa: RUF012
    capture: CapturePublic | None = Field(
        None, description="The group's data capture (null: none set; the devices' own)")


# -- bundles --------------------------------------------------------------------------------


class Signer(_Out):
    keyid: str
    role: str
    name: str


class BundlePublic(_Out):
    name: str
    version: str
    sha256: str
    size: int
    reference_hash: str
    uploaded: float
    uploaded_by: str
    signers: list[Signer]
    url: str


class BundleDetail(BundlePublic):
    manifest: dict[str, Any]


class BundleGovernance(_Out):
    """The six questions of one bundle, each an ``answer`` with its evidence, and what the
    fleet knows of it (``fleet``: devices running it, per group whether its requirements
    are met, rollouts, drift, open alerts)."""

    bundle: str
    sha256: str
    uploaded: float
    uploaded_by: str
    task: str | None
    has_card: bool
    statement: dict[str, Any] | None
    approved: dict[str, Any] = Field(description="Who approved it: approvals, signers")
    data: dict[str, Any] = Field(description="What data trained it: lineage, columns")
    evaluation: dict[str, Any] = Field(description="How it was evaluated, against what")
    biases: dict[str, Any] = Field(description="What biases were tested, what was found")
    review: dict[str, Any] = Field(description="When it is reviewed next, and from where")
    explanations: dict[str, Any] = Field(description="How its decisions are explained")
    fleet: dict[str, Any]
