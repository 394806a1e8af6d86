"""The model card: reading ``card.toml`` and rendering a bundle's card for people.

``card.toml`` holds what the engineer knows and a tool cannot, as top-level keys
(:data:`edgefleet.contract.card.STATEMENT_FIELDS`)::

    owner = "Credit risk team"
    contact = "risk-ml@example.com"
    intended_use = "Rank applications for manual review"
    out_of_scope = "Automatic refusals"
    limitations = "Trained on 2025 applications only"
    ethical_considerations = "Checked for gaps between age groups"
    review_by = 2027-06-30

An unknown key is refused naming it (a misspelt ``limitation`` would otherwise vanish
from a document a regulator reads); every value is text of at most 4096 characters, except
``review_by``, a date.

:func:`render` turns a bundle's card into Markdown or HTML through Jinja2 templates shipped
with the package, with autoescaping on for both (Markdown viewers pass raw HTML through,
so a hostile string in the card must not become markup there either), or into JSON.
The document it renders (:func:`card_document`) answers the six questions in order: who
approved it, what data trained it, how it was evaluated, what biases were tested and found,
when it is reviewed next, how its decisions can be explained.

This module measures nothing (:mod:`packager.evaluate` does) and judges no signature
beyond checking the approvals against a trust store it is given.
"""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path
from typing import Any

from edgefleet.contract.approval import CheckedApproval, check_approvals, next_review
from edgefleet.contract.bundle import UnverifiedBundle
from edgefleet.contract.card import MAX_TEXT, STATEMENT_FIELDS, Statement, parse_date
from edgefleet.contract.signing import TrustStore
from packager.errors import CardError
from packager.tomlfile import read_toml

__all__ = ["FORMATS", "card_document", "load_card", "render"]

FORMATS = ("md", "html", "json")
MAX_CARD_BYTES = 256 * 1024
TOP_FEATURES = 10


def load_card(path: Path) -> Statement:
    """Read ``card.toml``.

    Raises:
        CardError: unreadable, not TOML, an unknown key, a value of the wrong type.
    """
    doc, _ = read_toml(path, MAX_CARD_BYTES, CardError, "card")
    unknown = sorted(set(doc) - set(STATEMENT_FIELDS))
    if unknown:
        raise CardError(f"{path}: unknown key {unknown[0]!r} (a card has "
                        f"{', '.join(STATEMENT_FIELDS)})")
    values: dict[str, Any] = {}
    for key, value in doc.items():
        if key == "review_by":
            values[key] = _review_by(path, value)
            continue
        if not isinstance(value, str):
            raise CardError(f"{path}: {key} must be text, got {type(value).__name__}")
        if len(value) > MAX_TEXT:
            raise CardError(f"{path}: {key} is longer than {MAX_TEXT} characters")
        values[key] = value
    return Statement(**values)


def _review_by(path: Path, value: object) -> str:
    if isinstance(value, date) and not hasattr(value, "hour"):
        return value.isoformat()
    if isinstance(value, str):
        try:
            return parse_date(value, f"{path}: review_by").isoformat()
        except ValueError as exc:
            raise CardError(str(exc)) from exc
    raise CardError(f"{path}: review_by must be a date like 2027-06-30, "
                    f"got {type(value).__name__}")


def card_document(bundle: UnverifiedBundle, trust: TrustStore | None = None) -> dict[str, Any]:
    """Everything the card shows, as plain data (what every format renders).

    With ``trust``, approvals by its keys are verified and named; without it they are
    listed as unchecked.

    Raises:
        BadSignatureError: an approval by a trusted key does not verify.
    """
    m = bundle.manifest
    raw_manifest = bundle.member("manifest.json")
    store = trust if trust is not None else TrustStore()
    approvals: tuple[CheckedApproval, ...] = check_approvals(bundle.envelope.approvals,
                                                             raw_manifest, store)
    card = m.card
    statement = card.statement if card else None
    review = next_review(statement.review_by if statement else None, approvals)
    importances = card.importances if card else None
    return {
        "name": m.name, "version": m.version, "created_at": m.created_at, "task": m.task,
        "description": m.description, "bundle_sha256": bundle.sha256,
        "has_card": card is not None, "has_statement": statement is not None,
        "trust_given": trust is not None,
        "statement": statement.to_dict() if statement else None,
        "approvals": [a.to_dict() for a in approvals],
        "signers": [s.keyid for s in bundle.envelope.signatures],
        "review_by": review,
        "data": {"sha256": m.lineage.data_sha256, "rows": m.lineage.data_rows,
                 "columns": list(card.data_columns) if card else [],
                 "time_range": card.time_range.to_dict() if card and card.time_range
                 else None,
                 "inputs": [s.name for s in m.inputs]},
        "lineage": m.lineage.to_dict(),
        "quantization": m.quantization.to_dict(), "fidelity": m.fidelity.to_dict(),
        "metrics": dict(sorted(m.metrics.items())),
        "evaluation": card.evaluation.to_dict() if card and card.evaluation else None,
        "slices": [s.to_dict() for s in card.slices] if card else [],
        "fairness": [r.to_dict() for r in card.fairness] if card else [],
        "checks": [c.to_dict() for c in card.checks] if card else [],
        "forced": card.forced if card else False,
        "champion": card.champion.to_dict() if card and card.champion else None,
        "importances": importances.to_dict() if importances else None,
        "top_features": [i.to_dict() for i in importances.features[:TOP_FEATURES]]
        if importances else [],
    }


def _env():
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    env = Environment(loader=PackageLoader("packager", "templates"),
                      autoescape=select_autoescape(enabled_extensions=("html", "md"),
                                                   default_for_string=True, default=True),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                      keep_trailing_newline=True)
    env.filters["num"] = lambda v, digits=4: "n/a" if v is None else f"{v:.{digits}g}"
    return env


def render(doc: dict[str, Any], fmt: str) -> str:
    """The card document as ``md``, ``html`` or ``json``.

    Raises:
        CardError: an unknown format.
    """
    if fmt == "json":
        return json.dumps(doc, indent=2, sort_keys=True) + "\n"
    if fmt not in FORMATS:
        raise CardError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    return _env().get_template(f"card.{fmt}").render(card=doc)
