"""The calibration map ``edgepack build --eval-data`` fits: on the shipped probabilities of
the held-out rows, into the signed manifest, better than the raw probabilities on rows it
never saw, and shown by ``edgepack inspect``."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LinearRegression, LogisticRegression

from edgefleet.contract.bundle import pack_bundle, read_unverified, verify_bundle
from edgefleet.contract.calibration import MAX_KNOTS, Calibration
from edgefleet.contract.errors import BadSignatureError
from edgefleet.contract.manifest import Manifest
from edgefleet.contract.runtime import ModelRunner, Prediction
from packager import calibrate
from packager.cli import main
from tests.packager.conftest import columns_of, dataset, dump, fit, split, write_csv

SIGNAL = ["s1", "s2"]


def _frame(n: int, seed: int) -> pd.DataFrame:
    """Two informative inputs, 30 pure-noise ones, a noisy label: a barely regularised
    logistic regression on 120 rows of this is over-confident on any other rows."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 32))
    logit = 1.2 * X[:, 0] - 0.8 * X[:, 1]
    y = (rng.uniform(size=n) < 1 / (1 + np.exp(-logit))).astype(int)
    frame = pd.DataFrame(X, columns=SIGNAL + [f"n{i}" for i in range(30)])
    return frame.assign(target=y)


@pytest.fixture(scope="module")
def overconfident(tmp_path_factory):
    d = tmp_path_factory.mktemp("calibrate")
    train, held_out, fresh = _frame(120, 1), _frame(600, 2), _frame(3000, 3)
    inputs = [c for c in train.columns if c != "target"]
    model = fit(LogisticRegression(C=1e4, max_iter=5000), train[inputs], train["target"])
    for name, frame in (("train", train), ("test", held_out)):
        frame.to_csv(d / f"{name}.csv", index=False)
    return {"model": dump(model, d / "model.joblib"), "train": d / "train.csv",
            "test": d / "test.csv", "fresh": fresh, "inputs": inputs, "held_out": held_out}


@pytest.fixture(scope="module")
def built(overconfident, build_key, tmp_path_factory):
    from packager.build import BuildOptions, build

    o = overconfident
    return build(BuildOptions(model=o["model"], train_data=o["train"], eval_data=o["test"],
                              target="target", name="risk", version="1.0.0",
                              key=build_key.private, importances=False,
                              out_dir=tmp_path_factory.mktemp("out"), code_revision="t"))


def _runner(path) -> ModelRunner:
    b = read_unverified(path.read_bytes())
    return ModelRunner(b.manifest, b.member("model.onnx"))


def test_the_map_calibrates_unseen_rows_better_than_the_raw_probabilities(built, overconfident,
                                                                          trust):
    m = verify_bundle(built.path.read_bytes(), trust).manifest
    cal = m.calibration
    assert cal is not None and cal.target == "positive" and cal.rows == 600
    assert cal.method in ("isotonic", "platt") and cal.score is not None
    fresh = overconfident["fresh"]
    p = _runner(built.path).run_columns(columns_of(fresh[overconfident["inputs"]])) \
        .probabilities[:, 1]
    y = fresh["target"].to_numpy().astype(float)
    raw, calibrated = calibrate.brier(p, y), calibrate.brier(cal.apply(p), y)
    assert calibrated < raw - 0.01, (raw, calibrated)  # over-confidence corrected
    # the raw score recorded is the raw probabilities' on the held-out rows
    held = overconfident["held_out"]
    p_held = _runner(built.path).run_columns(columns_of(held[overconfident["inputs"]])) \
        .probabilities[:, 1]
    assert m.metrics[calibrate.RAW_BRIER] == pytest.approx(
        calibrate.brier(p_held, held["target"].to_numpy()), abs=1e-12)
    assert cal.score < m.metrics[calibrate.RAW_BRIER]


def test_the_chosen_method_has_the_lower_cross_validated_score():
    rng = np.random.default_rng(5)
    raw = rng.uniform(size=800)
    truth = np.where(rng.uniform(size=800) < raw ** 3, "b", "a")  # p^3: far from the raw p
    pred = Prediction(np.where(raw > 0.5, "b", "a"), np.column_stack([1 - raw, raw]))
    fitted = calibrate.fit(("a", "b"), pred, truth)
    assert isinstance(fitted, calibrate.Fitted)
    assert fitted.calibration.score == min(fitted.scores.values())
    assert fitted.calibration.method == min(fitted.scores, key=fitted.scores.get)
    if fitted.calibration.method == "isotonic":  # the same map scikit-learn fits
        iso = IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1).fit(
            raw, (truth == "b").astype(float))
        q = np.linspace(0, 1, 101)
        np.testing.assert_allclose(fitted.calibration.apply(q), iso.predict(q), atol=1e-12)
    assert fitted.raw_brier > fitted.calibration.score


