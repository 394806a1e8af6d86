"""The reconcile decision: from a desired state and what is installed, what to do. Pure.

The server publishes, per device, a retained :class:`~edgefleet.contract.messages.DesiredState`
(with a revision that grows on every change); the agent compares it with its
:class:`~edge_agent.slots.State` and :func:`plan` says what to do about the live model and
the shadow. The daemon carries the plan out (download, verify, smoke-test, switch) and
reports the outcome; this module only decides, so every rule is tested exhaustively
without files, sockets or clocks.

Rules:

- a desired state older than the last one acted upon is ignored (``stale``);
- the live model: nothing to do when it already runs the target (then a new revision is
  still confirmed with an ``installed`` report, so the server knows the device is there);
  the previous bundle is re-activated from its local file (a rollback: no download, and no
  downgrade permission needed, because it ran here before); a bundle file already on disk
  is activated without download; anything else is downloaded;
- a version lower than the active one is refused unless the desired state says
  ``allow_downgrade`` (a rollback to the previous slot excepted);
- a bundle that failed for this very revision is not tried again until the revision
  changes: a broken bundle must not be downloaded in a loop;
- the shadow: started when the desired state names one that is not the live target,
  stopped when it names none.

Bundles are matched by sha256 when the desired state carries one, else by name@version.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from edge_agent.slots import State
from edgefleet.contract.errors import SchemaError
from edgefleet.contract.manifest import parse_version
from edgefleet.contract.messages import BundleRef, DesiredState

__all__ = ["LiveStep", "Plan", "ShadowStep", "plan", "same_bundle"]


@dataclass(frozen=True)
class LiveStep:
    """What to do about the live model.

    ``kind``: ``install`` (download, verify, smoke-test, switch), ``activate`` (the same
    from a file already on disk), ``confirm`` (already running: report it), ``refuse``
    (report ``failed`` with ``reason``, change nothing).
    """

    kind: str
    target: BundleRef
    rollback: bool = False  # the target is the previous slot
    allow_downgrade: bool = False
    reason: str = ""


@dataclass(frozen=True)
class ShadowStep:
    """``start`` a shadow candidate (``download`` if its file is not on disk) or ``stop``."""

    kind: str
    target: BundleRef | None = None
    download: bool = False


@dataclass(frozen=True)
class Plan:
    revision: int
    live: LiveStep | None = None
    shadow: ShadowStep | None = None
    stale: bool = False

    @property
    def empty(self) -> bool:
        return self.live is None and self.shadow is None


def same_bundle(a: BundleRef | None, b: BundleRef | None) -> bool:
    """Whether two refs name the same bundle (by sha256 when both carry one)."""
    if a is None or b is None:
        return a is b
    if a.sha256 and b.sha256:
        return a.sha256 == b.sha256
    return a.name == b.name and a.version == b.version


def _lower(target: BundleRef, active: BundleRef) -> bool:
    if target.name != active.name:
        return False  # another model altogether: versions do not compare
    try:
        return parse_version(target.version) < parse_version(active.version)
    except SchemaError:
        return False


def plan(desired: DesiredState, state: State, has_file: Callable[[str], bool]) -> Plan:
    """Decide what reconciling toward ``desired`` takes, given ``state``.

    Args:
        desired: the device's desired state as the server published it.
        state: what is installed (and what failed before).
        has_file: whether a bundle file with this sha256 is on disk.
    """
    if desired.revision < state.revision:
        return Plan(desired.revision, stale=True)
    new_revision = desired.revision > state.revision
    live = _live(desired, state, has_file, new_revision)
    return Plan(desired.revision, live, _shadow(desired, state, has_file, new_revision))


def _live(desired: DesiredState, state: State, has_file: Callable[[str], bool],
          new_revision: bool) -> LiveStep | None:
    target = desired.bundle
    if target is None:
        return None  # no model assigned: keep serving what is installed
    if same_bundle(target, state.active):
        return LiveStep("confirm", target) if new_revision else None
    failed = state.failed.get(target.sha256) if target.sha256 else None
    if failed is not None and not new_revision:
        return None  # reported already; wait for a new revision before trying again
    if same_bundle(target, state.previous) and state.previous is not None \
            and has_file(state.previous.sha256):
        # the previous slot's file: a rollback, served locally
        return LiveStep("activate", state.previous if not target.sha256 else target,
                        rollback=True, allow_downgrade=True)
    if state.active is not None and _lower(target, state.active) \
            and not desired.allow_downgrade:
        return LiveStep("refuse", target, reason=(
            f"downgrade from {state.active.label} to {target.label} refused: the desired "
            "state does not allow a downgrade"))
    if not target.sha256 and not target.url:
        return LiveStep("refuse", target, reason=f"{target.label}: the desired state gives "
                                                 "neither a sha256 nor a download URL")
    kind = "activate" if target.sha256 and has_file(target.sha256) else "install"
    return LiveStep(kind, target, allow_downgrade=desired.allow_downgrade)


def _shadow(desired: DesiredState, state: State, has_file: Callable[[str], bool],
            new_revision: bool) -> ShadowStep | None:
    want = desired.shadow
    if want is not None and same_bundle(want, desired.bundle):
        want = None  # the candidate is going live: no shadow beside itself
    if want is None:
        return ShadowStep("stop") if state.shadow is not None else None
    if same_bundle(want, state.shadow):
        return None
    if want.sha256 in state.failed and not new_revision:
        return None
    return ShadowStep("start", want, download=not (want.sha256 and has_file(want.sha256)))
