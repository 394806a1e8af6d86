"""Champion vs challenger (``edgepack build --champion``): a better model passes, a worse one
fails with its own exit status and a table, a tie that is not significant fails, a slice
regression fails non-inferiority, schema changes are refused unless declared, bad rules are
named, and the whole comparison is signed.

The numbers are checked against scikit-learn and scipy computed here on the same rows with
the shipped models' predictions (run by the device's own runner)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binomtest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score
from sklearn.tree import DecisionTreeClassifier

from edgefleet.cli import GATE
from edgefleet.contract.bundle import pack_bundle, read_unverified, verify_bundle
from edgefleet.contract.card import ModelCard
from edgefleet.contract.errors import BadSignatureError, SignatureError
from edgefleet.contract.manifest import Manifest
from edgefleet.contract.runtime import ModelRunner, Prediction
from packager import champion as compare
from packager.build import BuildOptions, build
from packager.cli import main
from packager.errors import (
    BuildError,
    ChampionLostError,
    PromotionRuleError,
    SchemaChangeError,
)
from tests.packager.conftest import columns_of, dump, fit

FEATURES = ["x1", "x2", "x3"]


def _frame(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x1, x2, x3, x4 = (rng.normal(size=n) for _ in range(4))
    logit = 1.5 * x1 - 1.2 * x2 + 0.8 * x3 + rng.normal(scale=0.6, size=n)
    region = rng.choice(["north", "east", "south"], size=n, p=[0.2, 0.4, 0.4])
    return pd.DataFrame({"x1": x1, "x2": x2, "x3": x3, "x4": x4, "region": region,
                         "target": (logit > 0).astype(int)})


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("champion")
    train, test = _frame(800, 1), _frame(600, 2)
    strong = fit(LogisticRegression(max_iter=300), train[FEATURES], train["target"])
    weak = fit(DecisionTreeClassifier(max_depth=1, random_state=0), train[FEATURES],
               train["target"])
    wider = fit(LogisticRegression(max_iter=300), train[[*FEATURES, "x4"]], train["target"])
    # nearly the strong model: a handful of rows answered differently
    twin = fit(LogisticRegression(C=0.01, max_iter=300), train[FEATURES], train["target"])
    train.to_csv(d / "train.csv", index=False)
    test.to_csv(d / "test.csv", index=False)
    return {"dir": d, "train": d / "train.csv", "test": d / "test.csv", "test_frame": test,
            "strong": strong, "weak": weak,
            "strong_path": dump(strong, d / "strong.joblib"),
            "weak_path": dump(weak, d / "weak.joblib"),
            "wider_path": dump(wider, d / "wider.joblib"),
            "twin": twin, "twin_path": dump(twin, d / "twin.joblib")}


def _build(work, key, model: str, version: str, out, **options) -> object:
    options.setdefault("importances", False)
    return build(BuildOptions(model=work[f"{model}_path"], train_data=work["train"],
                              eval_data=work["test"], target="target", name="churn",
                              version=version, key=key.private, out_dir=out,
                              code_revision="t", **options))


@pytest.fixture(scope="module")
def champions(work, build_key, tmp_path_factory):
    """The weak and the strong model as bundles (the champions of the tests)."""
    out = tmp_path_factory.mktemp("champions")
    return {"weak": _build(work, build_key, "weak", "1.0.0", out / "weak").path,
            "strong": _build(work, build_key, "strong", "1.0.0", out / "strong").path}


@pytest.fixture(scope="module")
def better(work, build_key, champions, tmp_path_factory):
    return _build(work, build_key, "strong", "2.0.0", tmp_path_factory.mktemp("better"),
                  champion=champions["weak"], slice_by=("region",),
                  promote_if=("accuracy>=+0.02", "f1_macro>=+2%", "size<=10x"))


def test_a_better_model_passes_with_the_libraries_numbers(work, champions, better, trust):
    c = verify_bundle(better.path.read_bytes(), trust).manifest.card.champion
    test = work["test_frame"]
    y = test["target"].to_numpy()
    ours, theirs = work["strong"].predict(test[FEATURES]), work["weak"].predict(test[FEATURES])
    cmp = c.comparison
    assert c.won is True and cmp.verdict == "win" and cmp.reasons == () and not cmp.forced
    assert (c.name, c.version) == ("churn", "1.0.0")
    assert (cmp.challenger_name, cmp.challenger_version) == ("churn", "2.0.0")
    champ = read_unverified(champions["weak"].read_bytes())
    assert c.bundle_sha256 == champ.sha256
    assert cmp.champion_model_sha256 == champ.manifest.file("model.onnx").sha256
    assert cmp.challenger_model_sha256 == better.manifest.file("model.onnx").sha256
    acc = cmp.metric("accuracy")
    assert acc.champion == accuracy_score(y, theirs) and acc.challenger == accuracy_score(y, ours)
    assert acc.delta == pytest.approx(acc.challenger - acc.champion, abs=1e-15)
    assert acc.low <= acc.delta <= acc.high and acc.low > 0
    assert cmp.metric("size").champion == champ.manifest.file("model.onnx").size
    assert cmp.metric("latency_p95").champion > 0
    # McNemar's exact test, computed here
    b = int(np.sum((theirs == y) & (ours != y)))
    k = int(np.sum((ours == y) & (theirs != y)))
    assert (cmp.test.champion_only, cmp.test.challenger_only) == (b, k)
    assert cmp.test.p_value == pytest.approx(binomtest(k, b + k, 0.5).pvalue, rel=1e-12)
    assert cmp.test.p_value < 0.05
    assert [(r.rule, r.passed, r.significant) for r in cmp.rules] == [
        ("accuracy>=+0.02", True, True), ("f1_macro>=+2%", True, True),
        ("size<=10x", True, None)]
    assert {s.value for s in cmp.slices} == {"north", "east", "south"}
    assert all(s.passed for s in cmp.slices)


def test_a_worse_model_fails_with_its_own_exit_status_and_a_table(work, champions, build_key,
                                                                  tmp_path, capsys):
    with pytest.raises(ChampionLostError) as err:
        _build(work, build_key, "weak", "2.0.0", tmp_path / "direct",
               champion=champions["strong"])
    assert "does not beat the champion churn 1.0.0" in str(err.value)
    assert "rule accuracy>=+0: observed -" in str(err.value)
    assert not (tmp_path / "direct").exists() or not list((tmp_path / "direct").iterdir())

    out = tmp_path / "cli"
    args = ["build", str(work["weak_path"]), "--train-data", str(work["train"]),
            "--eval-data", str(work["test"]), "--target", "target", "--name", "churn",
            "--version", "2.0.0", "--key", str(build_key.private), "--out", str(out),
            "--no-importances", "--champion", str(champions["strong"])]
    assert main(args) == GATE == 6  # refused by a check
    err_text = capsys.readouterr().err
    assert "edgepack: error: churn 2.0.0 does not beat the champion" in err_text
    assert "accuracy>=+0" in err_text and "FAIL" in err_text
    assert "verdict    LOSE" in err_text and "McNemar exact" in err_text
    assert not out.exists() or not list(out.glob("*.edgebundle"))

    # --force builds it and records that it was forced; inspect shows the table
    assert main([*args, "--force"]) == 0
    capsys.readouterr()
    bundle = out / "churn-2.0.0.edgebundle"
    c = read_unverified(bundle.read_bytes()).manifest.card.champion
    assert c.won is False and c.comparison.forced is True and c.comparison.verdict == "lose"
    assert main(["inspect", str(bundle)]) == 0
    text = capsys.readouterr().out
    assert "champion churn 1.0.0: accuracy difference -" in text and "NOT won" in text
    assert "verdict    LOSE" in text and "FORCED" in text


def test_a_tie_that_is_not_significant_fails_the_build(work, champions, build_key, tmp_path):
    test = work["test_frame"]
    y = test["target"].to_numpy()
    ours, theirs = work["twin"].predict(test[FEATURES]), work["strong"].predict(test[FEATURES])
    k, b = int(np.sum((ours == y) & (theirs != y))), int(np.sum((theirs == y) & (ours != y)))
    assert k > b and k + b < 10  # a little better on paper, by a handful of rows
    with pytest.raises(ChampionLostError, match=r"accuracy>=\+0\.001: met but not "
                                                r"significant \(McNemar p = 1\)"):
        _build(work, build_key, "twin", "2.0.0", tmp_path, champion=champions["strong"],
               promote_if=("accuracy>=+0.001",))
    # not worse, which is all the default rule asks
    result = _build(work, build_key, "twin", "2.0.0", tmp_path, champion=champions["strong"])
    assert result.manifest.card.champion.won is True


def _tamper(data: bytes, edit) -> bytes:
    b = read_unverified(data)
    doc = json.loads(b.member("manifest.json"))
    edit(doc["card"]["champion"]["comparison"])
    files = {k: v for k, v in b.members.items() if k not in ("manifest.json",
                                                               "signatures.json")}
    return pack_bundle(Manifest.from_dict(doc), b.envelope, files, b.mtime)


@pytest.mark.parametrize("edit", [
    lambda c: c.update(verdict="lose"),
    lambda c: c.update(forced=True),
    lambda c: c["test"].update(p_value=0.5),
    lambda c: c["rules"][0].update(passed=False),
    lambda c: c["metrics"][0].update(champion=0.99),
    lambda c: c["slices"][0].update(loss=0.5),
], ids=["verdict", "forced", "p-value", "rule", "metric", "slice"])
def test_the_comparison_is_signed(better, trust, edit):
    data = better.path.read_bytes()
    verify_bundle(data, trust)
    with pytest.raises(BadSignatureError):
        verify_bundle(_tamper(data, edit), trust)


def test_a_champion_card_of_the_old_shape_keeps_its_bytes(better):
    m = read_unverified(better.path.read_bytes()).manifest
    old = replace(m, card=replace(m.card, champion=replace(m.card.champion, comparison=None)))
    assert "comparison" not in old.to_dict()["card"]["champion"]
    assert Manifest.from_bytes(old.to_bytes()) == old
    doc = old.card.to_dict()
    doc["champion"]["comparison"] = None
    with pytest.raises(Exception, match="leave the field out"):
        ModelCard.from_dict(doc)


def test_a_slice_regression_fails_non_inferiority(work, champions, build_key, tmp_path):
    """Better overall, but in the north the truth is what the champion says: the challenger
    loses that slice by far more than the bound."""
    test = work["test_frame"].copy()
    champ = read_unverified(champions["weak"].read_bytes())
    theirs = ModelRunner(champ.manifest, champ.member("model.onnx")).run_columns(
        columns_of(test[FEATURES])).labels.astype(int)
    north = (test["region"] == "north").to_numpy()
    test.loc[north, "target"] = theirs[north]
    path = tmp_path / "test.csv"
    test.to_csv(path, index=False)
    opts = {"champion": champions["weak"], "slice_by": ("region",)}
    with pytest.raises(ChampionLostError) as err:
        build(BuildOptions(model=work["strong_path"], train_data=work["train"], eval_data=path,
                           target="target", name="churn", version="2.0.0",
                           key=build_key.private, out_dir=tmp_path, importances=False, **opts))
    assert "slice region=north: accuracy worse by" in str(err.value)
    assert "region=east" not in str(err.value)  # only the slice at fault is named
    assert "north" in err.value.table and "FAIL" in err.value.table
    # overall it did win: the default rule held
    assert "rule accuracy" not in str(err.value)
    # a loose enough bound lets it through
    result = build(BuildOptions(model=work["strong_path"], train_data=work["train"],
                                eval_data=path, target="target", name="churn",
                                version="2.0.0", key=build_key.private, out_dir=tmp_path,
                                importances=False, max_slice_loss=1.0, **opts))
    assert result.manifest.card.champion.won is True


def test_schema_changes_are_refused_unless_declared(work, champions, build_key, tmp_path):
    with pytest.raises(SchemaChangeError, match=r"feature 'x4' added.*--allow-schema-change"):
        _build(work, build_key, "wider", "2.0.0", tmp_path, champion=champions["weak"])
    result = _build(work, build_key, "wider", "2.0.0", tmp_path, champion=champions["weak"],
                    allow_schema_change=True)
    cmp = result.manifest.card.champion.comparison
    assert cmp.schema_changes == ("feature 'x4' added",) and cmp.schema_change_allowed
    assert "feature 'x4' added (allowed" in compare.table(result.manifest.card.champion)


def test_schema_changes_name_retyped_features_and_classes(champions):
    m = read_unverified(champions["weak"].read_bytes()).manifest
    retyped = replace(m, inputs=tuple(replace(s, kind="categorical", dtype="string")
                                      if s.name == "x2" else s for s in m.inputs),
                      classes=(*m.classes, 2))
    assert compare.schema_changes(m, retyped) == ("feature 'x2' retyped numeric -> categorical",
                                                  "class '2' added")
    assert compare.schema_changes(retyped, m) == ("feature 'x2' retyped categorical -> numeric",
                                                  "class '2' removed")
    assert compare.schema_changes(m, m) == ()


def test_a_champion_must_be_signed_by_a_trusted_key(work, champions, build_key, stranger_key,
                                                    tmp_path):
    foreign = _build(work, stranger_key, "weak", "1.0.0", tmp_path / "foreign").path
    with pytest.raises(SignatureError, match=f"--champion {foreign}"):
        _build(work, build_key, "strong", "2.0.0", tmp_path, champion=foreign)
    result = _build(work, build_key, "strong", "2.0.0", tmp_path, champion=foreign,
                    champion_trust=(f"build={stranger_key.public}",))
    assert result.manifest.card.champion.won is True


# --------------------------------------------------------------------------- the pure core


def _who() -> compare.Identity:
    return compare.Identity("m", "1.0.0", "a" * 64, "b" * 64, "m", "2.0.0", "c" * 64)


def _compare(target, ours, theirs, rules=(), **kw):
    kw.setdefault("slice_columns", {})
    kw.setdefault("slice_kinds", {})
    return compare.compare("classification", np.asarray(target), Prediction(np.asarray(ours)),
                           Prediction(np.asarray(theirs)), who=_who(), data_sha256="d" * 64,
                           rules=compare.parse_rules(rules), latency_ms=(1.0, 1.1),
                           size=(1000, 1200), **kw)


def test_a_tie_that_is_not_significant_fails():
    """500 rows; the challenger is right on 5 rows the champion gets wrong and wrong on 2 it
    gets right: +0.6 points, but McNemar's p is 0.45."""
    y = np.zeros(500, dtype=int)
    theirs = y.copy()
    theirs[:5] = 1  # the champion's 5 errors the challenger gets right
    ours = y.copy()
    ours[5:7] = 1  # the challenger's 2 errors the champion gets right
    result = _compare(y, ours, theirs, ["accuracy>=+0.001"])
    cmp = result.comparison
    assert cmp.test.p_value == pytest.approx(binomtest(5, 7, 0.5).pvalue)
    assert cmp.metric("accuracy").delta == pytest.approx(0.006)
    (rule,) = cmp.rules
    assert rule.observed == pytest.approx(0.006) and rule.significant is False
    assert not rule.passed and not result.won
    assert "met but not significant (McNemar p = 0.453)" in cmp.reasons[0]
    # the default rule (not worse) lets the same tie through
    assert _compare(y, ours, theirs).won is True
    # and a real difference is significant
    theirs[:40] = 1
    assert _compare(y, ours, theirs, ["accuracy>=+0.001"]).won is True


