"""The API's request and response schemas, in families (``…Create`` in, ``…Public`` out).

A response schema reads the typed record a service returns (``from_attributes``, as the
FastAPI full-stack template's ``UserPublic.model_validate(user)``): a route is
``DevicePublic.model_validate(device)``, and no field is copied by hand between a record
and its schema. A detail schema that adds what another service knows (a device's desired
state, an alert's deliveries) reads the record through :class:`Joined`. The drift and
performance results are read from their ``to_dict()``, their wire form (non-finite
statistics as null, the report's schema version), and the rollouts' views are the engine's
dicts. The fields are still declared here: they are the API's contract (the OpenAPI
document), which a record's internal shape must not change by accident. Request models
refuse unknown fields. Nothing here holds logic.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

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
    requires: list[str] = []
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


# -- telemetry ------------------------------------------------------------------------------


class SummaryPublic(_Out):
    device: str
    seq: int
    bundle: str
    reference_hash: str
    window_start: float
    window_end: float
    rows: int
    received: float
    folded: bool
    errors: dict[str, int]
    latency_counts: list[int]
    shadow: dict[str, Any] | None
    dropped: int


class DeadLetterPublic(_Out):
    id: int
    received: float
    topic: str
    device: str
    error: str
    reason: str
    size: int
    payload_prefix: str = Field(description="The first bytes of the payload, hex")


# -- drift ----------------------------------------------------------------------------------


class FeatureDriftPublic(_Out):
    name: str
    role: str
    kind: str
    n_base: int
    n_live: int
    verdict: str
    stats: dict[str, float | None]
    reasons: list[str]
    labels: list[str] = Field(description="One per histogram slot")
    base_hist: list[float] = Field(description="Reference proportions per slot")
    live_hist: list[float] = Field(description="Live proportions per slot")
    min_rows: int


class DriftReportPublic(_Out):
    model_config = ConfigDict(populate_by_name=True)

    schema_: int = Field(alias="schema")
    reference_hash: str
    rows_base: int
    rows_live: int
    share_drifted: float
    verdict: str
    important: list[str]
    reasons: list[str]
    rule: str = Field(description="How inputs were weighed: importance (the card's "
                      "permutation importances) or count (none recorded)")
    importance_share: float | None = Field(
        description="Share of the model's importance the drifting inputs carry")
    rules: list[str] = Field(description="The group rules that fired: importance, count, "
                             "important, predictions, unseen")
    features: list[FeatureDriftPublic]


class DriftResultPublic(_Out):
    bundle: str
    scope: str
    since: int
    until: int
    devices: int
    summaries: int
    rollups: int
    suspect: list[str]
    compared_with: str
    settings: dict[str, float | int | None] = Field(
        description="Every drift setting applied (thresholds, group rule, persistence, "
                    "lateness)")
    overrides: list[str] = Field(description="The settings the group set for itself")
    report: DriftReportPublic


class SeriesPublic(_Out):
    bundle: str
    scope: str
    since: int
    until: int
    step: int
    starts: list[int]
    rows: list[int]
    verdicts: list[str]
    features: dict[str, dict[str, list[Any]]]


class DriftWindowPublic(_Out):
    bundle: str
    scope: str
    window_start: int
    window_end: int
    verdict: str
    share_drifted: float
    rows: int
    devices: int
    features: dict[str, Any]
    evaluated: float


# -- performance ----------------------------------------------------------------------------


class MetricPublic(_Out):
    """A metric with its 95 % interval, the rows behind it and how the interval was found."""

    value: float | None
    low: float | None
    high: float | None
    n: int
    method: str


class ExpectedPublic(_Out):
    """A metric as the bundle's card measured it at packaging."""

    name: str
    value: float
    low: float | None
    high: float | None
    rows: int
    data: str


class PerformancePointPublic(_Out):
    start: int
    end: int
    devices: int
    entries: int
    labelled: int = Field(description="Labelled rows (the realized metrics' n)")
    served: int = Field(description="Served rows (the estimated metrics' n)")
    realized: dict[str, MetricPublic]
    estimated: dict[str, MetricPublic]


class DropPublic(_Out):
    verdict: Literal["ok", "drop", "insufficient", "unknown"]
    metric: str
    value: float | None
    low: float | None
    high: float | None
    n: int
    expected: float | None
    limit: float | None
    reason: str


class ConfusionPublic(_Out):
    classes: list[str]
    counts: list[list[int]] = Field(description="counts[true][predicted]")


class ReliabilityBinPublic(_Out):
    low: float
    high: float
    n: int
    confidence: float = Field(description="Mean predicted probability in the bin")
    observed: float = Field(description="Observed share of positives (or right answers)")


class PerformancePublic(_Out):
    bundle: str
    scope: str
    since: int
    until: int
    step: int
    task: str
    metric: str = Field(description="The metric watched and gated on: accuracy, or mae")
    expected: dict[str, ExpectedPublic]
    total: PerformancePointPublic
    points: list[PerformancePointPublic]
    confusion: ConfusionPublic | None
    reliability: list[ReliabilityBinPublic] | None
    verdicts: dict[str, DropPublic]
    truncated: bool
    tolerances: dict[str, float | int] = Field(
        default_factory=dict, description="The alert tolerances applied (the group's own "
                                          "over the server's)")
    overrides: list[str] = Field(default_factory=list,
                                 description="The tolerances the group set for itself")


# -- alerts ---------------------------------------------------------------------------------


class AlertPublic(_Out):
    id: int
    kind: str
    bundle: str
    group: str
    device: str
    state: str
    opened: float
    resolved: float | None
    message: str
    details: dict[str, Any]
    webhook: str
    attempts: int


class AttemptPublic(_Out):
    attempt: int
    time: float
    status: int | None
    error: str


class AlertDetail(AlertPublic):
    deliveries: list[AttemptPublic]


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
    rollout: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")] | None = None
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
