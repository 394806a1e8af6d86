"""The rollout errors: each refusal of the state machine, with the HTTP status it maps to.

    RolloutError(FleetError)          names the rollout, its status and the action (422)
    ├── PlanError                     a plan, stage or threshold is invalid (``field``)
    ├── ObservationError              the shell passed an impossible number (500)
    ├── StateMismatchError            the state belongs to another rollout (500)
    ├── InvalidTransitionError        the action is not allowed in this status (409)
    │   ├── UnknownActionError        not an action at all
    │   └── RolloutFinishedError      anything on a completed or aborted rollout
    ├── ApprovalRequiredError         start before approval; bundle without approval (403)
    └── ActorNotAllowedError          a malformed actor; approve without the role (403)

This module holds the classes only; :mod:`fleet_server.rollouts.machine` decides when.
"""

from __future__ import annotations

from fleet_server.errors import FleetError

__all__ = [
    "ActorNotAllowedError",
    "ApprovalRequiredError",
    "InvalidTransitionError",
    "ObservationError",
    "PlanError",
    "RolloutError",
    "RolloutFinishedError",
    "StateMismatchError",
    "UnknownActionError",
]


class RolloutError(FleetError):
    """Base of the rollout errors; ``rollout_id``, ``rollout_status`` and ``action`` say where.

    Each subclass carries its HTTP status (``status``) like every other fleet error, so the
    API's one handler needs no rollout case.
    """

    status = 422

    def __init__(self, message: str, *, rollout_id: str | None = None,
                 rollout_status: str | None = None, action: str | None = None) -> None:
        super().__init__(message)
        self.rollout_id, self.rollout_status, self.action = rollout_id, rollout_status, action


class PlanError(RolloutError):
    """A plan, stage or threshold value is invalid; ``field`` names it."""

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message)
        self.field = field


class ObservationError(RolloutError):
    """An observation the shell built holds an impossible value (negative, NaN)."""

    status = 500


class StateMismatchError(RolloutError):
    """The state passed with a plan belongs to another rollout."""

    status = 500


class InvalidTransitionError(RolloutError):
    """The action is not allowed in the rollout's current status."""

    status = 409


class UnknownActionError(InvalidTransitionError):
    """The action is none of :data:`ACTIONS`."""


class RolloutFinishedError(InvalidTransitionError):
    """The rollout is completed or aborted: no action applies any more."""


class ApprovalRequiredError(RolloutError):
    """Start before approval, or a bundle without an approver's signature."""

    status = 403


class ActorNotAllowedError(RolloutError):
    """The actor may not do this (approve needs an operator with the approver role)."""

    status = 403
