"""One error root for the fleet server: a rollout refusal is also the fleet error of its kind,
so its HTTP status and the CLI's exit status come from one table (fleet_server.errors)."""

from __future__ import annotations

import pytest

from edgefleet.cli import exit_code
from fleet_server.errors import (
    ConflictError,
    FleetError,
    InvalidRequestError,
    PermissionDeniedError,
)
from fleet_server.rollouts import errors as rollout

WHERE = {"rollout_id": "r1", "rollout_status": "running", "action": "start"}


@pytest.mark.parametrize(("error", "kind", "status", "exit"), [
    pytest.param(rollout.InvalidTransitionError("no", **WHERE), ConflictError, 409, 4,
                 id="transition"),
    pytest.param(rollout.UnknownActionError("no", **WHERE), ConflictError, 409, 4,
                 id="unknown-action"),
    pytest.param(rollout.RolloutFinishedError("no", **WHERE), ConflictError, 409, 4, id="finished"),
    pytest.param(rollout.ApprovalRequiredError("no", **WHERE), PermissionDeniedError, 403, 5,
                 id="approval"),
    pytest.param(rollout.ActorNotAllowedError("no", **WHERE), PermissionDeniedError, 403, 5,
                 id="actor"),
    pytest.param(rollout.PlanError("no", field="stages[0].fraction"), InvalidRequestError, 422, 1,
                 id="plan"),
    pytest.param(rollout.ObservationError("no", **WHERE), FleetError, 500, 1, id="observation"),
    pytest.param(rollout.StateMismatchError("no", **WHERE), FleetError, 500, 1, id="state"),
])
def test_a_rollout_refusal_is_the_fleet_error_of_its_kind(error, kind, status, exit):
    assert isinstance(error, rollout.RolloutError) and isinstance(error, kind)
    assert error.status == status and exit_code(error) == exit


def test_a_rollout_refusal_keeps_where_it_happened():
    error = rollout.RolloutFinishedError("finished", **WHERE)
    assert (error.rollout_id, error.rollout_status, error.action) == ("r1", "running", "start")
    plan = rollout.PlanError("bad fraction", field="stages[0].fraction")
    assert plan.field == "stages[0].fraction" and str(plan) == "bad fraction"
