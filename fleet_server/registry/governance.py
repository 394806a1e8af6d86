"""Governance the fleet enforces: review dates and what a group requires of a bundle.

Pure rules over a stored bundle (its signed manifest and card), its approval statements as
the server checked them at upload (:class:`~edgefleet.contract.approval.CheckedApproval`)
and a group; ``now`` is a parameter. The rollout service and the desired-state route call
:func:`check_assignment` before anything reaches a device:

- **review date**: the card's ``review_by``, renewed by the latest approval of a key the
  server trusts as an ``approver`` that names a date
  (:func:`edgefleet.contract.approval.next_review`). A bundle past it (the day after the
  date, UTC) is refused with :class:`~fleet_server.errors.ReviewOverdueError` until an
  approver re-approves it with a new date (``edgepack sign --role approver --review-by``,
  then ``fleet bundle upload`` of the re-signed file);
- **group requirements** (:data:`REQUIREMENTS`): ``card`` (the bundle was built with a
  ``card.toml``), ``approval`` (a signature or a confirmed approval statement by a key the
  server trusts as an approver), ``fairness`` (the card holds fairness bounds and every
  one passed, not forced), ``champion`` (the card holds a champion comparison the bundle
  won). A rollout that lacks one is refused with
  :class:`~fleet_server.errors.RequirementsMissingError`, naming each missing one and why.

What the review alerts do with these dates is :mod:`fleet_server.monitoring.reviews`'s.
This module reads no store and speaks no HTTP.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import date, datetime, timezone

from edgefleet.contract.approval import CheckedApproval, next_review
from edgefleet.contract.card import ModelCard, parse_date
from edgefleet.contract.errors import SchemaError
from fleet_server.errors import (
    RequirementsMissingError,
    ReviewOverdueError,
    UnknownRequirementError,
)
from fleet_server.models import BundleRecord, Group

__all__ = [
    "APPROVER",
    "REQUIREMENTS",
    "REVIEW_DUE_DAYS",
    "card_of",
    "check_assignment",
    "check_requirements",
    "check_review",
    "day_of",
    "missing_requirements",
    "parse_requirements",
    "review_by",
]

REQUIREMENTS = ("card", "approval", "fairness", "champion")
REVIEW_DUE_DAYS = 14  # review_due alerts open this many days before the date
APPROVER = "approver"


def parse_requirements(values: Iterable[str]) -> tuple[str, ...]:
    """Requirement names (each may be a comma-separated list) → the known names, in order,
    each once.

    Raises:
        UnknownRequirementError: a name that is none of :data:`REQUIREMENTS` (names them).
    """
    names = [v.strip() for value in values for v in str(value).split(",") if v.strip()]
    unknown = sorted({n for n in names if n not in REQUIREMENTS})
    if unknown:
        raise UnknownRequirementError(
            f"requires: unknown requirement(s) {', '.join(repr(u[:32]) for u in unknown)} "
            f"(a group can require: {', '.join(REQUIREMENTS)})", field="requires")
    return tuple(n for n in REQUIREMENTS if n in names)


def day_of(now: float) -> date:
    """The UTC calendar day of a timestamp (review dates are days)."""
    return datetime.fromtimestamp(now, timezone.utc).date()


def card_of(record: BundleRecord) -> ModelCard | None:
    """The card section of a stored bundle's manifest (None: built before cards).

    Raises:
        SchemaError: the stored card does not parse (it verified at upload, so only a
            newer card schema than this server reads).
    """
    raw = record.manifest.get("card")
    return None if raw is None else ModelCard.from_dict(raw)


def review_by(record: BundleRecord, approvals: Sequence[CheckedApproval]) -> str | None:
    """The review date in force (``YYYY-MM-DD``), or None when the bundle names none."""
    try:
        card = card_of(record)
    except SchemaError:
        card = None
    stated = card.statement.review_by if card and card.statement else None
    return next_review(stated, tuple(approvals), APPROVER)


def check_review(record: BundleRecord, approvals: Sequence[CheckedApproval],
                 now: float) -> None:
    """Raises:
        ReviewOverdueError: ``now`` is past the bundle's review date.
    """
    due = review_by(record, approvals)
    if due is None:
        return
    if day_of(now) > parse_date(due, "review_by"):
        raise ReviewOverdueError(
            f"bundle {record.label} was due for review on {due}: an approver must re-approve "
            "it with a new date (edgepack sign --role approver --review-by DATE, then upload "
            "the re-signed bundle) before it goes to more devices",
            bundle=record.label, review_by=due)


def _approved(record: BundleRecord, approvals: Sequence[CheckedApproval]) -> bool:
    return any(s.get("role") == APPROVER for s in record.signers) or any(
        a.role_confirmed and a.statement.role == APPROVER for a in approvals)


def missing_requirements(record: BundleRecord, approvals: Sequence[CheckedApproval],
                         requires: Sequence[str]) -> list[tuple[str, str]]:
    """``(requirement, why)`` for each of ``requires`` the bundle does not meet."""
    try:
        card = card_of(record)
    except SchemaError as exc:
        card, unreadable = None, str(exc)
    else:
        unreadable = ""
    out: list[tuple[str, str]] = []
    for name in requires:
        if name == "card" and (card is None or card.statement is None):
            out.append((name, unreadable or "built without a card.toml"))
        elif name == "approval" and not _approved(record, approvals):
            out.append((name, "no signature or approval by a key the server trusts as an "
                              "approver"))
        elif name == "fairness":
            if card is None or not card.checks:
                out.append((name, "no fairness bound was checked (--sensitive with "
                                  "--max-fairness-gap)"))
            elif not card.checks_passed:
                failed = [f"{c.column}.{c.gap}" for c in card.checks if not c.passed]
                out.append((name, f"failed: {', '.join(failed)}"
                                  f"{' (forced)' if card.forced else ''}"))
        elif name == "champion":
            if card is None or card.champion is None:
                out.append((name, "no champion comparison (--champion)"))
            elif not card.champion.won:
                c = card.champion
                out.append((name, f"lost to {c.name}@{c.version} on {c.metric}"))
    return out


def check_requirements(record: BundleRecord, approvals: Sequence[CheckedApproval],
                       group: Group) -> None:
    """Raises:
        RequirementsMissingError: the bundle lacks what ``group`` requires (names each).
    """
    missing = missing_requirements(record, approvals, group.requires)
    if missing:
        raise RequirementsMissingError(
            f"group {group.name!r} requires {', '.join(n for n, _ in missing)} of bundle "
            f"{record.label}, which it lacks: "
            + "; ".join(f"{n}: {why}" for n, why in missing),
            bundle=record.label, group=group.name, missing=tuple(n for n, _ in missing))


def check_assignment(record: BundleRecord, approvals: Sequence[CheckedApproval],
                     groups: Sequence[Group], now: float) -> None:
    """Everything that must hold before ``record`` goes to devices of ``groups``.

    Raises:
        ReviewOverdueError: past its review date.
        RequirementsMissingError: a group requires what it lacks.
    """
    check_review(record, approvals, now)
    for group in groups:
        check_requirements(record, approvals, group)
