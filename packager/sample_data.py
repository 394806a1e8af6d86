"""A synthetic sensor data set for the demo and the tests: numpy only, no downloads.

Four readings of a machine (``temperature`` in °C, ``humidity`` in %, ``vibration`` in
mm/s, ``current`` in A) and a ``fault`` label that depends on three of them with noise, as
a predictive-maintenance model would see. :func:`sensor_data` draws rows; ``shift`` adds to
a reading, which is how the demo makes one site's humidity sensor drift.
"""

from __future__ import annotations

import numpy as np

__all__ = ["FEATURES", "sensor_data", "sensor_matrix"]

FEATURES = ("temperature", "humidity", "vibration", "current")


def sensor_matrix(rows: int, rng: np.random.Generator,
                  shift: dict[str, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(readings (rows, 4) in FEATURES order, fault labels (rows,))``."""
    x = np.column_stack([
        rng.normal(60.0, 8.0, rows),
        rng.uniform(20.0, 80.0, rows),
        rng.lognormal(0.0, 0.5, rows),
        rng.normal(4.0, 1.0, rows),
    ])
    score = (0.15 * (x[:, 0] - 60) + 1.2 * (x[:, 2] - 1.1) + 0.6 * (x[:, 3] - 4)
             + rng.normal(0, 0.5, rows))
    y = (score > 0.8).astype(int)
    for name, delta in (shift or {}).items():
        x[:, FEATURES.index(name)] += delta
    return x, y


def sensor_data(rows: int, seed: int = 0, *, shift: dict[str, float] | None = None):
    """The same as a pandas DataFrame with a ``fault`` column (pandas: the packager's)."""
    import pandas as pd

    x, y = sensor_matrix(rows, np.random.default_rng(seed), shift)
    frame = pd.DataFrame(x, columns=list(FEATURES))
    frame["fault"] = y
    return frame
