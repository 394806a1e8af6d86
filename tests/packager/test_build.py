"""``packager.build``: reproducibility, the fidelity gate, lineage, adopted ONNX models,
metrics, and every refusal with the error class and the name it must carry."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import joblib
import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.ensemble import RandomForestClassifier
from sklearn.gaussian_process import GaussianProcessClassifier
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import accuracy_score, f1_score, r2_score
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.semi_supervised import LabelSpreading

from edgefleet.contract.bundle import read_unverified, verify_bundle
from edgefleet.contract.errors import KeyFileError
from edgefleet.contract.runtime import ModelRunner
from packager.build import BuildOptions, build
from packager.errors import (
    BuildError,
    ConversionError,
    DataError,
    FidelityError,
    ModelLoadError,
    UnsupportedModelError,
)
from packager.fidelity import Bounds
from tests.packager.conftest import (
    EPOCH,
    columns_of,
    dataset,
    dump,
    fit,
    sha256_file,
    split,
    write_csv,
)

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cancer(tmp_path_factory):
    """Breast-cancer train/eval CSVs and two models on them: a forest and a scaled MLP."""
    where = tmp_path_factory.mktemp("cancer")
    X, y = dataset("breast_cancer")
    X_train, X_eval, y_train, y_eval = split(X, y)
    forest = fit(RandomForestClassifier(n_estimators=10, max_depth=5, random_state=0),
                 X_train, y_train)
    mlp = fit(Pipeline([("scale", StandardScaler()),
                        ("mlp", MLPClassifier((32, 16), max_iter=200, random_state=0))]),
              X_train, y_train)
    return {
        "X_train": X_train, "y_train": y_train, "X_eval": X_eval, "y_eval": y_eval,
        "forest": forest, "mlp": mlp,
        "train": write_csv(where / "train.csv", X_train, y_train),
        "eval": write_csv(where / "eval.csv", X_eval, y_eval),
        "forest_path": dump(forest, where / "forest.joblib"),
        "mlp_path": dump(mlp, where / "mlp.joblib"),
    }


@pytest.fixture(scope="module")
def diabetes(tmp_path_factory):
    where = tmp_path_factory.mktemp("diabetes")
    X, y = dataset("diabetes")
    ridge = fit(Ridge(alpha=0.5), X, y)
    return {"X": X, "y": y, "ridge": ridge, "train": write_csv(where / "train.csv", X, y),
            "ridge_path": dump(ridge, where / "ridge.joblib")}


# --------------------------------------------------------------------------- reproducible


@pytest.mark.parametrize("model, quantize", [("forest_path", "none"), ("mlp_path", "dynamic")],
                         ids=["tree-float", "mlp-int8-dynamic"])
def test_same_epoch_gives_identical_bytes(cancer, make_bundle, tmp_path, monkeypatch, model,
                                          quantize):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", EPOCH)
    first = make_bundle(cancer[model], cancer["train"], quantize=quantize,
                        out_dir=tmp_path / "a")
    second = make_bundle(cancer[model], cancer["train"], quantize=quantize,
                         out_dir=tmp_path / "b")
    assert first.path != second.path
    assert first.path.read_bytes() == second.path.read_bytes()
    assert first.sha256 == second.sha256
    assert first.manifest.created_at == "2026-01-01T00:00:00Z"
    assert read_unverified(first.path.read_bytes()).mtime == int(EPOCH)
    # the quantised case must really be quantised, or it proves nothing about quantize
    assert first.manifest.quantization.applied is (quantize != "none")

    monkeypatch.setenv("SOURCE_DATE_EPOCH", str(int(EPOCH) + 86400))
    later = make_bundle(cancer[model], cancer["train"], quantize=quantize,
                        out_dir=tmp_path / "c")
    assert later.path.read_bytes() != first.path.read_bytes()
    assert later.manifest.created_at == "2026-01-02T00:00:00Z"
    # only the time differs: the signed content is otherwise the same
    assert {e.path: e.sha256 for e in later.manifest.files} == \
        {e.path: e.sha256 for e in first.manifest.files}


def test_source_date_epoch_must_be_an_integer(cancer, make_bundle, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(BuildError, match="SOURCE_DATE_EPOCH='yesterday'"):
        make_bundle(cancer["forest_path"], cancer["train"])


# --------------------------------------------------------------------------- fidelity gate

NO_LOSS = Bounds(label_disagreement=0.0, prob_diff=0.0, mean_prob_diff=0.0, rel_error=0.0)


def test_fidelity_gate_refuses_a_model_past_its_bounds(cancer, make_bundle, tmp_path):
    # float32 ONNX kernels move an MLP's probabilities by ~1e-7: not bit-exact
    with pytest.raises(FidelityError) as info:
        make_bundle(cancer["mlp_path"], cancer["train"], bounds=NO_LOSS)
    err = info.value
    assert "mlp.joblib" in str(err) and "--force" in str(err)
    lines = {line.split()[0]: line for line in err.table.splitlines()[1:]}
    assert set(lines) == {"label_disagreement", "prob_diff", "mean_prob_diff"}
    assert lines["prob_diff"].endswith("FAIL")
    assert lines["mean_prob_diff"].endswith("FAIL")
    assert lines["label_disagreement"].endswith("ok")
    assert not list((tmp_path / "out").glob("*.edgebundle"))  # nothing written


def test_fidelity_gate_regressor_names_rel_error(diabetes, make_bundle):
    with pytest.raises(FidelityError) as info:
        make_bundle(diabetes["ridge_path"], diabetes["train"], bounds=NO_LOSS)
    assert info.value.table.splitlines()[1].split()[0] == "rel_error"
    assert info.value.table.splitlines()[1].endswith("FAIL")


def test_force_builds_past_the_gate_and_says_so(cancer, make_bundle, trust):
    result = make_bundle(cancer["mlp_path"], cancer["train"], bounds=NO_LOSS, force=True)
    f = verify_bundle(result.path.read_bytes(), trust).manifest.fidelity
    assert f.forced is True and f.passed is False
    assert f.bounds == {"label_disagreement": 0.0, "prob_diff": 0.0, "mean_prob_diff": 0.0}
    assert 0.0 < f.max_abs_prob_diff < 1e-4
    assert f.label_agreement == 1.0
    assert [name for name, *_ in result.fidelity_rows] == \
        ["label_disagreement", "prob_diff", "mean_prob_diff"]


# --------------------------------------------------------------------------- lineage


def test_lineage_records_sources_rows_and_libraries(cancer, make_bundle):
    result = make_bundle(cancer["forest_path"], cancer["train"], code_revision="abc1234")
    ln = result.manifest.lineage
    assert ln.source_sha256 == sha256_file(cancer["forest_path"])
    assert ln.data_sha256 == sha256_file(cancer["train"])
    assert ln.data_rows == len(cancer["X_train"])
    assert ln.source_kind == "sklearn" and ln.estimator == "RandomForestClassifier"
    assert ln.code_revision == "abc1234"
    for lib in ("numpy", "onnxruntime", "scikit-learn", "skl2onnx"):
        assert ln.libraries[lib] == metadata.version(lib)
    assert ln.libraries["python"] == ".".join(map(str, sys.version_info[:3]))


def test_code_revision_is_none_outside_a_git_tree(cancer, make_bundle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    result = make_bundle(cancer["forest_path"], cancer["train"], code_revision=None)
    assert result.manifest.lineage.code_revision is None


# --------------------------------------------------------------------------- adopting ONNX


def _to_onnx(model, n_features: int, zipmap: bool) -> bytes:
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    options = {id(model): {"zipmap": zipmap}} if hasattr(model, "classes_") else None
    onx = to_onnx(model, initial_types=[("X", FloatTensorType([None, n_features]))],
                  options=options, target_opset={"": 17, "ai.onnx.ml": 3})
    return onx.SerializeToString()


def test_adopted_onnx_classifier_builds_and_runs(make_bundle, tmp_path, trust):
    X, y = dataset("iris")
    X_train, X_test, y_train, _ = split(X, y)
    model = fit(LogisticRegression(max_iter=500), X_train.to_numpy(), y_train)
    path = tmp_path / "iris.onnx"
    path.write_bytes(_to_onnx(model, 4, zipmap=False))
    result = make_bundle(path, write_csv(tmp_path / "train.csv", X_train, y_train))
    verified = verify_bundle(result.path.read_bytes(), trust)
    m = verified.manifest
    assert m.lineage.source_kind == "onnx"
    assert m.lineage.source_sha256 == sha256_file(path)
    assert m.binding.layout == "tensor" and m.binding.input_name == "X"
    assert m.classes == (0, 1, 2)
    assert [o.role for o in m.outputs] == ["label", "probabilities"]
    assert m.fidelity.rows == 0  # no original model to compare with
    runner = ModelRunner(m, verified.member("model.onnx"))
    got = runner.run_columns(columns_of(X_test))
    assert np.array_equal(got.labels, model.predict(X_test.to_numpy()))
    assert np.abs(got.probabilities - model.predict_proba(X_test.to_numpy())).max() < 1e-5


def test_adopted_onnx_regressor_builds_and_runs(diabetes, make_bundle, tmp_path, trust):
    path = tmp_path / "ridge.onnx"
    path.write_bytes(_to_onnx(diabetes["ridge"], diabetes["X"].shape[1], zipmap=False))
    result = make_bundle(path, diabetes["train"])
    verified = verify_bundle(result.path.read_bytes(), trust)
    assert verified.manifest.task == "regression"
    runner = ModelRunner(verified.manifest, verified.member("model.onnx"))
    got = runner.run_columns(columns_of(diabetes["X"])).values
    want = diabetes["ridge"].predict(diabetes["X"])
    assert np.abs(got - want).max() / want.std() < 1e-5
    assert set(result.manifest.metrics) == {"train_mae", "train_rmse", "train_r2"}


def test_adopted_onnx_with_zipmap_is_refused(make_bundle, tmp_path):
    X, y = dataset("iris")
    model = fit(LogisticRegression(max_iter=500), X.to_numpy(), y)
    path = tmp_path / "zipmap.onnx"
    path.write_bytes(_to_onnx(model, 4, zipmap=True))
    with pytest.raises(ConversionError, match=r"(?i)zipmap") as info:
        make_bundle(path, write_csv(tmp_path / "train.csv", X, y))
    assert "zipmap.onnx" in str(info.value)


def test_adopted_file_that_is_not_onnx_is_refused(make_bundle, tmp_path, cancer):
    path = tmp_path / "garbage.onnx"
    path.write_bytes(b"\x08\x07this is not a protobuf model" * 10)
    with pytest.raises(ConversionError, match=re.escape("garbage.onnx")):
        make_bundle(path, cancer["train"])


# --------------------------------------------------------------------------- metrics


def test_eval_data_gives_eval_metrics_on_the_held_out_rows(cancer, make_bundle):
    result = make_bundle(cancer["forest_path"], cancer["train"], eval_data=cancer["eval"])
    assert result.warnings == []
    m = result.manifest
    want = cancer["forest"].predict(cancer["X_eval"])
    # and the raw probabilities' Brier score beside the calibration map (test_calibrate.py)
    assert set(m.metrics) == {"eval_accuracy", "eval_f1_macro", "eval_brier_uncalibrated"}
    assert m.metrics["eval_accuracy"] == pytest.approx(accuracy_score(cancer["y_eval"], want))
    assert m.metrics["eval_f1_macro"] == pytest.approx(
        f1_score(cancer["y_eval"], want, average="macro"))
    assert m.fidelity.rows == len(cancer["X_eval"])


def test_without_eval_data_metrics_are_on_the_training_rows(cancer, diabetes, make_bundle):
    built = make_bundle(cancer["forest_path"], cancer["train"])
    assert len(built.warnings) == 1
    assert "metrics computed on the training rows" in built.warnings[0]
    assert "--eval-data" in built.warnings[0]
    clf = built.manifest
    want = cancer["forest"].predict(cancer["X_train"])
    assert set(clf.metrics) == {"train_accuracy", "train_f1_macro"}
    assert clf.metrics["train_accuracy"] == pytest.approx(
        accuracy_score(cancer["y_train"], want))
    reg = make_bundle(diabetes["ridge_path"], diabetes["train"], name="ridge").manifest
    assert set(reg.metrics) == {"train_mae", "train_rmse", "train_r2"}
    assert reg.metrics["train_r2"] == pytest.approx(
        r2_score(diabetes["y"], diabetes["ridge"].predict(diabetes["X"])), abs=1e-6)


def test_without_target_the_build_warns_that_metrics_need_it(make_bundle, tmp_path):
    X, y = dataset("iris")
    model = fit(LogisticRegression(max_iter=300), X, y)
    built = make_bundle(dump(model, tmp_path / "m.joblib"), write_csv(tmp_path / "t.csv", X),
                        target=None)
    assert built.manifest.metrics == {}
    assert len(built.warnings) == 1 and "--target" in built.warnings[0]
    assert "no metrics" in built.warnings[0]


# --------------------------------------------------------------------------- refusals


def _iris_array():
    X, y = dataset("iris")
    return X, y, X.to_numpy()


@pytest.mark.parametrize("make, names", [
    (lambda: KMeans(3, n_init=1, random_state=0), ["KMeans", "only classifiers and regressors"]),
    (lambda: LabelSpreading(), ["LabelSpreading", "no ONNX converter"]),
    (lambda: GaussianProcessClassifier(random_state=0),
     ["GaussianProcessClassifier", "Only binary classification"]),
], ids=["clusterer", "no-converter", "converter-refuses-multiclass"])
def test_unsupported_estimators_are_named(make, names, make_bundle, tmp_path):
    X, y, arr = _iris_array()
    model = fit(make(), arr, y)
    with pytest.raises(UnsupportedModelError) as info:
        make_bundle(dump(model, tmp_path / "m.joblib"), write_csv(tmp_path / "t.csv", X, y))
    for name in names:
        assert name in str(info.value)


def test_pickled_object_that_is_not_an_estimator(make_bundle, tmp_path, cancer):
    path = tmp_path / "weights.pkl"
    joblib.dump({"weights": [0.5, 1.5]}, path)
    with pytest.raises(UnsupportedModelError, match="dict: not a scikit-learn estimator"):
        make_bundle(path, cancer["train"])


@pytest.mark.parametrize("content", [b"", b"\x80\x04not really a pickle", b"PK\x03\x04zip?"],
                         ids=["empty", "broken-pickle", "zip-header"])
def test_corrupt_model_file(content, make_bundle, tmp_path, cancer):
    path = tmp_path / "model.joblib"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError,
                       match=re.escape("model.joblib: not a pickled or joblib model")):
        make_bundle(path, cancer["train"])


def test_missing_model_file(make_bundle, tmp_path, cancer):
    with pytest.raises(ModelLoadError, match=re.escape("nowhere.joblib: cannot read model")):
        make_bundle(tmp_path / "nowhere.joblib", cancer["train"])


def test_model_expects_columns_the_data_lacks(make_bundle, tmp_path):
    X, y = dataset("iris")
    renamed = X.rename(columns={"petal_width_cm": "petal_width_mm"})
    model = fit(LogisticRegression(max_iter=300), renamed, y)
    with pytest.raises(DataError, match="'petal_width_mm'") as info:
        make_bundle(dump(model, tmp_path / "m.joblib"), write_csv(tmp_path / "t.csv", X, y))
    assert "t.csv" in str(info.value)


def test_array_model_with_the_wrong_number_of_columns(make_bundle, tmp_path):
    X, y, arr = _iris_array()
    model = fit(LogisticRegression(max_iter=300), arr[:, :3], y)
    with pytest.raises(BuildError, match="expects 3 features, the data has 4 columns"):
        make_bundle(dump(model, tmp_path / "m.joblib"), write_csv(tmp_path / "t.csv", X, y))


def test_target_column_not_given_counts_as_a_feature(make_bundle, tmp_path):
    X, y, arr = _iris_array()
    model = fit(LogisticRegression(max_iter=300), arr, y)
    with pytest.raises(BuildError, match="pass --target"):
        make_bundle(dump(model, tmp_path / "m.joblib"), write_csv(tmp_path / "t.csv", X, y),
                    target=None)


@pytest.mark.parametrize("name, version, message", [
    ("Bad Name", "1.0.0", "--name 'Bad Name'"),
    ("model\n", "1.0.0", "--name 'model\\n'"),
    ("model", "1.0", "--version: version '1.0' is not a semantic version"),
    ("model", "v1.0.0", "--version: version 'v1.0.0'"),
], ids=["space-and-capitals", "trailing-newline", "two-part-version", "v-prefix"])
def test_bad_name_or_version_refused_before_any_work(name, version, message, make_bundle,
                                                     tmp_path):
    # the model file does not even exist: the cheap checks come first
    with pytest.raises(BuildError) as info:
        make_bundle(tmp_path / "absent.joblib", tmp_path / "absent.csv", name=name,
                    version=version)
    assert message in str(info.value)


def test_key_readable_by_others_is_refused(cancer, build_key, tmp_path):
    loose = tmp_path / "loose.key"
    loose.write_bytes(build_key.private.read_bytes())
    loose.chmod(0o644)
    with pytest.raises(KeyFileError, match="mode 0644"):
        build(BuildOptions(model=cancer["forest_path"], train_data=cancer["train"],
                           name="m", version="1.0.0", key=loose, target="target",
                           out_dir=tmp_path))


# --------------------------------------------------------------------------- hygiene


def test_importing_the_agent_does_not_import_the_build_stack():
    code = ("import edge_agent, edgefleet.contract.bundle, edgefleet.contract.profile, "
            "edgefleet.contract.runtime, edgefleet.contract.samples, sys; "
            "bad=[m for m in ('sklearn','skl2onnx','fastapi') if m in sys.modules]; "
            "assert not bad, bad; print('clean')")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "clean"


def test_public_key_given_as_the_signing_key_is_named_as_such(cancer, build_key, tmp_path):
    with pytest.raises(KeyFileError) as info:
        build(BuildOptions(model=cancer["forest_path"], train_data=cancer["train"],
                           name="m", version="1.0.0", key=build_key.public, target="target",
                           out_dir=tmp_path))
    text = str(info.value)
    assert "this is a public key" in text and str(build_key.private) in text
    assert "chmod" not in text


class TrainedInAScript(LogisticRegression):
    """Stands for a class defined in the training script: pickled as __main__.<name>."""


def test_class_from_the_training_script_gets_a_hint(cancer, make_bundle, tmp_path,
                                                    monkeypatch):
    main = sys.modules["__main__"]
    monkeypatch.setattr(TrainedInAScript, "__module__", "__main__")
    monkeypatch.setattr(main, "TrainedInAScript", TrainedInAScript, raising=False)
    model = fit(TrainedInAScript(max_iter=300), cancer["X_train"], cancer["y_train"])
    path = dump(model, tmp_path / "script.joblib")
    monkeypatch.delattr(main, "TrainedInAScript")  # edgepack's __main__ is not the script
    with pytest.raises(ModelLoadError) as info:
        make_bundle(path, cancer["train"])
    assert "TrainedInAScript" in str(info.value)
    assert "define it in an importable module" in str(info.value)


def test_model_whose_library_is_missing_names_the_extra(cancer, make_bundle, tmp_path,
                                                        monkeypatch):
    xgboost = pytest.importorskip("xgboost")
    model = fit(xgboost.XGBClassifier(n_estimators=3, max_depth=2), cancer["X_train"],
                cancer["y_train"])
    path = dump(model, tmp_path / "xgb.joblib")
    for name in [m for m in sys.modules if m == "xgboost" or m.startswith("xgboost.")]:
        monkeypatch.setitem(sys.modules, name, None)  # as if it were not installed
    with pytest.raises(ModelLoadError) as info:
        make_bundle(path, cancer["train"])
    assert str(info.value) == f"{path}: the model needs xgboost: pip install 'edgefleet[xgboost]'"
