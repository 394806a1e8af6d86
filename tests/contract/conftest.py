"""Shared fixtures for the contract tests: keys, a valid manifest and a valid bundle.

Keys are session-scoped (Ed25519 generation is cheap, but a stable key id across one
run makes failures easier to read). Everything else is built fresh per test, so a test
that mutates what it gets cannot leak into another.
"""

from __future__ import annotations

import random

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.contract.bundle import file_entry, pack_bundle
from edgefleet.contract.manifest import (
    Binding,
    FeatureSpec,
    Fidelity,
    Lineage,
    Manifest,
    OutputSpec,
    Quantization,
)
from edgefleet.contract.signing import Envelope, TrustedKey, TrustStore, generate_key, key_id

BUNDLE_MTIME = 1_700_000_000
MODEL_BYTES = random.Random(20240601).randbytes(8192)  # incompressible: sizes stay honest
REFERENCE_BYTES = b'{"schema":1,"inputs":[],"outputs":[]}'


@pytest.fixture(scope="session")
def build_key() -> Ed25519PrivateKey:
    return generate_key()


@pytest.fixture(scope="session")
def approver_key() -> Ed25519PrivateKey:
    return generate_key()


@pytest.fixture(scope="session")
def stranger_key() -> Ed25519PrivateKey:
    """A key no trust store in these tests contains."""
    return generate_key()


@pytest.fixture
def trust(build_key, approver_key) -> TrustStore:
    """The build key with role ``build`` and the approver key with role ``approver``."""
    return TrustStore([
        TrustedKey(key_id(build_key.public_key()), build_key.public_key(), "build", "ci"),
        TrustedKey(key_id(approver_key.public_key()), approver_key.public_key(), "approver",
                   "alice"),
    ])


@pytest.fixture
def bundle_files() -> dict[str, bytes]:
    return {"model.onnx": MODEL_BYTES, "reference.json": REFERENCE_BYTES}


def make_manifest(files: dict[str, bytes], version: str = "1.2.0") -> Manifest:
    return Manifest(
        name="iris-classifier",
        version=version,
        created_at="2024-06-01T12:00:00Z",
        task="classification",
        inputs=(
            FeatureSpec("sepal length", "numeric", "float32", 4.3, 7.9),
            FeatureSpec("colour", "categorical", "string", categories=("blue", "red"),
                        missing_allowed=True),
        ),
        outputs=(OutputSpec("label", "label", "int64"),
                 OutputSpec("probabilities", "probabilities", "float32")),
        binding=Binding("columns"),
        files=tuple(sorted(file_entry(k, v) for k, v in files.items())),
        reference_hash="ab" * 32,
        lineage=Lineage("cd" * 32, "sklearn", "Pipeline(StandardScaler, LogisticRegression)",
                        "ef" * 32, 150, "0123abcd", {"numpy": "2.0.0", "onnx": "1.16.0"}),
        classes=(0, 1, 2),
        quantization=Quantization("dynamic", True, 3, ("Softmax",), "kept softmax in float"),
        fidelity=Fidelity(rows=30, label_agreement=1.0, max_abs_prob_diff=1e-6,
                          bounds={"label_agreement": 0.99}),
        metrics={"accuracy": 0.95, "f1": 0.9},
        description="test model",
    )


@pytest.fixture
def manifest(bundle_files) -> Manifest:
    return make_manifest(bundle_files)


@pytest.fixture
def bundle_bytes(manifest, bundle_files, build_key) -> bytes:
    """A valid bundle signed by the build key only."""
    envelope = Envelope().signed(build_key, manifest.to_bytes())
    return pack_bundle(manifest, envelope, bundle_files, BUNDLE_MTIME)
