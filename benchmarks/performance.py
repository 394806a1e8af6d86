"""Performance blocks: exactness against scikit-learn, CBPE under shift, size and cost.

Run from the repository root::

    .venv/bin/python benchmarks/performance.py [--quick] [--out benchmarks/out/performance.json]
        [--nannyml-python /path/to/python]

One run, side by side, on a mixed numeric + categorical pipeline (``ColumnTransformer``: 3
numeric columns through ``StandardScaler``, 2 string columns through ``OneHotEncoder``) and
synthetic rows whose label follows a fixed rule:

- **exactness**: the labelled rows of a live period are split over 10 devices x 5 windows;
  each window's :class:`Realized` block travels in a real :class:`Summary` (encoded,
  deflated, decoded) and the "server" merges them; the merged metrics are set beside
  scikit-learn's on the same rows (classifier: ``HistGradientBoostingClassifier``;
  regressor: ``HistGradientBoostingRegressor`` on a continuous target of the same rows);
- **estimate vs realized**: the classifier (and a ``LogisticRegression`` on the same
  preprocessing), calibrated with isotonic regression on 5,000 and on 20,000 held-out rows
  (as a contract :class:`Calibration`), on a live period with no shift, with covariate
  shift (numeric inputs moved and scaled, the category mix changed; the labelling rule
  unchanged) and with concept drift (labels flipped where ``temp`` is above its mean:
  inputs unchanged). Our CBPE estimate against the realized accuracy, and against
  NannyML's ``CBPE`` on the same raw rows when NannyML is importable by
  ``--nannyml-python`` (default: this interpreter). NannyML pins older libraries than
  edgefleet's (installing it here would downgrade python-dateutil), so give it a venv of
  its own: ``python -m venv /tmp/nml && /tmp/nml/bin/pip install nannyml statsmodels``.
  Without it the comparison is skipped with a message; it is never a dependency.
- **size**: a summary of 20 numeric features with and without a binary performance block
  (600 labelled rows with scores and delays, plus the estimate), deflated as sent;
- **cost**: :meth:`Estimated.add` and :meth:`Realized.add` per row on chunks of 256 and
  1,024 rows (the agent's worker), in interleaved blocks (:func:`benchmarks.common.blocks`).

Not measured: the agent's prediction store and join (agent-outcomes), the server's store
(perf-server).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [str(_ROOT)] + [p for p in sys.path
                              if Path(p or ".").resolve() != _ROOT / "benchmarks"]

from sklearn.compose import ColumnTransformer  # noqa: E402
from sklearn.ensemble import (  # noqa: E402
    HistGradientBoostingClassifier,
    HistGradientBoostingRegressor,
)
from sklearn.isotonic import IsotonicRegression  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import (  # noqa: E402
    accuracy_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    mean_absolute_error,
    precision_score,
    recall_score,
    roc_auc_score,
    root_mean_squared_error,
)
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import OneHotEncoder, StandardScaler  # noqa: E402

from benchmarks.common import blocks, finish, table  # noqa: E402
from edgefleet.contract.calibration import Calibration  # noqa: E402
from edgefleet.contract.messages import LATENCY_EDGES_MS, BundleRef, Summary, decode, encode  # noqa: E402
from edgefleet.contract.performance import (  # noqa: E402
    ERROR_EDGES,
    Estimated,
    PerformanceEntry,
    PerformanceSpec,
    Realized,
)
from edgefleet.contract.profile import (  # noqa: E402
    CONFIDENCE_EDGES,
    NumericSpec,
    Profile,
    ProfileSpec,
    categorical_spec,
    numeric_spec,
    to_wire,
)

LIBRARIES = ("edgefleet", "numpy", "scikit-learn", "pandas")
SEED = 14
NUMERIC = ("temp", "pressure", "rpm")
CATEGORIES = {"site": ("north", "south", "east", "west", "lab"),
              "mode": ("idle", "run", "boost", "service")}
SITE_EFFECT = dict(zip(CATEGORIES["site"], (0.4, -0.3, 0.0, 0.6, -0.8), strict=True))
MODE_EFFECT = dict(zip(CATEGORIES["mode"], (-0.6, 0.2, 0.9, -0.2), strict=True))
CLASSES = ("ok", "fault")
SPEC = PerformanceSpec("classification", CLASSES)
BUNDLE = BundleRef("mixed-hgb", "1.0.0")


# --------------------------------------------------------------------------- data


def rows(n: int, rng: np.random.Generator, *, shift: bool = False,
         flip: bool = False) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """``(frame, label, value)``: the label follows one logistic rule (a mild curve in
    rpm, additive site and mode effects); ``value`` is a regressor's target."""
    temp = rng.normal(0.9 if shift else 0.0, 1.3 if shift else 1.0, n)
    pressure = rng.normal(-0.6 if shift else 0.0, 1.0, n)
    rpm = rng.normal(0.0, 1.6 if shift else 1.0, n)
    site_p = (0.1, 0.1, 0.2, 0.5, 0.1) if shift else (0.3, 0.25, 0.2, 0.15, 0.1)
    site = rng.choice(CATEGORIES["site"], n, p=site_p)
    mode = rng.choice(CATEGORIES["mode"], n, p=(0.1, 0.5, 0.3, 0.1) if shift else None)
    logit = (1.4 * temp - 1.0 * pressure + 0.5 * rpm - 0.3 * rpm ** 2 + 0.2
             + np.vectorize(SITE_EFFECT.get)(site) + np.vectorize(MODE_EFFECT.get)(mode))
    label = (rng.uniform(size=n) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    if flip:  # concept drift: the rule changes where temp is high; the inputs do not
        label = np.where(temp > 0.0, 1 - label, label)
    value = 20 + 3 * temp - 2 * pressure + rpm ** 2 + np.vectorize(SITE_EFFECT.get)(site) * 4 \
        + rng.standard_t(4, n)
    frame = pd.DataFrame({"temp": temp, "pressure": pressure, "rpm": rpm, "site": site,
                          "mode": mode})
    return frame, label, value


def pipeline(estimator: Any) -> Any:
    pre = ColumnTransformer([("num", StandardScaler(), list(NUMERIC)),
                             ("cat", OneHotEncoder(handle_unknown="ignore"), list(CATEGORIES))],
                            sparse_threshold=0.0)
    return make_pipeline(pre, estimator)


def calibration(p: np.ndarray, y: np.ndarray) -> Calibration:
    iso = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0).fit(p, y)
    return Calibration("isotonic", "positive", tuple(float(v) for v in iso.X_thresholds_),
                       tuple(float(v) for v in iso.y_thresholds_), rows=len(p))


