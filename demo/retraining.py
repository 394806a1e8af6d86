"""The demo's retraining recipe functions (``demo-out/retrain/recipe.toml`` names them).

``load`` is the recipe's data source: in a real deployment your warehouse or ``fleet
dataset export``; here the rows the story's devices served since the labelling rule
changed, with the labels that came back for them (the story writes them to
``demo-out/retrain/fresh.csv`` just before the run). ``fit`` trains the same kind of model
as v2, on whatever rows it is given (the run holds out the newest ones itself).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

FRESH = Path("demo-out") / "retrain" / "fresh.csv"  # the story runs from the repository


def load() -> Any:
    """The fresh labelled rows: ``ts`` (unix seconds), the four readings, ``fault``."""
    import pandas as pd

    return pd.read_csv(FRESH)


def fit(frame: Any) -> Any:
    """v2's architecture (a small MLP behind a scaler), retrained on ``frame``."""
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    from packager.sample_data import FEATURES

    model = Pipeline([("scale", StandardScaler()),
                      ("mlp", MLPClassifier((16, 8), max_iter=800, random_state=0))])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter, not news in the story
        return model.fit(frame[list(FEATURES)], frame["fault"])


def fit_shuffled(frame: Any) -> Any:
    """:func:`fit` on the same rows with their labels shuffled (act 9: a broken join in the
    label pipeline), so the challenger learns nothing and must lose to the champion."""
    import numpy as np

    shuffled = frame.assign(fault=np.random.default_rng(0).permutation(frame["fault"].to_numpy()))
    return fit(shuffled)
