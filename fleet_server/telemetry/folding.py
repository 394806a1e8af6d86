"""Folding new windows into rollups: which rollups a window goes into, and the grouped merge.

A window (a summary's packed profile, or a summary's performance entries) is added into
the rollups of its device, of each group its device belongs to when it is stored (or
folded), and of the whole fleet, at every level, in its bucket (the bucket holding the
middle of its window). A group's rollups start at a bucket boundary after the group is
first seen (:meth:`Folder.group_scopes`).

:class:`Folder` does this inside the caller's write transaction
(:meth:`fleet_server.telemetry.ingest.Ingestor.process` and ``fold_pending``): it does not
open one, decode messages, or decide which windows are new; that is the ingest's.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from edgefleet.contract.messages import Summary
from fleet_server.config import IngestConfig
from fleet_server.profiles.performance import ROLLUP_WIDTHS, add_blocks
from fleet_server.profiles.rollups import Packed
from fleet_server.store import (
    FLEET_SCOPE,
    PerformanceKey,
    PerformanceRollup,
    PerformanceRow,
    RollupKey,
    Store,
    group_scope,
)

__all__ = ["Folder", "GroupScopes"]

# per device, (rollup scope, first bucket) of each group its labels match
GroupScopes = dict[str, list[tuple[str, int]]]


class Folder:
    """Adds windows into the stored rollups of ``store`` at ``config.levels``."""

    def __init__(self, store: Store, config: IngestConfig) -> None:
        self.store = store
        self.config = config

    def keys(self, bundle_id: int, device: str, start: float, end: float,
             groups: Sequence[tuple[str, int]] = ()) -> list[RollupKey]:
        """The rollups a window goes into at every level: its device's, the fleet's, and
        those of ``groups`` (``(scope, first bucket)``) from their first bucket on."""
        mid = (start + end) / 2
        out = []
        for width in self.config.levels:
            bucket = int(mid // width) * width
            out += [(bundle_id, width, bucket, device), (bundle_id, width, bucket, FLEET_SCOPE)]
            out += [(bundle_id, width, bucket, scope) for scope, first in groups
                    if bucket >= first]
        return out

    def group_scopes(self, devices: set[str], now: float) -> GroupScopes:
        """Per device, ``(rollup scope, first bucket)`` of each group its labels match now.

        A group's own rollups start at the first bucket of the coarsest level that begins
        at least ``max_clock_skew_s`` after the group is first seen here: every summary
        stored before that ended before it, so from that bucket on the group's rollups hold
        every window its members sent (:meth:`Store.group_rollups_from`, what the drift
        report reads them from; before it, the report merges device rollups)."""
        if not devices:
            return {}
        store = self.store
        starts = store.group_rollup_starts()
        coarse = self.config.levels[-1]
        first = int(-(-(now + self.config.max_clock_skew_s) // coarse)) * coarse
        groups, new = [], []
        for g in store.list_groups():
            known = starts.get(g.name)
            if known is None or known[0] != g.created:
                known = (g.created, first)
                new.append((g.name, g.created, first))
            groups.append((g, group_scope(g.name), known[1]))
        store.set_group_rollup_starts(new)
        labels = store.device_labels(sorted(devices))
        return {d: [(scope, start) for g, scope, start in groups if g.matches(ls)]
                for d, ls in labels.items()}

    def windows(self, folding: Sequence[tuple[int, Summary, Packed]],
                groups: GroupScopes) -> None:
        """Add each ``(bundle id, summary, packed profile)`` into its rollups."""
        deltas: dict[RollupKey, list[Packed]] = defaultdict(list)
        for bundle_id, msg, packed in folding:
            for k in self.keys(bundle_id, msg.device, msg.window_start, msg.window_end,
                               groups.get(msg.device, ())):
                deltas[k].append(packed)
        self.merge(deltas)

    def merge(self, deltas: dict[RollupKey, list[Packed]]) -> None:
        """Merge a batch's new windows into their stored rollups, one grouped merge per
        layout (bundle), and write them back."""
        if not deltas:
            return
        existing = self.store.load_rollups(list(deltas))
        by_layout: dict[int, list[RollupKey]] = defaultdict(list)
        for key in deltas:
            by_layout[key[0]].append(key)
        rows = []
        for keys in by_layout.values():
            layout = deltas[keys[0]][0].layout
            parts: list[Packed] = []
            groups: list[int] = []
            blobs: list[bytes] = []
            blob_groups: list[int] = []
            for g, key in enumerate(keys):
                if key in existing:
                    blobs.append(existing[key])
                    blob_groups.append(g)
                parts += deltas[key]
                groups += [g] * len(deltas[key])
            merged = layout.merge_parts(parts, np.asarray(groups, dtype=np.intp), len(keys),
                                        blobs, blob_groups)
            rows += [(key, m.rows, m.summaries, m.to_bytes())
                     for key, m in zip(keys, merged, strict=True)]
        self.store.save_rollups(rows)

    def performance(self, rows: list[PerformanceRow], groups: GroupScopes) -> None:
        """Add new performance entries into the rollups of their device, groups and the
        fleet, at every width, in the bucket holding the middle of their window (inside
        the transaction that stored them: only a new summary's entries are added)."""
        if not rows:
            return
        deltas: dict[PerformanceKey, list[PerformanceRow]] = defaultdict(list)
        shared: dict[PerformanceKey, list[str]] = {}  # a device's key -> its other scopes
        for r in rows:
            for width in ROLLUP_WIDTHS:
                bucket = int(r.middle // width) * width
                scopes = [FLEET_SCOPE, *(scope for scope, first in groups.get(r.device, ())
                                         if bucket >= first)]
                own = (r.bundle_id, width, bucket, r.device)
                deltas[own].append(r)
                shared[own] = scopes
                for scope in scopes:
                    deltas[(r.bundle_id, width, bucket, scope)].append(r)
        stored = self.store.load_performance_rollups(list(deltas))
        # a device new in a bucket counts once more in its fleet's and groups' bucket
        more: dict[PerformanceKey, int] = defaultdict(int)
        for own, scopes in shared.items():
            if own not in stored:
                for scope in scopes:
                    more[(*own[:3], scope)] += 1
        out = []
        for key, parts in deltas.items():
            old = stored.get(key)
            items: list[PerformanceRow | PerformanceRollup] = [*([old] if old else []), *parts]
            devices = 1 if key in shared else (old.devices if old else 0) + more[key]
            out.append((key, PerformanceRollup(
                key[3], key[2], len(parts) + (old.entries if old else 0),
                sum(x.labelled for x in items), sum(x.served for x in items), devices,
                add_blocks([x.realized for x in items]),
                add_blocks([x.estimated for x in items]))))
        self.store.save_performance_rollups(out)
