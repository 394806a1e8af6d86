"""The model card: built by ``edgepack build``, signed in the manifest, rendered, approved.

The numbers in the card are checked against scikit-learn, scipy and fairlearn computed
here on the same rows with the predictions of the shipped model (run by the device's own
runner), so the card cannot drift from the libraries it cites.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import warnings
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from fairlearn.metrics import (
    MetricFrame,
    demographic_parity_difference,
    demographic_parity_ratio,
    equalized_odds_difference,
    false_positive_rate,
    selection_rate,
    true_positive_rate,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import binomtest
from sklearn.base import BaseEstimator
from sklearn.inspection import permutation_importance
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score

from edgefleet.contract.bundle import pack_bundle, read_unverified, verify_bundle
from edgefleet.contract.errors import BadSignatureError, BundleError
from edgefleet.contract.manifest import Manifest
from edgefleet.contract.runtime import ModelRunner
from edgefleet.contract.signing import TrustStore
from packager.card import card_document, load_card, render
from packager.cli import main
from packager.errors import BuildError, CardError, FairnessError
from packager.evaluate import parse_gaps
from tests.packager.conftest import EPOCH, dump, fit

FEATURES = ["x1", "x2", "x3"]
HOSTILE = "<script>alert('owned')</script> & \"co\""


def _frame(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    sex = rng.choice(["f", "m"], size=n, p=[0.4, 0.6])
    region = rng.choice(["east", "north", "south"], size=n)
    x1 = rng.normal(size=n) + np.where(sex == "m", 0.8, 0.0)  # the model sees sex through x1
    x2 = rng.normal(size=n)
    x3 = rng.uniform(-1, 1, size=n)
    logit = 1.5 * x1 - 1.0 * x2 + 0.3 * x3 + rng.normal(scale=0.8, size=n)
    return pd.DataFrame({"x1": x1, "x2": x2, "x3": x3, "sex": sex, "region": region,
                         "target": (logit > 0.4).astype(int)})


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("card")
    train, test = _frame(400, 1), _frame(240, 2)
    model = fit(LogisticRegression(max_iter=200), train[FEATURES], train["target"])
    train.to_csv(d / "train.csv", index=False)
    test.to_csv(d / "test.csv", index=False)
    (d / "card.toml").write_text(
        f'owner = "{HOSTILE.replace(chr(34), chr(92) + chr(34))}"\n'
        'contact = "risk-ml@example.com"\nintended_use = "Rank applications for review"\n'
        'out_of_scope = "Automatic refusals"\nlimitations = "Synthetic data"\n'
        'ethical_considerations = "Gaps between sexes are reported"\n'
        "review_by = 2027-06-30\n")
    return {"dir": d, "model": dump(model, d / "model.joblib"), "est": model,
            "train": d / "train.csv", "test": d / "test.csv", "card": d / "card.toml",
            "test_frame": test}


@pytest.fixture(scope="module")
def built(files, build_key, tmp_path_factory, monkeypatch_module):
    from packager.build import BuildOptions, build

    monkeypatch_module.setenv("SOURCE_DATE_EPOCH", EPOCH)
    return build(BuildOptions(
        model=files["model"], train_data=files["train"], eval_data=files["test"],
        target="target", name="credit", version="1.0.0", key=build_key.private,
        out_dir=tmp_path_factory.mktemp("out"), code_revision="test", card=files["card"],
        slice_by=("region", "x1"), sensitive=("sex",),
        fairness_bounds=parse_gaps(["demographic_parity_difference=0.9"])))


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def shipped(files, built):
    """The shipped model's labels on the held-out rows, and the rows."""
    test = files["test_frame"]
    data = built.path.read_bytes()
    runner = ModelRunner(read_unverified(data).manifest,
                         read_unverified(data).member("model.onnx"))
    cols = {n: test[n].to_numpy(dtype=np.float64) for n in FEATURES}
    labels = np.asarray(runner.run_columns(cols).labels).astype(int)
    # the same labels as scikit-learn's: so these are scikit-learn's numbers on these rows
    assert (labels == files["est"].predict(test[FEATURES])).all()
    return test, labels, runner


