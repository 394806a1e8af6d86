"""Data capture per group (issue 15): a group's policy checked, and the one a device gets.

A group may set a :class:`~edgefleet.contract.messages.CapturePolicy`: on (a rate, a
per-window cap, an allowlist of features) or off. None set (the default, and what
``reset`` returns to) means the group says nothing: its devices' own ``[capture]`` configs
stand. A device in several groups gets the stricter of their policies (:func:`combine`):
off if any says off, else the smallest rate and cap and the intersection of the allowlists.
The agent applies it under its own config, which stays an upper bound (a device whose
owner did not enable capture never captures): see :mod:`edge_agent.capture`.

The checks here are pure: :func:`apply_change` (a request's values over the group's
current policy) and :func:`check_features` (against the inputs of the bundles the group's
devices are assigned). This module does not store, publish or sample anything.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from edgefleet.contract.messages import MAX_CAPTURE_ROWS, CapturePolicy
from edgefleet.contract.messages_control import CAPTURE_FEATURE_RE, MAX_CAPTURE_FEATURES
from fleet_server.errors import InvalidRequestError

__all__ = ["DEFAULT_MAX_ROWS", "DEFAULT_RATE", "CaptureChange", "CapturePolicyError",
           "UnknownCaptureFeatureError", "apply_change", "check_features", "combine"]

DEFAULT_RATE = 0.01  # the agent's own defaults (edge_agent.capture.CaptureConfig)
DEFAULT_MAX_ROWS = 1000


class CapturePolicyError(InvalidRequestError):
    """A group's data capture setting refused (names the field: ``capture.rate`` ...)."""


class UnknownCaptureFeatureError(CapturePolicyError):
    """A feature of a group's capture allowlist that is no input of the bundles its
    devices are assigned (names the feature and the bundles)."""


@dataclass(frozen=True)
class CaptureChange:
    """What a request asks of a group's capture; ``None`` fields keep the current value.

    ``enabled`` False turns capture off (then nothing else may be given); ``reset``
    removes the group's policy (its devices' own configs stand again).
    """

    enabled: bool | None = None
    rate: float | None = None
    max_rows: int | None = None
    features: tuple[str, ...] | None = None
    reset: bool = False

    @property
    def empty(self) -> bool:
        return not self.reset and self.enabled is None and self.rate is None \
            and self.max_rows is None and self.features is None


def _bad(field: str, why: str) -> CapturePolicyError:
    return CapturePolicyError(f"capture.{field}: {why}", field=f"capture.{field}")


def _features(names: Iterable[Any]) -> tuple[str, ...]:
    out = tuple(names)
    if not out:
        raise _bad("features", "an empty allowlist (turn capture off instead)")
    if len(out) > MAX_CAPTURE_FEATURES:
        raise _bad("features", f"at most {MAX_CAPTURE_FEATURES} names")
    for name in out:
        if not isinstance(name, str) or not CAPTURE_FEATURE_RE.match(name):
            raise _bad("features", f"{str(name)[:40]!r} is not a feature name (1-128 "
                                   "characters, no control characters)")
    if len(set(out)) < len(out):
        twice = next(n for n in out if out.count(n) > 1)
        raise _bad("features", f"{twice!r} named twice")
    return out


def apply_change(current: CapturePolicy | None, change: CaptureChange) -> CapturePolicy | None:
    """The group's policy after ``change``: on takes the given values over the current
    ones (the agent's defaults, rate 0.01 and 1000 rows a window, when it was not on).

    Raises:
        CapturePolicyError: a rate outside [0, 1], a cap outside 1..1,000,000, a bad or
            repeated feature name, an empty allowlist, values given with ``off`` or
            ``reset``; the field is named.
    """
    if change.reset or change.enabled is False:
        given = [k for k in ("rate", "max_rows", "features") if getattr(change, k) is not None]
        if given or (change.reset and change.enabled is not None):
            raise _bad(given[0] if given else "enabled",
                       "capture off (or reset) takes no other capture setting")
        return None if change.reset else CapturePolicy(False)
    base = current if current is not None and current.enabled else \
        CapturePolicy(True, DEFAULT_RATE, DEFAULT_MAX_ROWS)
    rate = base.rate if change.rate is None else change.rate
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) \
            or not math.isfinite(rate) or not 0 <= rate <= 1:
        raise _bad("rate", f"must be a share in [0, 1], got {rate!r}")
    max_rows = base.max_rows if change.max_rows is None else change.max_rows
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) \
            or not 1 <= max_rows <= MAX_CAPTURE_ROWS:
        raise _bad("max_rows", f"must be 1..{MAX_CAPTURE_ROWS:,} rows a window, "
                               f"got {max_rows!r}")
    features = base.features if change.features is None else _features(change.features)
    return CapturePolicy(True, float(rate), max_rows, features)


def check_features(policy: CapturePolicy | None, inputs: dict[str, Sequence[str]]) -> None:
    """Every feature of the allowlist must be an input of one of the bundles the group's
    devices are assigned (``inputs``: bundle label → its input names); with no bundle
    assigned yet the names are only checked for form.

    Raises:
        UnknownCaptureFeatureError: names the first feature no bundle has, and the bundles.
    """
    if policy is None or not policy.enabled or policy.features is None or not inputs:
        return
    known = {name for names in inputs.values() for name in names}
    for name in policy.features:
        if name not in known:
            raise UnknownCaptureFeatureError(
                f"capture.features: {name!r} is not an input of "
                f"{', '.join(sorted(inputs))} (the bundles this group's devices run)",
                field="capture.features")


def combine(policies: Iterable[CapturePolicy | None]) -> CapturePolicy | None:
    """The policy of a device in groups with these policies: the stricter of them.

    None when no group sets one; off when any says off; else the smallest rate and cap,
    and the intersection of the allowlists (in the first list's order; ``None`` lists
    restrict nothing). Disjoint allowlists leave an empty one: nothing is captured.
    """
    set_ = [p for p in policies if p is not None]
    if not set_:
        return None
    if any(not p.enabled for p in set_):
        return CapturePolicy(False)
    lists = [p.features for p in set_ if p.features is not None]
    features = None
    if lists:
        rest = [set(f) for f in lists[1:]]
        features = tuple(n for n in lists[0] if all(n in r for r in rest))
    return CapturePolicy(True, min(p.rate for p in set_), min(p.max_rows for p in set_),
                         features)