def test_ratio_rules_on_latency_and_size():
    y = np.zeros(50, dtype=int)
    result = _compare(y, y, y, ["latency_p95<=1.2x", "size<=1.1x"])
    (lat, size) = result.comparison.rules
    assert lat.passed and lat.observed == pytest.approx(1.1) and lat.significant is None
    assert not size.passed and size.observed == pytest.approx(1.2)
    assert "rule size<=1.1x: observed 1.2" in result.comparison.reasons[0]


def test_regression_rules_use_the_paired_bootstrap():
    rng = np.random.default_rng(0)
    y = rng.normal(size=400)
    theirs = y + rng.normal(scale=1.0, size=400)
    ours = y + rng.normal(scale=0.5, size=400)
    result = compare.compare("regression", y, Prediction(values=ours), Prediction(values=theirs),
                             who=_who(), data_sha256="d" * 64,
                             rules=compare.parse_rules(["mae<=-0.2", "rmse<=-10%"]),
                             latency_ms=(1.0, 1.0), size=(10, 10), slice_columns={},
                             slice_kinds={})
    cmp = result.comparison
    mae = cmp.metric("mae")
    assert mae.delta == pytest.approx(np.abs(y - ours).mean() - np.abs(y - theirs).mean())
    assert mae.high < 0 and cmp.test.name == "paired_bootstrap" and cmp.test.p_value is None
    assert all(r.passed and r.significant for r in cmp.rules) and result.won