def test_card_holds_the_libraries_exact_numbers(built, shipped, trust):
    test, pred, _ = shipped
    y = test["target"].to_numpy()
    card = verify_bundle(built.path.read_bytes(), trust).manifest.card
    ev = card.evaluation
    assert (ev.data, ev.rows) == ("held_out", 240)
    acc = ev.metric("accuracy")
    assert acc.value == accuracy_score(y.astype(str), pred.astype(str))
    ci = binomtest(int((y == pred).sum()), len(y)).proportion_ci(method="wilson")
    assert (acc.low, acc.high) == pytest.approx((ci.low, ci.high), abs=1e-12)
    assert ev.metric("f1_macro").value == f1_score(y.astype(str), pred.astype(str),
                                                   average="macro")
    assert ev.metric("f1_macro").low <= ev.metric("f1_macro").value <= ev.metric("f1_macro").high

    region = next(s for s in card.slices if s.column == "region")
    assert [g.value for g in region.groups] == ["east", "north", "south"]
    for g in region.groups:
        mask = (test["region"] == g.value).to_numpy()
        assert g.n == mask.sum()
        assert g.metric("accuracy").value == accuracy_score(y[mask], pred[mask])
    worst = min(region.groups, key=lambda g: g.metric("accuracy").value)
    assert region.worst == worst.value
    binned = next(s for s in card.slices if s.column == "x1")
    assert binned.binning == "quantiles" and sum(g.n for g in binned.groups) == 240

    (sex,) = card.fairness
    assert sex.column == "sex" and sex.model_input is False and sex.positive_label == "1"
    s = test["sex"].to_numpy()
    frame = MetricFrame(metrics={"selection_rate": selection_rate,
                                 "true_positive_rate": true_positive_rate,
                                 "false_positive_rate": false_positive_rate},
                        y_true=y, y_pred=pred, sensitive_features=s)
    for g in sex.groups:
        assert g.n == (s == g.value).sum()
        for k, v in g.rates.items():
            assert v == frame.by_group.loc[g.value, k], (g.value, k)
    assert sex.gaps == {
        "demographic_parity_difference": demographic_parity_difference(
            y, pred, sensitive_features=s),
        "demographic_parity_ratio": demographic_parity_ratio(y, pred, sensitive_features=s),
        "equalized_odds_difference": equalized_odds_difference(y, pred, sensitive_features=s)}
    assert sex.gaps["demographic_parity_difference"] > 0.1  # the data is built biased
    (check,) = card.checks
    assert (check.gap, check.bound, check.passed) == ("demographic_parity_difference", 0.9,
                                                      True)
    assert card.statement.owner == HOSTILE and card.statement.review_by == "2027-06-30"
    assert card.data_columns == ("x1", "x2", "x3", "sex", "region", "target")


def test_importances_are_scikit_learns(built, shipped, trust):
    test, _, runner = shipped

    class Shipped(BaseEstimator):  # the test's own wrapper of the device runner
        def fit(self, *_):
            return self

        def predict(self, frame):
            cols = {c: frame[c].to_numpy(dtype=np.float64) for c in frame.columns}
            return np.asarray(runner.run_columns(cols).labels).astype(str)

    imp = verify_bundle(built.path.read_bytes(), trust).manifest.card.importances
    want = permutation_importance(Shipped(), test[FEATURES], test["target"].astype(str),
                                  scoring="accuracy", n_repeats=imp.repeats,
                                  random_state=imp.seed)
    got = {i.feature: i for i in imp.features}
    for j, name in enumerate(FEATURES):
        assert got[name].mean == want.importances_mean[j]
        assert got[name].std == want.importances_std[j]
        assert got[name].low <= got[name].mean <= got[name].high
    assert imp.features[0].feature == "x1"  # the strongest coefficient


def _tamper(data: bytes, edit) -> bytes:
    b = read_unverified(data)
    doc = json.loads(b.member("manifest.json"))
    edit(doc["card"])
    manifest = Manifest.from_dict(doc)
    files = {k: v for k, v in b.members.items() if k not in ("manifest.json",
                                                               "signatures.json")}
    return pack_bundle(manifest, b.envelope, files, b.mtime)


EDITS = {
    "accuracy": lambda c: c["evaluation"]["metrics"][0].update(value=0.999),
    "slice n": lambda c: c["slices"][0]["groups"][0].update(n=1),
    "worst slice": lambda c: c.update(slices=[{**c["slices"][0], "worst": "north"}]),
    "fairness gap": lambda c: c["fairness"][0]["gaps"].update(
        demographic_parity_difference=0.01),
    "group rate": lambda c: c["fairness"][0]["groups"][0]["rates"].update(selection_rate=0.5),
    "check passed": lambda c: c["checks"][0].update(passed=False),
    "importance": lambda c: c["importances"]["features"][0].update(mean=0.0),
    "review date": lambda c: c["statement"].update(review_by="2099-01-01"),
    "forced": lambda c: c.update(forced=True),
}


