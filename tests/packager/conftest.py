"""Shared fixtures and helpers for the packager tests: a signing key, data sets, builds.

Everything is real: scikit-learn models trained on the data sets scikit-learn ships (no
downloads), CSV files written with pandas into temporary directories, bundles built by
:func:`packager.build.build` and run by onnxruntime through the device's own runner.

Training runs with one OpenMP thread: on a 2-core machine shared with other test
processes, HistGradientBoosting's thread pool spins and a 0.3 s fit takes 3-8 s.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sklearn import datasets
from sklearn.exceptions import ConvergenceWarning
from threadpoolctl import threadpool_limits

from edgefleet.contract.signing import TrustStore, generate_key, key_id, write_key_pair
from packager.build import BuildOptions, BuildResult, build

EPOCH = "1767225600"  # 2026-01-01T00:00:00Z
MAX_ROWS = 600


@dataclass(frozen=True)
class KeyPair:
    key: Ed25519PrivateKey
    private: Path
    public: Path
    keyid: str


def _key_pair(directory: Path, name: str) -> KeyPair:
    key = generate_key()
    private, public = write_key_pair(key, directory, name)
    return KeyPair(key, private, public, key_id(key.public_key()))


@pytest.fixture(scope="session")
def build_key(tmp_path_factory) -> KeyPair:
    """The key every test bundle is signed with (role ``build`` in :func:`trust`)."""
    return _key_pair(tmp_path_factory.mktemp("keys"), "build")


@pytest.fixture(scope="session")
def approver_key(tmp_path_factory) -> KeyPair:
    return _key_pair(tmp_path_factory.mktemp("approver-keys"), "approver")


@pytest.fixture(scope="session")
def stranger_key(tmp_path_factory) -> KeyPair:
    """A key no trust store in these tests contains."""
    return _key_pair(tmp_path_factory.mktemp("stranger-keys"), "stranger")


@pytest.fixture(scope="session")
def trust(build_key) -> TrustStore:
    return TrustStore.from_files([f"build={build_key.public}"])


# --------------------------------------------------------------------------- data


def _clean(name: str) -> str:
    return name.replace(" ", "_").replace("(", "").replace(")", "")


def dataset(name: str, string_labels: bool = False) -> tuple[pd.DataFrame, pd.Series]:
    """A scikit-learn data set as (features, target), at most MAX_ROWS rows.

    Args:
        name: breast_cancer, iris, wine, digits or diabetes.
        string_labels: classes as their names ("setosa", "malignant", ...).
    """
    bunch = getattr(datasets, f"load_{name}")(as_frame=True)
    X = bunch.data.rename(columns=_clean)
    y = bunch.target.rename("target")
    if string_labels:
        y = y.map(dict(enumerate(bunch.target_names))).astype(object)
    if len(X) > MAX_ROWS:  # digits: a stratified-enough prefix (the rows cycle 0-9)
        X, y = X.iloc[:MAX_ROWS], y.iloc[:MAX_ROWS]
    return X.reset_index(drop=True), y.reset_index(drop=True)


def split(X: pd.DataFrame, y: pd.Series, test_share: float = 0.3, seed: int = 0):
    """Deterministic train/test split, stratified for classification targets."""
    from sklearn.model_selection import train_test_split

    stratify = y if y.dtype == object or y.nunique() <= 10 else None
    return train_test_split(X, y, test_size=test_share, random_state=seed, stratify=stratify)


def write_csv(path: Path, X: pd.DataFrame, y: pd.Series | None = None) -> Path:
    frame = X if y is None else X.assign(target=y.to_numpy())
    frame.to_csv(path, index=False)
    return path


def fit(est: Any, X: Any, y: Any) -> Any:
    """Fit quietly (few iterations on purpose) and on one thread."""
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        return est.fit(X, y)


def dump(est: Any, path: Path) -> Path:
    joblib.dump(est, path)
    return path


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def columns_of(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """A DataFrame as the runner takes it: numeric float64, strings as object (None)."""
    out = {}
    for name in frame.columns:
        col = frame[name]
        if pd.api.types.is_numeric_dtype(col):
            out[name] = col.to_numpy(dtype=np.float64)
        else:
            out[name] = np.array([None if v is None or v != v else str(v) for v in col],
                                 dtype=object)
    return out


@pytest.fixture
def make_bundle(build_key, tmp_path):
    """``make_bundle(model_path, train_csv, **options) -> BuildResult`` into tmp_path."""

    def run(model: Path, train: Path, *, name: str = "model", version: str = "1.0.0",
            target: str | None = "target", **options: Any) -> BuildResult:
        options.setdefault("out_dir", tmp_path / "out")
        options.setdefault("code_revision", "test-revision")
        return build(BuildOptions(model=model, train_data=train, name=name, version=version,
                                  key=build_key.private, target=target, **options))

    return run
