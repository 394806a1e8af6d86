"""Act 1: train a predictive-maintenance model in three versions and package each.

v1 (logistic regression), v2 (a small MLP, with a model card: a slice, fairness across
sites, an approver's signature and review date) and v3, a faulty build trained on inverted
labels that passes its own smoke test. The keys go to ``out/keys``, the bundles to
``out/bundles``. Also the story's way to run ``edgepack`` in-process (:func:`edgepack_quiet`).
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from demo.lines import say
from demo.stage import SITES


def package(out: Path) -> dict[str, Path]:
    """Train and package v1, v2 and the faulty v3; keys in ``out/keys``."""
    from packager.cli import main as edgepack

    train, review = _data(out)
    for args in (("keygen", "build", "--out", str(out / "keys")),
                 ("keygen", "approver", "--out", str(out / "keys"))):
        edgepack_quiet(edgepack, args, quiet=True)
    return {version: _build(out, version, model, review)
            for version, model in _models(train, out).items()}


def _data(out: Path) -> tuple[Any, str]:
    """The training and evaluation CSVs and v2's card: the training frame, the card's
    review date."""
    from packager.sample_data import sensor_data

    train = sensor_data(3000, seed=1)
    # the site a machine stands in: not a model input, but v2's card reports its
    # fairness across sites (and a deliberate review date)
    train["site"] = np.random.default_rng(1).choice(list(SITES), len(train))
    train.to_csv(out / "train.csv", index=False)
    held = sensor_data(600, seed=2)
    held["site"] = np.random.default_rng(2).choice(list(SITES), len(held))
    held.to_csv(out / "eval.csv", index=False)
    review = time.strftime("%Y-%m-%d", time.gmtime(time.time() + 180 * 86400))
    (out / "card.toml").write_text(
        'owner = "Maintenance analytics"\ncontact = "ml@example.com"\n'
        'intended_use = "Flag machines for an inspection before they fail"\n'
        'out_of_scope = "Stopping a machine without a person deciding"\n'
        'limitations = "Synthetic sensor data; two sites"\n'
        f"review_by = {review}\n")
    return train, review


def _models(train: Any, out: Path) -> dict[str, Any]:
    """The three versions, fitted and saved as ``model-VERSION.joblib``."""
    import joblib
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    from packager.sample_data import FEATURES

    x, y = train[list(FEATURES)], train["fault"]
    models = {
        "1.0.0": Pipeline([("scale", StandardScaler()), ("lr", LogisticRegression())]),
        "2.0.0": Pipeline([("scale", StandardScaler()),
                           ("mlp", MLPClassifier((16, 8), max_iter=800, random_state=0))]),
        "3.0.0": Pipeline([("scale", StandardScaler()), ("lr", LogisticRegression())]),
    }
    for version, model in models.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(x, 1 - y if version == "3.0.0" else y)  # v3: the faulty build
        joblib.dump(model, out / f"model-{version}.joblib")
    return models


def _build(out: Path, version: str, model: Any, review: str) -> Path:
    """``edgepack build`` one version (v2 with its card, then approved); print its line."""
    from packager.cli import main as edgepack

    card = ("--card", str(out / "card.toml"), "--slice-by", "temperature",
            "--sensitive", "site", "--max-fairness-gap",
            "demographic_parity_difference=0.25") if version == "2.0.0" else ()
    say(f"$ edgepack build model-{version}.joblib --name sensor --version {version} "
        + ("--card card.toml --slice-by temperature --sensitive site ..." if card
           else "..."))
    edgepack_quiet(edgepack, (
        "build", str(out / f"model-{version}.joblib"), "--train-data",
        str(out / "train.csv"), "--target", "fault", "--eval-data", str(out / "eval.csv"),
        "--name", "sensor", "--version", version, "--key", str(out / "keys/build.key"),
        "--out", str(out / "bundles"), "--json", *card), quiet=True)
    path = out / "bundles" / f"sensor-{version}.edgebundle"
    if card:
        edgepack_quiet(edgepack, ("sign", str(path), "--key",
                                  str(out / "keys/approver.key"), "--role", "approver",
                                  "--comment", "site gap within bounds", "--review-by",
                                  review), quiet=True)
    manifest = _inspect(path)
    acc = manifest["metrics"].get("eval_accuracy", 0.0)
    say(f"  sensor@{version}: {manifest['lineage']['estimator']}, eval accuracy "
        f"{acc:.1%}, fidelity {manifest['fidelity']['label_agreement']:.1%} label "
        f"agreement, {path.stat().st_size:,} bytes")
    if card:
        _card_lines(path)
    return path


def _card_lines(path: Path) -> None:
    """v2's model card, as ``edgepack card --format json`` gives it: a slice, a fairness
    line, the approval and the review date."""
    import io

    from packager.cli import main as edgepack

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        edgepack(["card", str(path), "--format", "json"])
    card = json.loads(buffer.getvalue())
    for sl in card["slices"]:
        worst = next(g for g in sl["groups"] if g["value"] == sl["worst"])
        acc = next(m for m in worst["metrics"] if m["name"] == sl["metric"])
        say(f"  card: slice by {sl['column']} ({sl['binning']}): worst {sl['worst']} "
            f"{sl['metric']} {acc['value']:.1%} [{acc['low']:.1%}, {acc['high']:.1%}] "
            f"(n={worst['n']})")
    for report in card["fairness"]:
        rates = ", ".join(f"{g['value']} {g['rates']['selection_rate']:.1%}"
                          for g in report["groups"])
        gap = report["gaps"]["demographic_parity_difference"]
        check = next(c for c in card["checks"] if c["column"] == report["column"])
        say(f"  card: fairness by {report['column']}: selection rate {rates}; demographic "
            f"parity difference {gap:.3f} (bound {check['bound']}: "
            f"{'passed' if check['passed'] else 'FAILED'})")
    for a in card["approvals"]:
        say(f"  card: approved as {a['role']} ({a['comment']!r}), review by {card['review_by']}")


def edgepack_quiet(edgepack: Callable[[list[str]], int], args: tuple[str, ...], *,
              quiet: bool) -> None:
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer) if quiet else contextlib.nullcontext():
        code = edgepack(list(args))
    if code != 0:
        say(buffer.getvalue())
        raise SystemExit(f"demo: `edgepack {args[0]}` failed (exit {code})")


def _inspect(path: Path) -> dict[str, Any]:
    from edgefleet.contract.bundle import read_unverified

    return read_unverified(path.read_bytes()).manifest.to_dict()