@pytest.mark.parametrize("what", list(EDITS))
def test_editing_any_number_breaks_verification(built, trust, what):
    data = _tamper(built.path.read_bytes(), EDITS[what])
    with pytest.raises(BadSignatureError):
        verify_bundle(data, trust)


def test_a_manifest_without_a_card_keeps_its_bytes(built):
    m = replace(read_unverified(built.path.read_bytes()).manifest, card=None)
    assert "card" not in m.to_dict()
    assert Manifest.from_bytes(m.to_bytes()) == m


def test_a_fairness_gap_past_its_bound_fails_the_build(files, make_bundle):
    opts = {"eval_data": files["test"], "sensitive": ("sex",),
            "fairness_bounds": parse_gaps(["demographic_parity_difference=0.05",
                                           "demographic_parity_ratio=0.2"])}
    with pytest.raises(FairnessError) as err:
        make_bundle(files["model"], files["train"], **opts)
    assert "demographic_parity_difference" in str(err.value) and "'sex'" in str(err.value)
    assert "FAILED" in err.value.table and "ok" in err.value.table
    forced = make_bundle(files["model"], files["train"], force=True, **opts).manifest.card
    assert forced.forced is True
    assert [(c.gap, c.passed) for c in forced.checks] == [
        ("demographic_parity_difference", False), ("demographic_parity_ratio", True)]


def test_cli_fairness_failure_prints_the_table(files, build_key, tmp_path, capsys):
    code = main(["build", str(files["model"]), "--train-data", str(files["train"]),
                 "--eval-data", str(files["test"]), "--target", "target", "--name", "m",
                 "--version", "1.0.0", "--key", str(build_key.private), "--out",
                 str(tmp_path), "--sensitive", "sex",
                 "--max-fairness-gap", "equalized_odds_difference=0.01", "--no-importances"])
    err = capsys.readouterr().err
    assert code == 6
    assert "equalized_odds_difference" in err and "FAILED" in err
    assert not list(tmp_path.glob("*.edgebundle"))


@pytest.mark.parametrize("text, fault", [
    ('owner = "a"\nlimitation = "typo"\n', "'limitation'"),
    ("owner = 3\n", "owner must be text"),
    ('review_by = "30/06/2027"\n', "not a date"),
    ('review_by = "2027-02-30"\n', "not a calendar date"),
    ("owner = \n", "not a TOML file"),
], ids=["unknown-key", "not-text", "bad-date", "no-such-day", "not-toml"])
def test_a_bad_card_file_is_refused_naming_the_fault(tmp_path, text, fault):
    path = tmp_path / "card.toml"
    path.write_text(text)
    with pytest.raises(CardError, match=fault):
        load_card(path)


def test_bad_options_are_refused(files, make_bundle):
    with pytest.raises(BuildError, match="'nope'"):
        make_bundle(files["model"], files["train"], eval_data=files["test"],
                    slice_by=("nope",))
    with pytest.raises(BuildError, match="bounds the gaps of --sensitive"):
        make_bundle(files["model"], files["train"], eval_data=files["test"],
                    fairness_bounds={"demographic_parity_difference": 0.1})
    with pytest.raises(BuildError, match="--time-column 'when'"):
        make_bundle(files["model"], files["train"], time_column="when")
    with pytest.raises(BuildError, match="unknown bound 'parity'"):
        parse_gaps(["parity=0.1"])
    with pytest.raises(BuildError, match="not a gap of a classification"):
        make_bundle(files["model"], files["train"], eval_data=files["test"],
                    sensitive=("sex",),
                    fairness_bounds={"mean_absolute_error_difference": 1.0})