def test_multi_class_calibrates_the_top_class_probability(make_bundle, tmp_path):
    X, y = dataset("wine")
    X_train, X_test, y_train, y_test = split(X, y, test_share=0.5)
    model = fit(LogisticRegression(max_iter=50), X_train, y_train)
    result = make_bundle(dump(model, tmp_path / "m.joblib"),
                         write_csv(tmp_path / "train.csv", X_train, y_train),
                         eval_data=write_csv(tmp_path / "test.csv", X_test, y_test),
                         importances=False)
    cal = result.manifest.calibration
    assert cal is not None and cal.target == "top" and cal.rows == len(X_test)


def test_no_map_for_a_regressor_or_without_held_out_rows(make_bundle, tmp_path, capsys):
    X, y = dataset("diabetes")
    reg = make_bundle(dump(fit(LinearRegression(), X, y), tmp_path / "r.joblib"),
                      write_csv(tmp_path / "d.csv", X, y),
                      eval_data=write_csv(tmp_path / "e.csv", X, y), importances=False)
    assert reg.manifest.calibration is None
    assert "calibration" not in reg.manifest.to_dict()  # the old bytes, unchanged
    assert main(["inspect", str(reg.path)]) == 0
    assert "calibration   none (a regressor)" in capsys.readouterr().out

    X, y = dataset("breast_cancer")
    clf = make_bundle(dump(fit(LogisticRegression(max_iter=50), X, y), tmp_path / "c.joblib"),
                      write_csv(tmp_path / "b.csv", X, y), name="nocal", importances=False)
    assert clf.manifest.calibration is None
    assert main(["inspect", str(clf.path)]) == 0
    assert "calibration   none (built without --eval-data" in capsys.readouterr().out


def test_too_few_rows_of_an_outcome_give_no_map():
    p = np.linspace(0.1, 0.9, 50)
    pred = Prediction(np.full(50, "b"), np.column_stack([1 - p, p]))
    why = calibrate.fit(("a", "b"), pred, np.array(["a"] * 49 + ["b"]))
    assert isinstance(why, str) and "occurs 1 time" in why
    assert "at least" in calibrate.fit(("a", "b"), Prediction(
        np.full(5, "b"), np.column_stack([1 - p[:5], p[:5]])), np.array(["a", "b"] * 2 + ["a"]))


def test_thinning_keeps_the_values_at_the_knots_kept():
    x = np.linspace(0, 1, 5000)
    y = np.sort(np.random.default_rng(1).uniform(size=5000))
    tx, ty = calibrate.thin(x, y)
    assert len(tx) == MAX_KNOTS and tx[0] == x[0] and tx[-1] == x[-1]
    np.testing.assert_array_equal(ty, y[np.searchsorted(x, tx)])
    cal = Calibration("isotonic", "positive", tuple(tx), tuple(ty), rows=5000)
    assert Calibration.from_dict(cal.to_dict()) == cal  # within the contract's bound
    small = calibrate.thin(x[:10], y[:10])
    assert small[0] is not None and len(small[0]) == 10 and len(small[1]) == 10


def test_editing_the_map_breaks_verification(built, trust):
    b = read_unverified(built.path.read_bytes())
    files = {k: v for k, v in b.members.items() if k not in ("manifest.json",
                                                               "signatures.json")}
    for edit in (lambda c: c.update(score=0.0), lambda c: c.update(rows=1),
                 lambda c: c.update(method="platt", a=1.0, b=0.0, x=None, y=None)):
        doc = json.loads(b.member("manifest.json"))
        edit(doc["calibration"])
        doc["calibration"] = {k: v for k, v in doc["calibration"].items() if v is not None
                              or k == "score"}
        forged = pack_bundle(Manifest.from_dict(doc), b.envelope, files, b.mtime)
        with pytest.raises(BadSignatureError):
            verify_bundle(forged, trust)


def test_inspect_shows_the_method_rows_and_scores(built, capsys):
    assert main(["inspect", str(built.path)]) == 0
    line = next(t for t in capsys.readouterr().out.splitlines()
                if t.startswith("calibration"))
    m = read_unverified(built.path.read_bytes()).manifest
    c = m.calibration
    assert f"calibration   {c.method}" in line and "target positive" in line
    assert "fitted on 600 held-out rows" in line
    assert f"{m.metrics[calibrate.RAW_BRIER]:.4f} before, {c.score:.4f} after" in line


def test_a_calibrated_model_gets_the_identity_map():
    """Outcomes drawn from the very probabilities: no fitted map beats them out of fold."""
    rng = np.random.default_rng(11)
    raw = rng.uniform(size=400)
    truth = np.where(rng.uniform(size=400) < raw, "b", "a")
    fitted = calibrate.fit(("a", "b"), Prediction(np.where(raw > 0.5, "b", "a"),
                                                  np.column_stack([1 - raw, raw])), truth)
    assert isinstance(fitted, calibrate.Fitted)
    cal = fitted.calibration
    assert min(fitted.scores["isotonic"], fitted.scores["platt"]) > fitted.raw_brier
    assert (cal.method, cal.a, cal.b, cal.score) == ("platt", 1.0, 0.0, fitted.raw_brier)
    np.testing.assert_allclose(cal.apply(raw), raw, atol=1e-9)
