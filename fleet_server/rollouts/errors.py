"""The rollout errors: each refusal of the state machine, under the fleet error whose
kind it is, so its HTTP status (and the CLI's exit status) has one owner,
:mod:`fleet_server.errors`.

    RolloutError(FleetError)          names the rollout, its status and the action
    ├── PlanError                     + InvalidRequestError (422): a plan, stage or
    │                                   threshold is invalid (``field``)
    ├── ObservationError              the shell passed an impossible number (500)
    ├── StateMismatchError            the state belongs to another rollout (500)
    ├── InvalidTransitionError        + ConflictError (409): not allowed in this status
    │   ├── UnknownActionError        not an action at all
    │   └── RolloutFinishedError      anything on a completed or aborted rollout
    ├── ApprovalRequiredError         + PermissionDeniedError (403): start before
    │                                   approval; bundle without approval
    └── ActorNotAllowedError          + PermissionDeniedError (403): a malformed actor;
                                        approve without the role

This module holds the classes only; :mod:`fleet_server.rollouts.machine` decides when.
"""

from __future__ import annotations

from fleet_server.errors import (
    ConflictError,
    FleetError,
    InvalidRequestError,
    PermissionDeniedError,
)

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

    Each subclass is also the fleet error of its kind (a conflict, a refused value, a
    permission), whose ``status`` it carries, so the API's one handler needs no rollout case
    and ``except ConflictError`` sees a rollout conflict too.
    """

    def __init__(self, message: str, *, rollout_id: str | None = None,
                 rollout_status: str | None = None, action: str | None = None) -> None:
        super().__init__(message)
        self.rollout_id, self.rollout_status, self.action = rollout_id, rollout_status, action


class PlanError(InvalidRequestError, RolloutError):
    """A plan, stage or threshold value is invalid; ``field`` names it."""

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message, field=field)
        self.field: str = field


class ObservationError(RolloutError):
    """An observation the shell built holds an impossible value (negative, NaN)."""


class StateMismatchError(RolloutError):
    """The state passed with a plan belongs to another rollout."""


class InvalidTransitionError(ConflictError, RolloutError):
    """The action is not allowed in the rollout's current status."""


class UnknownActionError(InvalidTransitionError):
    """The action is none of :data:`ACTIONS`."""


class RolloutFinishedError(InvalidTransitionError):
    """The rollout is completed or aborted: no action applies any more."""


class ApprovalRequiredError(PermissionDeniedError, RolloutError):
    """Start before approval, or a bundle without an approver's signature."""


class ActorNotAllowedError(PermissionDeniedError, RolloutError):
    """The actor may not do this (approve needs an operator with the approver role)."""