def test_regressor_card_has_error_gaps_and_a_time_range(tmp_path, make_bundle):
    from sklearn.linear_model import Ridge
    from sklearn.metrics import mean_absolute_error

    from tests.packager.conftest import dataset, split, write_csv

    X, y = dataset("diabetes")
    X_train, X_test, y_train, y_test = split(X, y)
    model = dump(fit(Ridge(), X_train, y_train), tmp_path / "ridge.joblib")
    result = make_bundle(model, write_csv(tmp_path / "train.csv", X_train, y_train),
                         eval_data=write_csv(tmp_path / "test.csv", X_test, y_test),
                         sensitive=("sex",), slice_by=("age",), time_column="age",
                         fairness_bounds=parse_gaps(["mean_absolute_error_difference=1000"]))
    card = result.manifest.card
    runner = ModelRunner(result.manifest, read_unverified(result.path.read_bytes())
                         .member("model.onnx"))
    pred = runner.run_columns({c: X_test[c].to_numpy(dtype=np.float64)
                               for c in X_test.columns}).values
    truth = y_test.to_numpy(dtype=np.float64)
    assert card.evaluation.metric("mae").value == mean_absolute_error(truth, pred)
    (sex,) = card.fairness
    assert sex.model_input is True and sex.positive_label is None
    per_group = []
    for g in sex.groups:
        mask = (X_test["sex"] == float(g.value)).to_numpy()
        per_group.append(mean_absolute_error(truth[mask], pred[mask]))
        assert g.rates["mean_absolute_error"] == per_group[-1]
    assert sex.gaps["mean_absolute_error_difference"] == max(per_group) - min(per_group)
    age = card.slices[0]
    assert age.metric == "mae" and age.worst == max(
        age.groups, key=lambda g: g.metric("mae").value).value
    assert card.time_range.column == "age"
    assert float(card.time_range.start) == X_train["age"].min()
    assert float(card.time_range.end) == X_train["age"].max()
    assert card.checks[0].passed and card.importances.scoring == "r2"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abc"), st.sampled_from("abcd")), min_size=1,
                max_size=40),
       st.lists(st.floats(-1e3, 1e3), min_size=4, max_size=40))
