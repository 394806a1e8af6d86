"""The card section and approval statements: exact round trips, and named refusals."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefleet.contract.approval import Approval, SignedApproval, check_approvals, sign_approval
from edgefleet.contract.card import (
    Champion,
    Comparison,
    Estimate,
    Evaluation,
    FairnessCheck,
    FairnessGroup,
    FairnessReport,
    Importance,
    Importances,
    MetricComparison,
    ModelCard,
    PairedTest,
    RuleResult,
    Slice,
    SliceComparison,
    SliceGroup,
    Statement,
    TimeRange,
)
from edgefleet.contract.errors import BadSignatureError, SchemaError
from edgefleet.contract.signing import Envelope, generate_key, trust_from_mapping
from edgefleet.contract.wire import canonical_json, parse_json

text = st.text(max_size=12)
num = st.floats(allow_nan=False, allow_infinity=False, width=64)
opt_num = st.none() | num
dates = st.dates().map(lambda d: d.isoformat()).filter(lambda s: len(s) == 10)
estimates = st.builds(Estimate, text, opt_num, opt_num, opt_num,
                      st.sampled_from(["wilson", "bootstrap", "normal", "none"]))
metric_lists = st.lists(estimates, max_size=3).map(tuple)
rates = st.dictionaries(text, opt_num, max_size=3)
counts = st.none() | st.integers(0, 10**6)
comparisons = st.builds(
    Comparison, text, text, text, text, st.integers(0, 10**6), text,
    st.lists(st.builds(MetricComparison, text, st.sampled_from(["higher", "lower"]), opt_num,
                       opt_num, opt_num, opt_num, opt_num), max_size=3).map(tuple),
    st.builds(PairedTest, st.sampled_from(["mcnemar_exact", "paired_bootstrap"]), text,
              opt_num, counts, counts),
    st.lists(st.builds(RuleResult, text, text, st.sampled_from(["absolute", "relative",
                                                                 "ratio"]),
                       opt_num, st.booleans(), st.none() | st.booleans(), st.booleans()),
             max_size=3).map(tuple),
    st.booleans(),
    st.lists(st.builds(SliceComparison, text, text, st.integers(0, 999), opt_num, opt_num,
                       opt_num, st.booleans()), max_size=3).map(tuple),
    num, st.lists(text, max_size=3).map(tuple), st.booleans(),
    st.sampled_from(["win", "lose"]), st.lists(text, max_size=3).map(tuple), st.booleans())
cards = st.builds(
    ModelCard,
    statement=st.none() | st.builds(Statement, text, text, text, text, text, text,
                                    st.none() | dates),
    data_columns=st.lists(text, max_size=4).map(tuple),
    time_range=st.none() | st.builds(TimeRange, text, text, text),
    evaluation=st.none() | st.builds(Evaluation, st.sampled_from(["held_out", "training"]),
                                     text, st.integers(0, 10**6), metric_lists),
    slices=st.lists(st.builds(Slice, text, st.sampled_from(["categorical", "quantiles"]), text,
                              st.lists(st.builds(SliceGroup, text, st.integers(0, 999),
                                                 metric_lists), max_size=3).map(tuple),
                              st.none() | text), max_size=2).map(tuple),
    fairness=st.lists(st.builds(FairnessReport, text, st.booleans(), st.none() | text,
                                st.lists(st.builds(FairnessGroup, text, st.integers(0, 999),
                                                   rates), max_size=3).map(tuple), rates),
                      max_size=2).map(tuple),
    checks=st.lists(st.builds(FairnessCheck, text, text, opt_num, num,
                              st.sampled_from(["max", "min"]), st.booleans()),
                    max_size=2).map(tuple),
    forced=st.booleans(),
    champion=st.none() | st.builds(Champion, text, text, text, text, opt_num, opt_num,
                                   opt_num, st.booleans(), metric_lists,
                                   st.none() | comparisons),
    importances=st.none() | st.builds(Importances, text, st.integers(1, 50),
                                      st.integers(0, 99),
                                      st.lists(st.builds(Importance, text, num, num, num, num),
                                               max_size=3).map(tuple)),
)


@settings(max_examples=150, deadline=None)
@given(cards)
def test_card_round_trips_through_canonical_json(card):
    data = canonical_json(card.to_dict())
    back = ModelCard.from_dict(parse_json(data, what="card", max_bytes=1 << 22))
    assert back == card
    assert canonical_json(back.to_dict()) == data


def _card_doc() -> dict:
    comparison = Comparison(
        "m", "2.0.0", "c" * 64, "b" * 64, 10, "d" * 64,
        (MetricComparison("accuracy", "higher", 0.5, 0.6, 0.1, 0.0, 0.2),),
        PairedTest("mcnemar_exact", "accuracy", 0.3, 1, 2),
        (RuleResult("accuracy>=+0.01", "accuracy", "absolute", 0.1, True, False, False),),
        False, (), 0.02, (), False, "lose", ("not significant",), False)
    return ModelCard(statement=Statement(owner="a", review_by="2027-01-31"),
                     evaluation=Evaluation("held_out", "0" * 64, 10,
                                           (Estimate("accuracy", 0.5, 0.2, 0.8, "wilson"),)),
                     champion=Champion("m", "1.0.0", "a" * 64, "accuracy", 0.1, 0.0, 0.2,
                                       False, (), comparison),
                     ).to_dict()


def test_a_champion_of_the_old_shape_keeps_its_bytes():
    """Bundles in the field carry champions without a comparison: same bytes, still read."""
    old = {"name": "m", "version": "1.0.0", "bundle_sha256": "a" * 64, "metric": "accuracy",
           "delta": 0.01, "low": -0.01, "high": 0.03, "won": True, "metrics": []}
    champion = Champion.from_dict(old, "manifest.card.champion")
    assert champion.comparison is None
    assert canonical_json(champion.to_dict()) == canonical_json(old)


BAD = [
    ("unknown-field", lambda d: d.update(extra=1), "manifest.card: unknown field(s) 'extra'"),
    ("schema", lambda d: d.update(schema=2), "manifest.card.schema"),
    ("statement-key", lambda d: d["statement"].update(limitation="x"),
     "manifest.card.statement: unknown field(s) 'limitation'"),
    ("review-date", lambda d: d["statement"].update(review_by="2027-02-30"),
     "manifest.card.statement.review_by"),
    ("nan-as-string", lambda d: d["evaluation"]["metrics"][0].update(value="NaN"),
     "manifest.card.evaluation.metrics[0].value"),
    ("method", lambda d: d["evaluation"]["metrics"][0].update(method="guess"),
     "manifest.card.evaluation.metrics[0].method"),
    ("text-too-long", lambda d: d["statement"].update(owner="x" * 5000),
     "manifest.card.statement.owner"),
    ("verdict", lambda d: d["champion"]["comparison"].update(verdict="maybe"),
     "manifest.card.champion.comparison.verdict"),
    ("count", lambda d: d["champion"]["comparison"]["test"].update(champion_only=-1),
     "manifest.card.champion.comparison.test.champion_only"),
    ("significant", lambda d: d["champion"]["comparison"]["rules"][0].update(significant=1),
     "manifest.card.champion.comparison.rules[0].significant"),
    ("null-comparison", lambda d: d["champion"].update(comparison=None),
     "manifest.card.champion.comparison"),
]


@pytest.mark.parametrize("edit, fault", [(e, f) for _, e, f in BAD], ids=[i for i, _, _ in BAD])
def test_a_bad_card_is_refused_naming_the_field(edit, fault):
    doc = _card_doc()
    edit(doc)
    with pytest.raises(SchemaError) as err:
        ModelCard.from_dict(doc)
    assert fault in str(err.value)


approvals = st.builds(Approval, st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
                      st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
                      st.text(min_size=1, max_size=32), st.text(max_size=64), text,
                      st.none() | dates)


@settings(max_examples=100, deadline=None)
@given(approvals, st.binary(min_size=64, max_size=64))
def test_approval_round_trips_in_the_envelope(statement, sig):
    env = Envelope(approvals=(SignedApproval(statement, sig),))
    assert Envelope.from_bytes(env.to_bytes()) == env


def test_an_envelope_without_approvals_keeps_its_bytes():
    assert b"approvals" not in Envelope().to_bytes()


def test_approvals_verify_only_for_their_manifest_and_unaltered():
    key = generate_key()
    trust = trust_from_mapping({"ana": key.public_key()}, role="approver")
    signed = sign_approval(key, b"manifest-1", role="approver", comment="ok",
                           signed_at="2026-12-06T00:00:00Z", review_by="2027-06-30")
    (checked,) = check_approvals((signed,), b"manifest-1", trust)
    assert (checked.name, checked.role_confirmed) == ("ana", True)
    with pytest.raises(BadSignatureError, match="approves another manifest"):
        check_approvals((signed,), b"manifest-2", trust)
    altered = SignedApproval(Approval(**{**signed.statement.__dict__, "comment": "no"}),
                             signed.sig)
    with pytest.raises(BadSignatureError, match=r"approval 0 .* does not verify"):
        check_approvals((altered,), b"manifest-1", trust)
    (unknown,) = check_approvals((signed,), b"manifest-2", trust_from_mapping({}))
    assert unknown.trusted is False and unknown.name == ""
    with pytest.raises(SchemaError, match="review-by"):
        sign_approval(key, b"m", role="approver", comment="", signed_at="t",
                      review_by="tomorrow")
