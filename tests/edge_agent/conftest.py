"""Fixtures the agent's tests share."""

from __future__ import annotations

import pytest

from edge_agent.model import LoadedModel
from edgefleet.contract.bundle import verify_bundle
from edgefleet.contract.signing import TrustStore


@pytest.fixture(scope="module")
def load(bundles, signing_keys):
    """``load(version, model)``: a test bundle built, verified and loaded into onnxruntime."""
    trust = TrustStore.from_files(signing_keys.trust_specs())

    def make(version: str = "1.0.0", model: str = "logreg") -> LoadedModel:
        return LoadedModel(verify_bundle(bundles.build(version, model=model).read_bytes(),
                                         trust))

    return make
