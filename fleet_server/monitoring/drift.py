"""Drift reports on demand: merge a bundle's rollups over a scope and a time range, and judge.

A report is always over one bundle version (rollups are keyed by bundle, and a summary
is only folded into its own bundle's rollups after its ``reference_hash`` was checked),
one scope — the whole fleet, a group, or one device — and a time
range. The range is widened to whole buckets of the finest rollup level (the result says
which range it covers) and split into the coarsest buckets that tile it
(:func:`tile`): an hour-aligned hour of a 10,000-device group is 10,000 hourly rollups,
merged in one vectorised pass. What the devices profiled is exactly what is counted.

A group's report reads the group's own rollups, kept at ingest like the fleet's (one per
bucket: a group of 1,000 over 30 days is 720 rollups, not 720,000), from the bucket where
they are complete (:meth:`DriftService.group_from`); before it, the rollups of the devices
that are its members now. Its own rollups hold each window under the groups its device
belonged to when the window was stored: a device that moves to another group leaves its
past in the old one.

The statistics and verdicts are :mod:`fleet_server.profiles.drift`'s (``compare``,
``suspect_sensors``); this module only assembles their inputs: the settings in force for
the scope (:func:`drift_config`: the server's, with a group's own over them), the group's
important features, and the bundle's permutation importances from its signed card. A
device report is also checked against its group (or the fleet): features that drift on
the device alone make it a suspect sensor.

This module reads the store and never writes; the periodic evaluation that stores
verdicts and raises alerts is :mod:`fleet_server.monitoring.evaluator`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fleet_server.config import DEFAULT_DRIFT, DriftConfig
from fleet_server.errors import ConfigError, InvalidRequestError
from fleet_server.models import Group
from fleet_server.profiles.drift import DriftReport, Thresholds, compare, suspect_sensors
from fleet_server.profiles.rollups import Packed
from fleet_server.registry.bundles import Bundles, Reference
from fleet_server.registry.devices import Registry
from fleet_server.store import FLEET_SCOPE, Store, group_scope

__all__ = ["DriftResult", "DriftService", "Scope", "Series", "drift_config", "tile"]

log = logging.getLogger(__name__)

DEFAULT_RANGE_S = 3600
MAX_RANGE_S = 366 * 86400
MAX_TIME = 2.0**36  # the year 4147: every bucket start fits SQLite's integers


def whole_steps(since: float | None, until: float | None, now: float, default_s: float,
                step: int) -> tuple[int, int]:
    """A report's time range, checked and widened to whole ``step``s: ``until`` defaults to
    ``now``, ``since`` to ``default_s`` before it (the drift and performance reports' one
    reading of ``--since``/``--until``).

    Raises:
        InvalidRequestError: a time out of range, until not after since, or over a year.
    """
    until = now if until is None else until
    since = until - default_s if since is None else since
    for name, t in (("since", since), ("until", until)):
        if not (math.isfinite(t) and 0 <= t <= MAX_TIME):
            raise InvalidRequestError(f"{name} must be a unix time between 0 and "
                                      f"{MAX_TIME:.0f}", field=name)
    if until <= since:
        raise InvalidRequestError("until must be after since", field="until")
    if until - since > MAX_RANGE_S:
        raise InvalidRequestError("a report covers at most 366 days", field="since")
    return int(since // step) * step, int(-(-until // step)) * step


def tile(lo: int, hi: int, levels: Sequence[int]) -> list[tuple[int, int, int]]:
    """Split ``[lo, hi)`` (multiples of ``levels[0]``) into ``(width, start, end)`` runs of
    whole buckets, as coarse as the bounds allow: the fewest rollups to read."""
    if hi <= lo:
        return []
    width = levels[-1]
    if len(levels) == 1:
        return [(width, lo, hi)]
    a, b = -(-lo // width) * width, (hi // width) * width
    if a >= b:
        return tile(lo, hi, levels[:-1])
    return [*tile(lo, a, levels[:-1]), (width, a, b), *tile(b, hi, levels[:-1])]


def drift_config(server: DriftConfig, group: Group | None) -> DriftConfig:
    """The drift settings in force for a scope: the server's, with the group's own over
    them. A group setting the server's own values make invalid (it was checked against
    the defaults; the server was started with others) is ignored, and logged."""
    if group is None or not group.drift:
        return server
    try:
        return server.with_overrides(group.drift, f"group {group.name} drift")
    except ConfigError as exc:
        log.warning("group %s: its drift settings are not used: %s", group.name, exc)
        return server


@dataclass(frozen=True)
class Scope:
    """What a report is over: ``kind`` is fleet, group or device."""

    kind: str
    name: str = ""
    group: Group | None = None

    @property
    def label(self) -> str:
        return "fleet" if self.kind == "fleet" else f"{self.kind}:{self.name}"


@dataclass(frozen=True)
class DriftResult:
    bundle: str
    scope: str
    since: int
    until: int
    devices: int
    summaries: int
    rollups: int  # how many stored rollups were merged
    report: DriftReport
    suspect: tuple[str, ...] = ()  # device scope: features that drift on it alone
    compared_with: str = ""  # device scope: the scope of that check
    settings: dict[str, Any] = field(default_factory=dict)  # every setting applied
    overrides: tuple[str, ...] = ()  # those the group set (the rest are the server's)

    def to_dict(self) -> dict[str, Any]:
        return {"bundle": self.bundle, "scope": self.scope, "since": self.since,
                "until": self.until, "devices": self.devices, "summaries": self.summaries,
                "rollups": self.rollups, "suspect": list(self.suspect),
                "compared_with": self.compared_with, "settings": dict(self.settings),
                "overrides": list(self.overrides), "report": self.report.to_dict()}


@dataclass(frozen=True)
class Series:
    """Per feature, one point per step: the dashboard's drift-over-time plot."""

    bundle: str
    scope: str
    since: int
    until: int
    step: int
    starts: tuple[int, ...]
    rows: tuple[int, ...]
    verdicts: tuple[str, ...]  # the report's verdict per step
    features: dict[str, dict[str, list[Any]]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"bundle": self.bundle, "scope": self.scope, "since": self.since,
                "until": self.until, "step": self.step, "starts": list(self.starts),
                "rows": list(self.rows), "verdicts": list(self.verdicts),
                "features": self.features}


