"""Fuzzing the device's parsers with Hypothesis: bundles and messages from hostile bytes.

Whatever arrives, a parser either returns a checked value or raises an exception of
edgefleet's own tree (a ``BundleError`` for bundles, a ``SchemaError`` for messages):
never a ``KeyError``, ``UnicodeDecodeError``, ``tarfile`` or ``zlib`` error, and never a
write to disk. The coverage-guided fuzzers in ``tests/fuzz/`` (atheris) explore further;
these run in every ``make test``.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgefleet.contract.bundle import Limits, verify_bundle
from edgefleet.contract.errors import BundleError, SchemaError
from edgefleet.contract.messages import decode
from edgefleet.contract.signing import TrustStore

LIMITS = Limits(max_bundle_bytes=1 << 20, max_member_bytes=1 << 18, max_total_bytes=1 << 19)
NAMES = st.one_of(
    st.sampled_from(["manifest.json", "signatures.json", "model.onnx", "reference.json",
                     "samples.json", "../escape", "/etc/passwd", "a/b", "C:evil", ".", "",
                     "x" * 300, "MODEL.ONNX", "name\x00nul", "ünïcode"]),
    st.text(max_size=20))
KINDS = st.sampled_from([tarfile.REGTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE,
                         tarfile.CHRTYPE, tarfile.FIFOTYPE, tarfile.CONTTYPE])
MEMBERS = st.lists(st.tuples(NAMES, KINDS, st.binary(max_size=300)), max_size=6)


def _tar(members, compress: bool) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, kind, body in members:
            info = tarfile.TarInfo(name or "unnamed")
            info.type = kind
            if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                info.linkname = "manifest.json"
            if kind in (tarfile.REGTYPE, tarfile.CONTTYPE):
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
            else:
                tar.addfile(info)
    data = raw.getvalue()
    return gzip.compress(data, mtime=0) if compress else data


@pytest.fixture(scope="module")
def trust(signing_keys) -> TrustStore:
    return TrustStore.from_files(signing_keys.trust_specs())


@pytest.fixture(scope="module")
def good(bundles) -> bytes:
    return bundles.build("1.0.0").read_bytes()


def _refused_or_valid(data: bytes, trust: TrustStore) -> None:
    with contextlib.suppress(BundleError):
        verify_bundle(data, trust, limits=Limits())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(members=MEMBERS, compress=st.booleans())
def test_crafted_archives_raise_only_bundle_errors(members, compress, trust):
    data = _tar(members, compress)
    with pytest.raises(BundleError):
        verify_bundle(data, trust, limits=LIMITS)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_real_bundles_are_refused_or_harmless(data, good, trust):
    blob = bytearray(good)
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "zero"]))
        at = data.draw(st.integers(0, len(blob) - 1))
        if kind == "flip":
            blob[at] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "truncate":
            del blob[at:]
            if not blob:
                blob = bytearray(b"\x1f")
        elif kind == "insert":
            blob[at:at] = data.draw(st.binary(min_size=1, max_size=16))
        else:
            blob[at:at + 64] = bytes(min(64, len(blob) - at))
    _refused_or_valid(bytes(blob), trust)


@settings(max_examples=200, deadline=None)
@given(blob=st.binary(max_size=2000))
def test_random_bytes_are_not_bundles(blob, trust):
    with pytest.raises(BundleError):
        verify_bundle(blob, trust, limits=LIMITS)


def test_verification_never_writes(good, trust, tmp_path, monkeypatch):
    """Verification reads bytes in memory: nothing is written, wherever the process runs."""
    monkeypatch.chdir(tmp_path)
    evil = _tar([("../../escape", tarfile.REGTYPE, b"x"), ("/tmp/abs", tarfile.REGTYPE, b"y"),
                 ("link", tarfile.SYMTYPE, b"")], compress=True)
    before = {p for p in Path("/tmp").iterdir()}
    for blob in (good, evil, good[:1000]):
        _refused_or_valid(blob, trust)
    assert list(tmp_path.iterdir()) == []
    assert {p for p in Path("/tmp").iterdir()} - before == set()
    assert not Path("/tmp/abs").exists()


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(["summary", "report", "heartbeat", "status", "desired"]),
       payload=st.one_of(
           st.binary(max_size=300),
           st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                                  st.text(max_size=10)),
                        lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=6)),
                        max_leaves=30).map(lambda v: repr(v).encode())))
def test_messages_from_hostile_bytes_raise_only_schema_errors(kind, payload):
    with contextlib.suppress(SchemaError):
        decode(f"edgefleet/v1/dev-1/{kind}", payload)


def test_the_atheris_fuzzers_are_present():
    here = Path(__file__).resolve().parents[1] / "fuzz"
    assert {p.name for p in here.glob("fuzz_*.py")} >= {"fuzz_bundle.py", "fuzz_messages.py"}
    assert os.access(here / "fuzz_bundle.py", os.R_OK)
