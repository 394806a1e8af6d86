"""Fidelity benchmark: mixed pipelines, XGBoost and LightGBM, packaged against the original.

Run from the repository root::

    .venv/bin/python benchmarks/fidelity.py [--rows 2000] [--out benchmarks/out/fidelity.json]

For each model, side by side in one run:

- ``edgepack``: the bundle :func:`packager.build.build` makes (float64 preprocessing,
  exact split thresholds), run by the device's :class:`edgefleet.contract.runtime.ModelRunner`;
- ``skl2onnx float32``: the baseline a user gets by converting the same model directly
  (``skl2onnx.to_onnx`` with float32 inputs, onnxmltools' converters registered for
  XGBoost / LightGBM), run by a bare onnxruntime session.

Each is compared with the original's ``predict_proba`` / ``predict`` on held-out rows (a
category never seen in training among them) and on as many rows with one numeric column
moved within 1e-9 of a split threshold (``tests.packager.test_mixed.near_threshold_rows``:
the threshold's raw value, ±1e-9 and 1-4 float64 ulps either side). The issue-13 target
is max |Δp| ≤ 1e-5 and every label equal on both sets. Data: the synthetic sensor-like
frame of the tests (3 numeric columns, one with 10 % missing, 2 string columns), seeds
fixed; training on ``--rows`` rows, the held-out set as large. One thread (threadpoolctl).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import onnxruntime as ort
import pandas as pd
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine, table  # noqa: E402
from edgefleet.contract.bundle import read_unverified  # noqa: E402
from edgefleet.contract.runtime import ModelRunner  # noqa: E402
from packager.boosters import register  # noqa: E402
from packager.build import BuildOptions, build  # noqa: E402
from tests.packager.conftest import columns_of  # noqa: E402
from tests.packager.test_mixed import (  # noqa: E402
    data,
    float32_misroutes,
    near_threshold_rows,
    pipe,
)


def models() -> dict[str, tuple[Any, str]]:
    from lightgbm import LGBMClassifier, LGBMRegressor
    from sklearn.ensemble import HistGradientBoostingClassifier
    from xgboost import XGBClassifier, XGBRegressor

    return {
        "mixed pipeline + HistGradientBoostingClassifier (issue 13)":
            (pipe(HistGradientBoostingClassifier(random_state=0)), "binary"),
        "mixed pipeline + XGBClassifier": (pipe(XGBClassifier(n_estimators=100, max_depth=4,
                                                              random_state=0)), "binary"),
        "mixed pipeline + LGBMClassifier": (pipe(LGBMClassifier(n_estimators=100,
                                                                random_state=0, verbose=-1)),
                                            "binary"),
        "mixed pipeline + XGBRegressor": (pipe(XGBRegressor(n_estimators=100, max_depth=4,
                                                            random_state=0)), "value"),
        "mixed pipeline + LGBMRegressor": (pipe(LGBMRegressor(n_estimators=100, random_state=0,
                                                              verbose=-1)), "value"),
    }


def baseline(model: Any, X: pd.DataFrame, classifier: bool) -> ort.InferenceSession:
    """What converting directly with skl2onnx gives: float32 inputs, its own converters."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType

    register("xgboost")
    register("lightgbm")
    types = [(c, StringTensorType([None, 1]) if X[c].dtype == object
              else FloatTensorType([None, 1])) for c in X.columns]
    final = model.steps[-1][1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onx = to_onnx(model, initial_types=types, target_opset={"": 17, "ai.onnx.ml": 3},
                      options={id(final): {"zipmap": False}} if classifier else None)
    return ort.InferenceSession(onx.SerializeToString(), providers=["CPUExecutionProvider"])


def compare(model: Any, X: pd.DataFrame, run: Any, classifier: bool) -> dict[str, float]:
    got = run(X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if classifier:
            labels, proba = model.predict(X), model.predict_proba(X)
            return {"max_abs_prob_diff": float(np.abs(got["proba"] - proba).max()),
                    "labels_differing": int((np.asarray(got["label"]).astype(str)
                                             != np.asarray(labels).astype(str)).sum())}
        want = np.asarray(model.predict(X), dtype=np.float64)
        err = np.abs(np.asarray(got["value"], dtype=np.float64).ravel() - want)
        return {"max_abs_error": float(err.max()), "max_rel_error": float(err.max() / want.std())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2000, help="training (and held-out) rows")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/out/fidelity.json")
    args = parser.parse_args()
    load_before = os.getloadavg()
    started = time.time()
    results = []
    with threadpool_limits(1), tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        key = work / "keys"
        from edgefleet.contract.signing import generate_key, write_key_pair

        private, _ = write_key_pair(generate_key(), key, "bench")
        X, *train_targets = data(args.rows, 0)
        X_test, *test_targets = data(args.rows, 1, unseen=True)
        for name, (model, target) in models().items():
            which = ["binary", "three", "value"].index(target)
            y, y_test = train_targets[which], test_targets[which]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.fit(X, y)
            classifier = target != "value"
            joblib.dump(model, work / "model.joblib")
            X.assign(target=y.to_numpy()).to_csv(work / "train.csv", index=False)
            X_test.assign(target=y_test.to_numpy()).to_csv(work / "test.csv", index=False)
            t0 = time.perf_counter()
            result = build(BuildOptions(model=work / "model.joblib", train_data=work / "train.csv",
                                        eval_data=work / "test.csv", target="target",
                                        name="bench", version="1.0.0", key=private,
                                        out_dir=work / "out", code_revision="bench"))
            build_s = time.perf_counter() - t0
            bundle = read_unverified(result.path.read_bytes())
            runner = ModelRunner(bundle.manifest, bundle.members["model.onnx"])

            def ours(rows: pd.DataFrame, runner: ModelRunner = runner) -> dict[str, Any]:
                p = runner.run_columns(columns_of(rows))
                return {"label": p.labels, "proba": p.probabilities, "value": p.values}

            session = baseline(model, X, classifier)

            def bare(rows: pd.DataFrame, session: Any = session,
                     classifier: bool = classifier) -> dict[str, Any]:
                feeds = {c: (rows[c].to_numpy(dtype=object) if rows[c].dtype == object
                             else rows[c].to_numpy(dtype=np.float32)).reshape(-1, 1)
                         for c in rows.columns}
                out = session.run(None, feeds)
                return {"label": out[0], "proba": out[1] if classifier else None,
                        "value": out[0]}

            near = near_threshold_rows(model, X_test, n=args.rows)
            row = {"model": name, "build_s": round(build_s, 2), "notes": result.notes,
                   "near_rows_float32_misroutes": float32_misroutes(model, near)}
            for label, run in (("edgepack", ours), ("skl2onnx_float32", bare)):
                row[label] = {"held_out": compare(model, X_test, run, classifier),
                              "near_threshold": compare(model, near, run, classifier)}
            results.append(row)
            print(f"done {name} ({build_s:.1f} s build)", file=sys.stderr)

    def cell(r: dict[str, Any], who: str, where: str) -> str:
        m = r[who][where]
        if "max_abs_prob_diff" in m:
            return f"{m['max_abs_prob_diff']:.2g} / {m['labels_differing']}"
        return f"{m['max_rel_error']:.2g}"

    head = ["model", "edgepack held-out", "edgepack near", "skl2onnx f32 held-out",
            "skl2onnx f32 near"]
    rows = [[r["model"], *(cell(r, w, s) for w in ("edgepack", "skl2onnx_float32")
                           for s in ("held_out", "near_threshold"))] for r in results]
    print(f"max |Δp| / labels differing (classifiers), max |error| / std (regressors); "
          f"{args.rows} held-out rows, {args.rows} near-threshold rows")
    print(table(head, rows))
    doc = {"benchmark": "fidelity", "when": datetime.now(timezone.utc).isoformat(),
           "rows": args.rows, "wall_s": round(time.time() - started, 1),
           "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
           "machine": machine(("numpy", "onnxruntime", "skl2onnx", "onnxmltools",
                               "scikit-learn", "xgboost", "lightgbm")),
           "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