@pytest.mark.parametrize(("rule", "fault"), [
    ("accuracy=+0.01", "expected NAME>=VALUE"),
    ("accuracy>=lots", "expected NAME>=VALUE"),
    ("acuracy>=+0.01", "unknown metric 'acuracy'"),
    ("accuracy<=+0.01", "accuracy is better higher"),
    ("mae>=-0.5", "mae is better lower"),
    ("size<=0x", "a ratio must be positive"),
])
def test_bad_rules_are_refused_naming_the_rule(rule, fault):
    with pytest.raises(PromotionRuleError) as err:
        compare.parse_rules([rule])
    assert repr(rule) in str(err.value) and fault in str(err.value)


def test_a_rule_of_the_other_task_is_named():
    with pytest.raises(PromotionRuleError, match=r"'mae<=-0\.5': mae is not a metric of a "
                                                 r"classification model"):
        _compare([0, 1], [0, 1], [0, 1], ["mae<=-0.5"])


def test_bad_rules_and_options_fail_before_the_build(work, champions, build_key, tmp_path,
                                                     capsys):
    args = ["build", str(work["strong_path"]), "--train-data", str(work["train"]),
            "--eval-data", str(work["test"]), "--target", "target", "--name", "churn",
            "--version", "2.0.0", "--key", str(build_key.private), "--out", str(tmp_path)]
    assert main([*args, "--champion", str(champions["weak"]),
                 "--promote-if", "accuracy>+0.01"]) == 1
    assert "--promote-if 'accuracy>+0.01'" in capsys.readouterr().err
    with pytest.raises(BuildError, match="pass --champion"):
        _build(work, build_key, "strong", "2.0.0", tmp_path, promote_if=("accuracy>=+0",))
    with pytest.raises(BuildError, match="pass --eval-data"):
        build(BuildOptions(model=work["strong_path"], train_data=work["train"],
                           target="target", name="churn", version="2.0.0",
                           key=build_key.private, out_dir=tmp_path,
                           champion=champions["weak"]))
    assert not list(tmp_path.glob("*.edgebundle"))