def test_the_bootstraps_counts_give_scikit_learns_metrics(pairs, values):
    """Each bootstrap resample is scored from counts; each must equal the library's score."""
    from sklearn.metrics import r2_score

    from packager.evaluate import _f1_macro, _r2

    truth, got = (np.array(x) for x in zip(*pairs, strict=True))
    labels, codes = np.unique(np.concatenate([truth, got]), return_inverse=True)
    k, n = len(labels), len(truth)
    confusion = np.bincount(codes[:n] * k + codes[n:], minlength=k * k).reshape(k, k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zero_division warnings: the score is still 0
        assert _f1_macro(confusion) == pytest.approx(f1_score(truth, got, average="macro"),
                                                     abs=1e-12)
    y = np.array(values)
    yhat = y[::-1] * 0.5
    assert _r2(y, (y - yhat) ** 2) == pytest.approx(r2_score(y, yhat), abs=1e-9)


def test_a_champion_is_compared_on_the_same_rows(files, built, make_bundle, shipped,
                                                 tmp_path):
    """A weaker challenger (two inputs) against the card's model as champion."""
    test, champ_pred, _ = shipped
    train = pd.read_csv(files["train"])
    weak = fit(LogisticRegression(), train[["x2", "x3"]], train["target"])
    # another schema (x1 removed) and a loss: built only when both are declared
    result = make_bundle(dump(weak, tmp_path / "weak.joblib"), files["train"],
                         eval_data=files["test"], champion=built.path, importances=False,
                         allow_schema_change=True, force=True)
    c = result.manifest.card.champion
    y = test["target"].to_numpy()
    ours = weak.predict(test[["x2", "x3"]])
    assert (c.name, c.version, c.metric) == ("credit", "1.0.0", "accuracy")
    assert c.bundle_sha256 == hashlib.sha256(built.path.read_bytes()).hexdigest()
    assert c.delta == accuracy_score(y, ours) - accuracy_score(y, champ_pred)
    assert c.delta < 0 and c.won is False and c.low <= c.delta <= c.high
    assert c.metrics[0].value == accuracy_score(y, champ_pred)
    md = render(card_document(read_unverified(result.path.read_bytes())), "md")
    assert "Against the champion credit 1.0.0" in md and "NOT won" in md
    assert c.comparison.schema_changes == ("feature 'x1' removed",)
    assert c.comparison.forced is True
    with pytest.raises(BuildError, match="needs the labels"):
        make_bundle(files["model"], files["train"], target=None, champion=built.path,
                    eval_data=files["test"])


# --------------------------------------------------------------------------- rendering


def test_card_renders_in_every_format(built, trust):
    doc = card_document(read_unverified(built.path.read_bytes()), trust)
    html = render(doc, "html")
    assert "<script>alert" not in html
    assert "&lt;script&gt;alert(&#39;owned&#39;)&lt;/script&gt; &amp; &#34;co&#34;" in html
    region = next(s for s in doc["slices"] if s["column"] == "region")
    assert f"worst by accuracy: {region['worst']}" in html
    md = render(doc, "md")
    assert "<script>" not in md and "&lt;script&gt;" in md
    for text in (html, md):
        for heading in ("Who approved it", "What data trained it", "How it was evaluated",
                        "What biases were tested", "When it is reviewed next",
                        "How its decisions can be explained"):
            assert heading in text
        assert "2027-06-30" in text and "demographic_parity_difference" in text
    back = json.loads(render(doc, "json"))
    assert back["statement"]["owner"] == HOSTILE
    assert back["fairness"][0]["gaps"]["demographic_parity_ratio"] == \
        doc["fairness"][0]["gaps"]["demographic_parity_ratio"]


def test_a_build_without_a_card_file_says_so(files, make_bundle, capsys):
    result = make_bundle(files["model"], files["train"], importances=False)
    assert result.manifest.card.statement is None
    assert result.manifest.card.evaluation.data == "training"
    assert main(["inspect", str(result.path)]) == 0
    assert "NO CARD FILE" in capsys.readouterr().out
    assert "No card file was given" in render(
        card_document(read_unverified(result.path.read_bytes())), "md")


# --------------------------------------------------------------------------- approvals


def test_approvals_are_signed_listed_with_names_and_renew_the_review(
        built, approver_key, build_key, tmp_path, capsys):
    bundle = tmp_path / "approved.edgebundle"
    bundle.write_bytes(built.path.read_bytes())
    assert main(["sign", str(bundle), "--key", str(approver_key.private), "--role", "approver",
                 "--comment", "fairness gaps reviewed <ok>", "--review-by", "2027-12-31"]) == 0
    capsys.readouterr()
    trust_args = ["--trust", f"build={build_key.public}",
                  "--trust", f"approver={approver_key.public}"]
    assert main(["inspect", str(bundle), *trust_args]) == 0
    out = capsys.readouterr().out
    assert "approver (approver)" in out and "fairness gaps reviewed <ok>" in out
    assert "review by 2027-12-31" in out
    assert main(["inspect", str(bundle), "--json", *trust_args]) == 0
    (a,) = json.loads(capsys.readouterr().out)["approvals"]
    assert (a["keyid"], a["name"], a["role"], a["role_confirmed"]) == (
        approver_key.keyid, "approver", "approver", True)
    # the policy can now ask for both roles
    store = TrustStore.from_files([f"build={build_key.public}",
                                   f"approver={approver_key.public}"])
    from edgefleet.contract.signing import Policy

    verify_bundle(bundle.read_bytes(), store, Policy(2, frozenset({"build", "approver"})))
    assert main(["verify", str(bundle), *trust_args, "--require-role", "approver"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("approved by approver as approver at ")
    assert lines[1].endswith(", review by 2027-12-31: fairness gaps reviewed <ok>")
    assert main(["card", str(bundle), "--format", "md", *trust_args]) == 0
    md = capsys.readouterr().out
    assert "fairness gaps reviewed &lt;ok&gt;" in md
    # the approval's date renews the card's
    assert "## 5. When it is reviewed next\n\n2027-12-31" in md


def test_an_altered_approval_breaks_verification(built, approver_key, build_key, tmp_path):
    bundle = tmp_path / "approved.edgebundle"
    bundle.write_bytes(built.path.read_bytes())
    assert main(["sign", str(bundle), "--key", str(approver_key.private), "--role", "approver",
                 "--comment", "approved"]) == 0
    raw = bundle.read_bytes()
    members = {}
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:gz") as tar:
        for info in tar:
            members[info.name] = tar.extractfile(info).read()
    members["signatures.json"] = members["signatures.json"].replace(b'"approved"',
                                                                    b'"rejected"')
    b = read_unverified(raw)
    files = {k: v for k, v in members.items() if k not in ("manifest.json", "signatures.json")}
    from edgefleet.contract.signing import Envelope

    forged = pack_bundle(b.manifest, Envelope.from_bytes(members["signatures.json"]), files,
                         b.mtime)
    store = TrustStore.from_files([f"build={build_key.public}",
                                   f"approver={approver_key.public}"])
    with pytest.raises(BadSignatureError, match="approval 0"):
        verify_bundle(forged, store)
    with pytest.raises(BundleError):
        card_document(read_unverified(forged), store)


def test_comment_without_role_is_a_usage_error(built, approver_key):
    assert main(["sign", str(built.path), "--key", str(approver_key.private),
                 "--comment", "x"]) == 2