# --------------------------------------------------------------------------- exactness


def _summaries(blocks_: list[Realized]) -> list[Realized]:
    """Each window's block through a real summary message, back as the server reads it."""
    out = []
    for seq, block in enumerate(blocks_, 1):
        s = Summary(f"dev-{seq % 10:02d}", seq, BUNDLE, 1.7e9 + seq, 1.7e9 + seq + 60,
                    {"reference_hash": "0" * 64, "rows": block.n, "in": [], "out": []},
                    performance=(PerformanceEntry(BUNDLE, block.to_wire(), None),))
        got = decode(s.topic, encode(s))
        out.append(Realized.from_wire(block.spec, got.performance[0].realized))
    return out


def _windows(n: int) -> list[np.ndarray]:
    return np.array_split(np.arange(n), 50)  # 10 devices x 5 windows


def exactness(rng: np.random.Generator, n: int) -> dict[str, Any]:
    train, y_train, v_train = rows(20_000, rng)
    live, y_live, v_live = rows(n, rng)
    clf = pipeline(HistGradientBoostingClassifier(random_state=SEED)).fit(train, y_train)
    proba = clf.predict_proba(live)
    pred = proba.argmax(axis=1)
    delays = rng.exponential(6 * 3600.0, n)
    parts = []
    for idx in _windows(n):
        block = Realized(SPEC)
        block.add(pred[idx], y_live[idx], proba[idx], delays[idx])
        parts.append(block)
    merged = Realized(SPEC)
    for block in _summaries(parts):
        merged.merge(block)
    m = merged.metrics()
    ours: dict[str, float] = {"accuracy": m["accuracy"].value}
    theirs: dict[str, float] = {"accuracy": accuracy_score(y_live, pred)}
    prec = precision_score(y_live, pred, average=None)
    rec = recall_score(y_live, pred, average=None)
    f1 = f1_score(y_live, pred, average=None)
    for i, c in enumerate(CLASSES):
        for name, arr in (("precision", prec), ("recall", rec), ("f1", f1)):
            ours[f"{name}[{c}]"] = m[f"{name}[{c}]"].value
            theirs[f"{name}[{c}]"] = float(arr[i])
    ours["f1_macro"], theirs["f1_macro"] = m["f1_macro"].value, f1_score(y_live, pred,
                                                                         average="macro")
    ours["brier"], theirs["brier"] = m["brier"].value, brier_score_loss(y_live, proba[:, 1])
    ours["auc (binned)"], theirs["auc (binned)"] = m["auc"].value, roc_auc_score(y_live,
                                                                                proba[:, 1])
    cm_equal = merged.confusion().tolist() == confusion_matrix(y_live, pred).tolist()

    reg = pipeline(HistGradientBoostingRegressor(random_state=SEED)).fit(train, v_train)
    value = reg.predict(live)
    rspec = PerformanceSpec("regression", (), ERROR_EDGES)
    parts = []
    for idx in _windows(n):
        block = Realized(rspec)
        block.add(value[idx], v_live[idx], None, delays[idx])
        parts.append(block)
    rmerged = Realized(rspec)
    for block in _summaries(parts):
        rmerged.merge(block)
    rm = rmerged.metrics()
    ours["mae"], theirs["mae"] = rm["mae"].value, mean_absolute_error(v_live, value)
    ours["rmse"], theirs["rmse"] = rm["rmse"].value, root_mean_squared_error(v_live, value)
    intervals = {k: [m[k].low, m[k].high, m[k].method] for k in ("accuracy", "f1_macro", "auc",
                                                                 "brier")}
    intervals.update({k: [rm[k].low, rm[k].high, rm[k].method] for k in ("mae", "rmse")})
    return {"rows": n, "windows": 50, "confusion_equal": cm_equal,
            "confusion": merged.confusion().tolist(),
            "metrics": {k: {"edgefleet": ours[k], "scikit-learn": float(theirs[k]),
                            "abs_diff": abs(ours[k] - float(theirs[k]))} for k in ours},
            "intervals": intervals}