def test_the_card_renders_the_comparison(better):
    from packager.card import card_document, render

    doc = card_document(read_unverified(better.path.read_bytes()))
    md = render(doc, "md")
    # autoescaped in Markdown too (viewers pass raw HTML through)
    assert "| accuracy&gt;=+0.02 | 0.175 | yes | pass |" in md and "Verdict: **win**" in md
    assert "mcnemar_exact on accuracy, p = " in md and "\n\n| rule |" in md
    html = render(doc, "html")
    assert "<td>f1_macro&gt;=+2%</td>" in html and "Verdict: win" in html


def test_many_schema_changes_stay_within_the_card_bound(champions):
    from edgefleet.contract.card import MAX_SCHEMA_CHANGES

    m = read_unverified(champions["weak"].read_bytes()).manifest
    wide = replace(m, inputs=(*m.inputs, *(replace(m.inputs[0], name=f"f{i}")
                                          for i in range(100))))
    changes = compare.schema_changes(m, wide)
    assert len(changes) == MAX_SCHEMA_CHANGES
    assert changes[-1] == f"and {100 - MAX_SCHEMA_CHANGES + 1} more changes"
    with pytest.raises(PromotionRuleError, match="at most 16"):
        compare.parse_rules(["accuracy>=+0"] * 17)


def test_latency_interleaves_the_models_after_a_warm_up():
    calls: list[tuple[str, int]] = []

    def runner(name):
        def run(columns):
            calls.append((name, int(columns["x"][0])))
            return Prediction(labels=np.zeros(1))
        return run

    cols = {"x": np.arange(30, dtype=np.float64)}
    p95 = compare.latency_p95([runner("a"), runner("b")], [cols, cols], rows=20)
    assert len(p95) == 2 and all(v >= 0 for v in p95)
    warm = compare.LATENCY_WARMUP
    assert calls[:2 * warm] == [("a", i) for i in range(warm)] + [("b", i) for i in range(warm)]
    timed = calls[2 * warm:]
    assert len(timed) == 40 and timed[:4] == [("a", 0), ("b", 0), ("b", 1), ("a", 1)]


def test_build_help_documents_the_exit_status(capsys):
    assert main(["build", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "A challenger that does not beat --champion exits 6 (refused by a check)" in text
    assert "--promote-if RULE" in text and "--allow-schema-change" in text