class DriftService:
    def __init__(self, store: Store, bundles: Bundles, registry: Registry,
                 config: DriftConfig = DEFAULT_DRIFT, levels: Sequence[int] = (60, 3600)
                 ) -> None:
        self.store = store
        self.bundles = bundles
        self.registry = registry
        self.config = config
        self.levels = tuple(levels)

    @property
    def thresholds(self) -> Thresholds:
        """The server's thresholds (a group may set its own: :meth:`config_for`)."""
        return self.config.thresholds

    def config_for(self, group: Group | None) -> DriftConfig:
        return drift_config(self.config, group)

    # -- inputs --------------------------------------------------------------------------

    def scope(self, group: str | None = None, device: str | None = None) -> Scope:
        """Raises: NotFoundError: no such group or device."""
        if device is not None:
            self.registry.get(device)
            return Scope("device", device, self.registry.group(group) if group else None)
        if group is not None:
            g = self.registry.group(group)
            return Scope("group", g.name, g)
        return Scope("fleet")

    def window(self, since: float | None, until: float | None, now: float) -> tuple[int, int]:
        """The range widened to whole finest buckets.

        Raises:
            InvalidRequestError: until before since, or a range over a year.
        """
        return whole_steps(since, until, now, DEFAULT_RANGE_S, self.levels[0])

    def important(self, ref: Reference, group: Group | None) -> tuple[str, ...]:
        if group is None:
            return ()
        names = {s.name for s in (*ref.spec.inputs, *ref.spec.outputs)}
        return tuple(f for f in group.important_features if f in names)

    def group_from(self, group: Group) -> int:
        """The first bucket from which a group's own rollups are complete (a bucket
        boundary of every level); before it its reports merge its members' device rollups.
        Far in the future while ingest has not yet seen the group."""
        start = self.store.group_rollups_from(group.name, group.created)
        return int(MAX_TIME) if start is None else start

    def merged(self, ref: Reference, scope: Scope, lo: int, hi: int
               ) -> tuple[Packed, int, int]:
        """The merged rollup of a scope over ``[lo, hi)``: (packed, devices, rollups read).

        A group's range is read from its own rollups from :meth:`group_from` on (one
        rollup per bucket, as the fleet's) and from its current members' device rollups
        before that; its device count is its current members with rollups in the range."""
        blobs: list[bytes] = []
        scopes: set[str] = set()
        tiles = tile(lo, hi, self.levels)
        if scope.kind == "group":
            assert scope.group is not None
            cut = min(max(lo, self.group_from(scope.group)), hi)
            for width, a, b in tile(lo, cut, self.levels):
                rows = self.store.read_rollups(ref.bundle.id, width, a, b,
                                               selector=scope.group.selector or None)
                blobs += [d for _, _, d in rows]
            own = group_scope(scope.group.name)
            for width, a, b in tile(cut, hi, self.levels):
                blobs += [d for _, _, d in self.store.read_rollups(ref.bundle.id, width, a, b,
                                                                   scope=own)]
            if scope.group.selector:
                devices = self.store.count_member_scopes(ref.bundle.id, tiles,
                                                         scope.group.selector)
            else:  # every device: as the fleet
                devices = self.store.count_rollup_scopes(ref.bundle.id, tiles)
            return ref.layout.merge_bytes(blobs), devices, len(blobs)
        for width, a, b in tiles:
            if scope.kind == "device":
                rows = self.store.read_rollups(ref.bundle.id, width, a, b, scope=scope.name)
            else:
                rows = self.store.read_rollups(ref.bundle.id, width, a, b, scope=FLEET_SCOPE)
            blobs += [d for _, _, d in rows]
            if scope.kind != "fleet":
                scopes.update(s for s, _, _ in rows)
        devices = len(scopes) if scope.kind != "fleet" else \
            self.store.count_rollup_scopes(ref.bundle.id, tiles)
        return ref.layout.merge_bytes(blobs), devices, len(blobs)

    # -- reports -------------------------------------------------------------------------

    def report(self, bundle: str, *, group: str | None = None, device: str | None = None,
               since: float | None = None, until: float | None = None,
               now: float) -> DriftResult:
        """The drift report of a bundle (``name@version``) over a scope and range.

        Raises:
            InvalidRequestError: a bad label or range. NotFoundError: no such bundle,
                group or device.
        """
        lo, hi = self.window(since, until, now)
        record = self.bundles.by_label(bundle)
        ref = self.bundles.reference(record.id)
        scope = self.scope(group, device)
        packed, devices, n = self.merged(ref, scope, lo, hi)
        important = self.important(ref, scope.group)
        config = self.config_for(scope.group)
        t = config.thresholds
        report = compare(ref.base, packed.to_profile(), t, important, ref.importances)
        suspect: tuple[str, ...] = ()
        against = ""
        if scope.kind == "device":
            other = Scope("group", scope.group.name, scope.group) if scope.group else \
                Scope("fleet")
            other_packed, _, _ = self.merged(ref, other, lo, hi)
            other_report = compare(ref.base, other_packed.to_profile(), t, important,
                                   ref.importances)
            suspect = suspect_sensors(other_report, {scope.name: report}).get(scope.name, ())
            against = other.label
        overrides = tuple(sorted(scope.group.drift)) if scope.group and config is not \
            self.config else ()
        return DriftResult(record.label, scope.label, lo, hi, devices, packed.summaries, n,
                           report, suspect, against, config.settings(), overrides)

    def series(self, bundle: str, *, group: str | None = None, device: str | None = None,
               since: float | None = None, until: float | None = None,
               step: int | None = None, now: float) -> Series:
        """Per-step statistics per feature over a range (``step`` a multiple of the
        finest level; by default the coarsest level giving at least 12 points).

        Raises:
            InvalidRequestError: a bad range or step, or too many points.
        """
        lo, hi = self.window(since, until, now)
        record = self.bundles.by_label(bundle)
        ref = self.bundles.reference(record.id)
        scope = self.scope(group, device)
        lo, hi, step, points = self._grid(lo, hi, step)
        width = max(w for w in self.levels if step % w == 0)
        rows = self._rows(record.id, scope, width, lo, hi)
        index = np.array([(b - lo) // step for _, b, _ in rows], dtype=np.int64)
        merged = ref.layout.merge_groups([d for _, _, d in rows], index, points)
        important = self.important(ref, scope.group)
        t = self.config_for(scope.group).thresholds
        features: dict[str, dict[str, list[Any]]] = {}
        verdicts, counts = [], []
        for packed in merged:
            rep = compare(ref.base, packed.to_profile(), t, important, ref.importances)
            verdicts.append(rep.verdict)
            counts.append(packed.rows)
            _add_point(features, rep)
        return Series(record.label, scope.label, lo, hi, step,
                      tuple(range(lo, hi, step)), tuple(counts), tuple(verdicts), features)

    def _grid(self, lo: int, hi: int, step: int | None) -> tuple[int, int, int, int]:
        """A series' range widened to whole steps: (lo, hi, step, points).

        Raises:
            InvalidRequestError: a step that is not a multiple of the finest level, or
                too many points.
        """
        if step is None:
            fits = [w for w in self.levels if (hi - lo) // w >= 12]
            step = fits[-1] if fits else self.levels[0]
        if step < 1 or step % self.levels[0]:
            raise InvalidRequestError(f"step must be a multiple of {self.levels[0]} s",
                                      field="step")
        lo = lo // step * step
        hi = -(-hi // step) * step
        points = (hi - lo) // step
        if points > self.config.max_series_points:
            raise InvalidRequestError(f"{points} points; at most "
                                      f"{self.config.max_series_points} (use a larger step)",
                                      field="step")
        return lo, hi, step, points

    def _rows(self, bundle_id: int, scope: Scope, width: int, lo: int, hi: int
              ) -> list[tuple[str, int, bytes]]:
        """A scope's stored rollups of one width over ``[lo, hi)`` (a group's: its
        members' device rollups before :meth:`group_from`, its own from there)."""
        if scope.kind != "group":
            return self.store.read_rollups(
                bundle_id, width, lo, hi,
                scope=scope.name if scope.kind == "device" else FLEET_SCOPE)
        assert scope.group is not None
        # its own rollups from where they are complete (a boundary of every level)
        cut = min(max(lo, self.group_from(scope.group)), hi)
        rows = self.store.read_rollups(bundle_id, width, lo, cut,
                                       selector=scope.group.selector or None)
        rows += self.store.read_rollups(bundle_id, width, cut, hi,
                                        scope=group_scope(scope.group.name))
        return rows


def _add_point(features: dict[str, dict[str, list[Any]]], rep: DriftReport) -> None:
    """Append one step's verdict, rows and statistics to each feature's series."""
    for f in rep.features:
        key = f.name if f.role == "input" else f"output:{f.name}"
        slot = features.setdefault(key, {k: [] for k in
                                         ("verdict", "n", "psi", "ks", "wasserstein", "js")})
        slot["verdict"].append(f.verdict)
        slot["n"].append(f.n_live)
        for k in ("psi", "ks", "wasserstein", "js"):
            v = f.stats.get(k)
            slot[k].append(None if v is None or not math.isfinite(v) else float(v))
