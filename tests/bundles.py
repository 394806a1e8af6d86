"""Real bundles for the agent and server tests, built once per session by the real packager.

The data is a small synthetic sensor table (numpy, no downloads): four numeric features
and a binary ``fault`` target that depends on them. :class:`BundleFactory` trains a model
on it, packages it with :func:`packager.build.build` and caches the file, so every test
that needs ``sensor@1.0.0`` gets the same bytes.

Kinds of model:

- ``logreg`` (default): a scaled logistic regression; builds in a fraction of a second.
- ``mlp``: a small scaled MLP.
- ``inverted``: trained on the inverted target. It passes its own smoke test (its samples
  are its own answers) but disagrees with ``logreg`` on almost every row: the bundle a
  rollout's prediction-drift gate must stop.

:meth:`BundleFactory.broken_smoke` re-signs a bundle whose ``samples.json`` expects
other answers than the model gives: signature and digests are valid, the device's
smoke test fails.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from edgefleet.contract.bundle import file_entry, pack_bundle, read_unverified
from edgefleet.contract.signing import (
    Envelope,
    generate_key,
    key_id,
    load_private_key,
    write_key_pair,
)
from packager.sample_data import FEATURES, sensor_data

__all__ = ["FEATURES", "BundleFactory", "KeyPair", "SigningKeys", "make_keys", "sensor_data"]

EPOCH = "1767225600"  # 2026-01-01T00:00:00Z


@dataclass(frozen=True)
class KeyPair:
    private: Path
    public: Path
    keyid: str


@dataclass(frozen=True)
class SigningKeys:
    build: KeyPair
    approver: KeyPair

    def trust_specs(self) -> list[str]:
        """``ROLE=PATH`` strings for :meth:`TrustStore.from_files` and the CLIs."""
        return [f"build={self.build.public}", f"approver={self.approver.public}"]


def make_keys(directory: Path) -> SigningKeys:
    directory.mkdir(parents=True, exist_ok=True)
    pairs = {}
    for name in ("build", "approver"):
        key = generate_key()
        private, public = write_key_pair(key, directory, name)
        pairs[name] = KeyPair(private, public, key_id(key.public_key()))
    return SigningKeys(**pairs)


class BundleFactory:
    """Builds and caches real bundles signed with ``keys.build``."""

    def __init__(self, directory: Path, keys: SigningKeys) -> None:
        self.dir = directory
        self.keys = keys
        self.dir.mkdir(parents=True, exist_ok=True)
        self._cache: dict[tuple, Path] = {}
        self.train = self.dir / "train.csv"
        sensor_data(800, seed=1).to_csv(self.train, index=False)

    def build(self, version: str = "1.0.0", *, name: str = "sensor", model: str = "logreg"
              ) -> Path:
        """The path of ``name@version`` built from a ``model`` kind (cached)."""
        key = (name, version, model)
        if key not in self._cache:
            self._cache[key] = self._build(name, version, model)
        return self._cache[key]

    def _build(self, name: str, version: str, model: str) -> Path:
        import joblib
        from sklearn.linear_model import LogisticRegression
        from sklearn.neural_network import MLPClassifier
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import StandardScaler

        from packager.build import BuildOptions, build

        frame = pd.read_csv(self.train)
        X, y = frame[list(FEATURES)], frame["fault"]
        if model == "inverted":
            y = 1 - y
        if model == "mlp":
            est = MLPClassifier((16,), max_iter=300, random_state=0)
        else:
            est = LogisticRegression(max_iter=500)
        pipe = Pipeline([("scale", StandardScaler()), ("model", est)])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe.fit(X, y)
        work = self.dir / f"{name}-{version}-{model}"
        work.mkdir(exist_ok=True)
        joblib.dump(pipe, work / "model.joblib")
        result = build(BuildOptions(
            model=work / "model.joblib", train_data=self.train, target="fault", name=name,
            version=version, key=self.keys.build.private, out_dir=work,
            code_revision="test-revision"))
        return result.path

    def broken_smoke(self, version: str = "9.9.9", *, name: str = "sensor") -> Path:
        """A validly signed bundle whose smoke-test expectations are wrong."""
        key = (name, version, "broken-smoke")
        if key in self._cache:
            return self._cache[key]
        good = read_unverified(self.build(version, name=name).read_bytes())
        samples = json.loads(good.member("samples.json"))
        samples["labels"] = [1 - int(v) for v in samples["labels"]]
        samples["probabilities"] = [[p[1], p[0]] for p in samples["probabilities"]]
        body = json.dumps(samples, sort_keys=True, separators=(",", ":")).encode()
        files = {k: v for k, v in good.members.items()
                 if k not in ("manifest.json", "signatures.json")}
        files["samples.json"] = body
        manifest = replace(good.manifest,
                           files=tuple(sorted(file_entry(k, v) for k, v in files.items())))
        signer = load_private_key(self.keys.build.private)
        data = pack_bundle(manifest, Envelope().signed(signer, manifest.to_bytes()), files,
                           good.mtime)
        path = self.dir / f"{name}-{version}-broken-smoke.edgebundle"
        path.write_bytes(data)
        self._cache[key] = path
        return path
