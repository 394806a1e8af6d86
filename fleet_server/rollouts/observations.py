"""The rollout core's observations: what the shell tells the pure state machine on each
tick (the time, each group member's running bundle and install report, the canary-vs-control
gate metrics) and the window those metrics are computed over.

Frozen dataclasses with their own validity checks (:class:`ObservationError`); the gate
metrics also have a strict ``to_dict``/``from_dict`` (they go into the audit log). This
module holds no rules and computes no metric: the rules are
:mod:`fleet_server.rollouts.machine`'s and :mod:`fleet_server.rollouts.gates`'s, the
numbers :mod:`fleet_server.rollouts.metrics`'. :mod:`fleet_server.rollouts.values`
re-exports every name.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edgefleet.contract.errors import SchemaError
from edgefleet.contract.messages import BundleRef, Report
from edgefleet.contract.wire import Fields
from fleet_server.rollouts.errors import ObservationError

__all__ = ["PERFORMANCE_METRICS", "PERFORMANCE_SOURCES", "DeviceObs", "GateMetrics",
           "GateWindow", "InstallObs", "Observation"]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


@dataclass(frozen=True)
class InstallObs:
    """The last install report of a device for this rollout's bundle.

    ``time`` is when the *server* received it (device clocks drift); it is compared with
    the assignment time. ``outcome`` is a :class:`~edgefleet.contract.messages.Report` outcome.
    """

    outcome: str
    time: float
    reason: str = ""

    def __post_init__(self) -> None:
        if self.outcome not in Report.OUTCOMES or not _finite(self.time):
            raise ObservationError(f"install report: outcome {self.outcome!r} at "
                                   f"{self.time!r} is not a report outcome and a time")


@dataclass(frozen=True)
class DeviceObs:
    """What the shell knows of one group member now."""

    running: BundleRef | None = None  # the bundle it last reported running
    shadow: BundleRef | None = None  # the shadow bundle it last reported
    install: InstallObs | None = None
    healthy_predictions: int = 0  # on this rollout's bundle since install
    online: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.healthy_predictions, int) or self.healthy_predictions < 0:
            raise ObservationError(f"healthy_predictions {self.healthy_predictions!r} "
                                   "is not a count")


_COUNTS = ("canary_predictions", "canary_errors", "control_predictions", "control_errors",
           "shadow_rows", "shadow_agreed", "shadow_errors", "canary_labelled",
           "control_labelled", "input_rows", "input_rows_needed", "paired_both",
           "paired_live_only", "paired_shadow_only", "paired_neither")
_NUMBERS = ("canary_p95_ms", "control_p95_ms", "prediction_psi", "prediction_js",
            "input_drift_share", "canary_performance", "canary_performance_bound",
            "control_performance")
PERFORMANCE_METRICS = ("accuracy", "mae")
PERFORMANCE_SOURCES = ("realized", "estimated")


@dataclass(frozen=True, kw_only=True)
class GateMetrics:
    """Canary-vs-control numbers the shell computed over one :class:`GateWindow`.

    Canary numbers come from the summaries of ``window.canaries`` whose bundle is
    ``window.bundle``, control numbers from those of ``window.controls`` on any other
    bundle, both over summaries whose window ends after ``window.since``. In the shadow
    phase only the ``shadow_*`` counts matter: the canaries' ``ShadowStats`` for
    ``window.bundle`` summed. ``None``: not computed (a gate that needs it waits).
    """

    window_start: float  # must be the GateWindow's ``since``, else ignored
    canary_predictions: int = 0  # rows served (summary ``profile.rows``)
    canary_errors: int = 0  # sum of summary ``errors`` counters
    control_predictions: int = 0
    control_errors: int = 0
    canary_p95_ms: float | None = None  # from merged latency histograms
    control_p95_ms: float | None = None
    prediction_psi: float | None = None  # canary vs control predictions (profiles.drift)
    prediction_js: float | None = None
    input_drift_share: float | None = None  # share of input features drifting, canaries
    input_drift: bool | None = None  # the drift monitor's verdict on canary inputs
    # the canaries' profiled rows, and (while no input feature has enough of them to be
    # judged, so input_drift is None) the fewest rows an input feature needs
    input_rows: int = 0
    input_rows_needed: int = 0
    shadow_rows: int = 0  # summed ShadowStats of canaries, shadow phase
    shadow_agreed: int = 0
    shadow_errors: int = 0
    # McNemar's table of the shadow against the live model on the same labelled rows
    # (summed ShadowStats.paired of canaries for the rollout's bundle, shadow phase)
    paired_both: int = 0
    paired_live_only: int = 0
    paired_shadow_only: int = 0
    paired_neither: int = 0
    # the performance gate: ``performance_metric`` (accuracy | mae) of both sides from the
    # same ``performance_source`` (realized | estimated); ``canary_performance_bound`` is
    # the canary's 95 % bound on its favourable side (accuracy's high, MAE's low)
    performance_metric: str | None = None
    performance_source: str | None = None
    canary_performance: float | None = None
    canary_performance_bound: float | None = None
    control_performance: float | None = None
    canary_labelled: int = 0  # realized rows behind each side
    control_labelled: int = 0

    def __post_init__(self) -> None:
        for name in _COUNTS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ObservationError(f"gate metrics: {name} {value!r} is not a count")
        for name in ("window_start", *_NUMBERS):
            value = getattr(self, name)
            if value is not None and not (_finite(value) and value >= 0):
                raise ObservationError(f"gate metrics: {name} {value!r} is not a finite "
                                       "number >= 0")
        for name, allowed in (("performance_metric", PERFORMANCE_METRICS),
                              ("performance_source", PERFORMANCE_SOURCES)):
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise ObservationError(f"gate metrics: {name} {value!r} is not one of "
                                       f"{', '.join(allowed)}")
        if self.shadow_agreed > self.shadow_rows:
            raise ObservationError("gate metrics: shadow_agreed exceeds shadow_rows")

    def to_dict(self) -> dict[str, Any]:
        return {fd.name: getattr(self, fd.name) for fd in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, obj: Any, where: str = "metrics") -> GateMetrics:
        """Read metrics (missing counts are 0, missing numbers None).

        Raises:
            SchemaError: a bad, impossible or unknown field (named).
        """
        f = Fields(obj, where)
        values: dict[str, Any] = {"window_start": f.float("window_start")}
        values.update({name: f.int(name, 0) for name in _COUNTS})
        values.update({name: f.opt_float(name) for name in _NUMBERS})
        for name in ("performance_metric", "performance_source"):
            values[name] = f.raw(name, None) if f.raw(name, None) is None else \
                f.str(name, max_len=16)
        drift = f.raw("input_drift", None)
        values["input_drift"] = None if drift is None else f.bool("input_drift")
        f.done()
        try:
            return cls(**values)
        except ObservationError as exc:
            raise SchemaError(f"{where}: {exc}", field=where) from exc


@dataclass(frozen=True)
class Observation:
    """One tick's input: the time, every current group member, the gate metrics."""

    now: float
    devices: Mapping[str, DeviceObs]
    gates: GateMetrics | None = None


@dataclass(frozen=True)
class GateWindow:
    """What the shell computes :class:`GateMetrics` over for the current stage."""

    phase: str  # shadow | canary
    stage: int
    since: float
    bundle: BundleRef
    canaries: tuple[str, ...]
    controls: tuple[str, ...]  # untouched members running another bundle