# --------------------------------------------------------------------------- estimate


SCENARIOS = {"no shift": {}, "covariate shift": {"shift": True},
             "concept drift": {"flip": True}}


def _nannyml(python: str, work: Path, reference: pd.DataFrame,
             analyses: dict[str, pd.DataFrame]) -> dict[str, Any]:
    """NannyML's CBPE on the same raw rows, in its own interpreter (its pins differ)."""
    reference.to_csv(work / "reference.csv", index=False)
    for name, frame in analyses.items():
        frame.to_csv(work / f"analysis-{name.replace(' ', '_')}.csv", index=False)
    script = (
        "import json, sys, time, warnings, pandas as pd\n"
        "warnings.filterwarnings('ignore')\n"
        "import nannyml as nml\n"
        "ref = pd.read_csv(sys.argv[1] + '/reference.csv')\n"
        "out = {'version': nml.__version__, 'estimates': {}}\n"
        "for name in sys.argv[2:]:\n"
        "    ana = pd.read_csv(sys.argv[1] + f\"/analysis-{name.replace(' ', '_')}.csv\")\n"
        "    t = time.perf_counter()\n"
        "    est = nml.CBPE(y_pred_proba='p', y_pred='pred', y_true='y', metrics=['accuracy'],\n"
        "                   problem_type='classification_binary', chunk_number=1)\n"
        "    est.fit(ref)\n"
        "    df = est.estimate(ana.drop(columns=['y'])).filter(period='analysis').to_df()\n"
        "    out['estimates'][name] = {'accuracy': float(df[('accuracy', 'value')].iloc[0]),\n"
        "                              'seconds': time.perf_counter() - t}\n"
        "print(json.dumps(out))\n")
    try:
        done = subprocess.run([python, "-c", script, str(work), *analyses], capture_output=True,
                              text=True, timeout=900, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"skipped": f"NannyML could not run: {exc}"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"skipped": f"NannyML not available to {python}: {last[:200]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


HELD_OUT = (5_000, 20_000)  # rows the calibration map is fitted on (the first inside the second)


def estimates(rng: np.random.Generator, n: int, nannyml_python: str) -> dict[str, Any]:
    train, y_train, _ = rows(20_000, rng)
    held_all, y_held_all, _ = rows(max(HELD_OUT), rng)
    live = {name: rows(n, rng, **kw) for name, kw in SCENARIOS.items()}
    out: dict[str, Any] = {"rows": n, "held_out_rows": list(HELD_OUT), "models": {}}
    with tempfile.TemporaryDirectory(prefix="edgefleet-perf-bench-") as tmp:
        for model_name, estimator in (("mixed-hgb", HistGradientBoostingClassifier(
                random_state=SEED)), ("mixed-logreg", LogisticRegression(max_iter=1000))):
            model = pipeline(estimator).fit(train, y_train)
            for held_n in HELD_OUT:
                held, y_held = held_all.iloc[:held_n], y_held_all[:held_n]
                key = f"{model_name}, {held_n:,} held-out"
                out["models"][key] = _estimate(model, held, y_held, live, Path(tmp) / key,
                                               nannyml_python)
    return out


def _estimate(model: Any, held: pd.DataFrame, y_held: np.ndarray, live: dict[str, Any],
              work: Path, nannyml_python: str) -> dict[str, Any]:
    p_held = model.predict_proba(held)[:, 1]
    pred_held = (p_held > 0.5).astype(int)
    cal = calibration(p_held, y_held)
    reference = pd.DataFrame({"p": p_held, "pred": pred_held, "y": y_held})
    rows_out, analyses = {}, {}
    for name, (frame, label, _) in live.items():
        n = len(label)
        p = model.predict_proba(frame)[:, 1]
        pred = (p > 0.5).astype(np.int64)
        calibrated = cal.apply(p)
        est, raw = Estimated(SPEC), Estimated(SPEC, calibrated=False)
        for idx in np.array_split(np.arange(n), max(1, n // 256)):  # the agent's chunks
            est.add(calibrated[idx], pred[idx])
            raw.add(p[idx], pred[idx])
        real = Realized(SPEC)
        real.add(pred, label, np.column_stack([1 - p, p]))
        em = est.metrics(calibration_rows=len(y_held))["accuracy"]
        rm = real.metrics()["accuracy"]
        rows_out[name] = {
            "realized": rm.value, "realized_interval": [rm.low, rm.high],
            "estimated": em.value, "estimated_interval": [em.low, em.high],
            "estimated_uncalibrated": raw.metrics()["accuracy"].value,
            "abs_error": abs(em.value - rm.value),
            "estimated_f1": est.metrics()["f1"].value, "realized_f1": real.metrics()["f1"].value}
        analyses[name] = pd.DataFrame({"p": p, "pred": pred, "y": label})
    work.mkdir(parents=True)
    nml = _nannyml(nannyml_python, work, reference, analyses)
    for name, entry in rows_out.items():
        got = nml.get("estimates", {}).get(name)
        entry["nannyml"] = None if got is None else got["accuracy"]
        entry["nannyml_abs_error"] = None if got is None else \
            abs(got["accuracy"] - entry["realized"])
    return {"scenarios": rows_out, "knots": len(cal.x),
            "held_out_accuracy": float((pred_held == y_held).mean()),
            "nannyml": {k: v for k, v in nml.items() if k != "estimates"}}


# --------------------------------------------------------------------------- size, cost


def size() -> dict[str, Any]:
    rng = np.random.default_rng(SEED)
    ref = rng.normal(size=(2000, 20))
    spec = ProfileSpec(tuple(numeric_spec(f"feature_{i:02d}", ref[:, i]) for i in range(20)),
                       (categorical_spec("class", ["ok", "fault"]),
                        NumericSpec("confidence", CONFIDENCE_EDGES)))
    profile = Profile(spec)
    profile.update({s.name: rng.normal(0.2, 1.1, 600) for s in spec.inputs},
                   {"class": rng.choice(["ok", "fault"], 600),
                    "confidence": rng.uniform(0.5, 1, 600)})
    p = rng.uniform(0, 1, 600)
    pred = (p > 0.5).astype(np.int64)
    real, est = Realized(SPEC), Estimated(SPEC)
    real.add(pred, (rng.uniform(size=600) < p).astype(np.int64), np.column_stack([1 - p, p]),
             rng.exponential(6 * 3600.0, 600))
    est.add(p, pred)
    base = dict(device="device-0001", seq=7, bundle=BUNDLE, window_start=1.7e9,
                window_end=1.7e9 + 60, profile=to_wire(profile),
                latency_counts=(5,) * (len(LATENCY_EDGES_MS) + 1), errors={"input": 1})
    plain = len(encode(Summary(**base)))
    with_perf = len(encode(Summary(**base, performance=(
        PerformanceEntry(BUNDLE, real.to_wire(), est.to_wire()),))))
    estimate_only = len(encode(Summary(**base, performance=(
        PerformanceEntry(BUNDLE, None, est.to_wire()),))))
    return {"features": 20, "labelled_rows": 600, "without": plain,
            "with_estimate_only": estimate_only, "with_performance": with_perf}


def _contenders(chunk: int, rng: np.random.Generator) -> dict[str, Any]:
    p = rng.uniform(0, 1, chunk)
    pred = (p > 0.5).astype(np.int64)
    truth = (rng.uniform(size=chunk) < p).astype(np.int64)
    scores = np.column_stack([1 - p, p])
    delays = rng.exponential(3600.0, chunk)
    est, real = Estimated(SPEC), Realized(SPEC)
    cal = Calibration("platt", "positive", a=1.1, b=-0.05)
    return {"Estimated.add": lambda _i: est.add(p, pred),
            "Calibration.apply + Estimated.add": lambda _i: est.add(cal.apply(p), pred),
            "Realized.add (scores, delays)": lambda _i: real.add(pred, truth, scores, delays)}


def cost(repeats: int) -> dict[str, Any]:
    rng = np.random.default_rng(SEED)
    out: dict[str, Any] = {}
    for chunk in (256, 1024):
        timed = blocks(_contenders(chunk, rng), warmup=20, repeats=repeats)
        out[str(chunk)] = {name: {"median_us_per_chunk": s["median_us"],
                                  "ns_per_row": s["median_us"] * 1e3 / chunk, "n": s["n"]}
                           for name, s in timed.items()}
    return out


# --------------------------------------------------------------------------- report


def _f(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def report(doc: dict[str, Any]) -> str:
    ex = doc["exactness"]
    out = [f"Realized metrics from {ex['windows']} merged summaries ({ex['rows']:,} labelled "
           f"rows) vs scikit-learn on the same rows; confusion matrix equal: "
           f"{ex['confusion_equal']}", ""]
    out.append(table(["metric", "edgefleet", "scikit-learn", "|diff|"],
                     [[k, f"{v['edgefleet']:.6f}", f"{v['scikit-learn']:.6f}",
                       f"{v['abs_diff']:.1e}"] for k, v in ex["metrics"].items()]))
    est = doc["estimates"]
    out += ["", f"Estimated (CBPE, isotonic-calibrated on held-out rows; the interval "
                f"includes the held-out set's noise) vs realized accuracy, {est['rows']:,} "
                f"live rows per scenario", ""]
    body = []
    for model, m in est["models"].items():
        for name, s in m["scenarios"].items():
            body.append([model, name, _f(s["realized"]), _f(s["estimated"]),
                         f"{_f(s['estimated_interval'][0], 3)}-"
                         f"{_f(s['estimated_interval'][1], 3)}",
                         _f(s["abs_error"]), _f(s["estimated_uncalibrated"]),
                         _f(s["nannyml"]), _f(s["nannyml_abs_error"])])
    out.append(table(["model", "scenario", "realized", "estimated", "est. interval",
                      "|est-real|", "uncalibrated est.", "NannyML CBPE", "|NannyML-real|"],
                     body))
    for model, m in est["models"].items():
        note = m["nannyml"].get("skipped") or f"NannyML {m['nannyml'].get('version')}"
        out.append(f"{model}: held-out accuracy {m['held_out_accuracy']:.4f}, "
                   f"{m['knots']} isotonic knots; {note}")
    sz = doc["size"]
    out += ["", f"Summary of {sz['features']} numeric features, deflated: {sz['without']} B; "
                f"with the estimate: {sz['with_estimate_only']} B; with realized "
                f"({sz['labelled_rows']} labelled rows) + estimate: {sz['with_performance']} B",
            ""]
    body = []
    for chunk, timed in doc["cost"].items():
        for name, t in timed.items():
            body.append([chunk, name, f"{t['median_us_per_chunk']:.1f}",
                         f"{t['ns_per_row']:.0f}"])
    out.append(table(["chunk", "call", "median µs/chunk", "ns/row"], body))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rows and repeats")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/performance.json"),
                        help="where to write the JSON results (default: %(default)s)")
    parser.add_argument("--nannyml-python", default=sys.executable,
                        help="a Python that can import nannyml (default: this one)")
    args = parser.parse_args(argv)
    started = datetime.now(timezone.utc)
    load_before = os.getloadavg()
    clock, cpu = time.perf_counter(), time.process_time()
    rng = np.random.default_rng(SEED)
    n = 5_000 if args.quick else 20_000
    doc: dict[str, Any] = {"benchmark": "performance", "schema": 1, "quick": args.quick,
                           "started_at": started.isoformat()}
    print("exactness", file=sys.stderr, flush=True)
    doc["exactness"] = exactness(rng, n)
    print("estimates", file=sys.stderr, flush=True)
    doc["estimates"] = estimates(rng, n, args.nannyml_python)
    doc["size"] = size()
    print("cost", file=sys.stderr, flush=True)
    doc["cost"] = cost(50 if args.quick else 400)
    finish(doc, args.out, LIBRARIES, clock, cpu, load_before, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
