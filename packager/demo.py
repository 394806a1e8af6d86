"""``make demo``: train two sample models, package, verify and inspect them.

Everything runs on data that scikit-learn ships (no downloads) in ``demo-out/``:
a scaled MLP on the breast-cancer data, packaged with dynamic int8 quantisation, and a
HistGradientBoosting pipeline over numeric and categorical columns, packaged in float.
Each step goes through the real ``edgepack`` command line.
"""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from pathlib import Path

import joblib
import numpy as np
import pandas as pd

from packager.cli import main as edgepack

OUT = Path("demo-out")


def banner(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(0, 72 - len(text)), flush=True)


def run(*args: str) -> None:
    print("$ edgepack " + " ".join(args), flush=True)
    code = edgepack(list(args))
    if code != 0:
        sys.exit(f"demo: `edgepack {args[0]}` failed with exit status {code}")


def train(out: Path) -> None:
    from sklearn.compose import ColumnTransformer
    from sklearn.datasets import load_breast_cancer
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    data = load_breast_cancer(as_frame=True)
    frame = data.frame.rename(columns=lambda c: c.replace(" ", "_"))
    # a categorical column, so the second model shows mixed inputs
    frame["size_class"] = pd.cut(frame["mean_area"], [0, 400, 700, 1e9],
                                 labels=["small", "medium", "large"]).astype(str)
    train_df, eval_df = train_test_split(frame, test_size=0.25, random_state=0,
                                         stratify=frame["target"])
    train_df.to_csv(out / "train.csv", index=False)
    eval_df.to_csv(out / "eval.csv", index=False)
    features = train_df.drop(columns=["target"])
    numeric = [c for c in features.columns if c != "size_class"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlp = Pipeline([("scale", StandardScaler()),
                        ("mlp", MLPClassifier((32, 16), max_iter=600, random_state=0))])
        mlp.fit(features[numeric], train_df["target"])
        hgb = Pipeline([
            ("prep", ColumnTransformer([("num", StandardScaler(), numeric),
                                        ("cat", OneHotEncoder(handle_unknown="ignore"),
                                         ["size_class"])])),
            ("hgb", HistGradientBoostingClassifier(max_iter=150, random_state=0)),
        ]).fit(features, train_df["target"])
    joblib.dump(mlp, out / "mlp.joblib")
    joblib.dump(hgb, out / "hgb.joblib")
    print(f"trained an MLP and a HistGradientBoosting pipeline on {len(train_df)} rows "
          f"({len(eval_df)} held out)")


def main() -> None:
    os.environ.setdefault("SOURCE_DATE_EPOCH", "1767225600")  # reproducible bundles
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir()
    banner("1. train two sample models (scikit-learn's breast-cancer data)")
    train(OUT)
    banner("2. a signing key for the build and one for the approver")
    run("keygen", "build", "--out", str(OUT / "keys"))
    run("keygen", "approver", "--out", str(OUT / "keys"))
    banner("3. package the MLP with dynamic int8 quantisation")
    run("build", str(OUT / "mlp.joblib"), "--train-data", str(OUT / "train.csv"),
        "--target", "target", "--eval-data", str(OUT / "eval.csv"), "--name", "cancer-mlp",
        "--version", "1.0.0", "--key", str(OUT / "keys/build.key"), "--quantize", "dynamic",
        "--out", str(OUT / "bundles"), "--description", "demo: MLP, int8")
    banner("4. package the gradient-boosting pipeline (numeric + categorical inputs)")
    run("build", str(OUT / "hgb.joblib"), "--train-data", str(OUT / "train.csv"),
        "--target", "target", "--eval-data", str(OUT / "eval.csv"), "--name", "cancer-hgb",
        "--version", "1.0.0", "--key", str(OUT / "keys/build.key"),
        "--out", str(OUT / "bundles"), "--description", "demo: HistGradientBoosting, float")
    banner("5. an approver countersigns; verify asks for both roles")
    mlp_bundle = str(OUT / "bundles/cancer-mlp-1.0.0.edgebundle")
    hgb_bundle = str(OUT / "bundles/cancer-hgb-1.0.0.edgebundle")
    run("sign", mlp_bundle, "--key", str(OUT / "keys/approver.key"))
    trust = ["--trust", f"build={OUT / 'keys/build.pub'}",
             "--trust", f"approver={OUT / 'keys/approver.pub'}"]
    run("verify", mlp_bundle, *trust, "--threshold", "2", "--require-role", "approver")
    run("verify", hgb_bundle, *trust)
    banner("6. a tampered copy is refused")
    tampered = OUT / "bundles/tampered.edgebundle"
    raw = bytearray(Path(hgb_bundle).read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    tampered.write_bytes(bytes(raw))
    print(f"$ edgepack verify {tampered} ...   (one byte flipped)")
    code = edgepack(["verify", str(tampered), *trust])
    print(f"exit status {code}")
    if code != 1:
        sys.exit("demo: a tampered bundle was not refused")
    banner("7. inspect")
    run("inspect", mlp_bundle, *trust)
    print()
    run("inspect", hgb_bundle, *trust)
    banner("done")
    print(f"bundles in {OUT / 'bundles'}; keys in {OUT / 'keys'}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
