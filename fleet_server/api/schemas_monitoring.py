"""The API's schemas of what the fleet learns from telemetry: stored summaries and dead
letters, drift reports and series, performance, alerts and their deliveries.

Part of :mod:`fleet_server.api.schemas` (which re-exports every name); nothing here holds
logic.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field

from fleet_server.api.schemas_base import _Out

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
