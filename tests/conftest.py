"""Fixtures every test package may use: signing keys and real bundles (session-scoped).

The package conftests (``tests/edge_agent``, ``tests/packager``) have fixtures of their own
for contract and packager tests; the names here (``signing_keys``, ``bundles``) do not
clash with theirs.
"""

from __future__ import annotations

import pytest

from tests.bundles import BundleFactory, SigningKeys, make_keys


@pytest.fixture(scope="session")
def signing_keys(tmp_path_factory) -> SigningKeys:
    """A build key and an approver key, written as files (private keys at 0600)."""
    return make_keys(tmp_path_factory.mktemp("signing-keys"))


@pytest.fixture(scope="session")
def bundles(tmp_path_factory, signing_keys) -> BundleFactory:
    """``bundles.build("1.0.0")`` → the path of a real, signed ``sensor@1.0.0`` bundle."""
    return BundleFactory(tmp_path_factory.mktemp("bundles"), signing_keys)
