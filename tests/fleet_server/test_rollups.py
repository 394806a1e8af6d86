"""Rollups against the profile code itself: packing and bulk merges lose nothing."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from edgefleet.contract.errors import ReferenceMismatchError, SchemaError
from edgefleet.contract.profile import (
    CategoricalSpec,
    Profile,
    ProfileSpec,
    from_wire,
    numeric_spec,
    to_wire,
)
from fleet_server.monitoring.drift import tile
from fleet_server.profiles.rollups import Layout, layout_for

RNG = np.random.default_rng(7)
SPEC = ProfileSpec(
    (numeric_spec("x", RNG.normal(0, 1, 500), bins=8),
     numeric_spec("y", RNG.uniform(-5, 5, 500), bins=4),
     CategoricalSpec("c", ("a", "b", "c"), ("d",), True)),
    (CategoricalSpec("class", ("0", "1")), numeric_spec("confidence", RNG.uniform(0, 1, 100))),
)


def profile(rows: int, seed: int) -> Profile:
    rng = np.random.default_rng(seed)
    x = rng.normal(0.3, 1.5, rows)
    x[rng.random(rows) < 0.1] = np.nan  # missing values count too
    p = Profile(SPEC)
    p.update({"x": x, "y": rng.uniform(-8, 8, rows),
              "c": rng.choice(["a", "b", "c", "d", "zz", None], rows)},
             {"class": rng.choice(["0", "1"], rows), "confidence": rng.uniform(0, 1, rows)},
             rows=rows)
    return p


def assert_same(got: Profile, want: Profile, rel: float) -> None:
    g, w = got.to_dict(), want.to_dict()
    assert g["rows"] == w["rows"]
    for side in ("inputs", "outputs"):
        for name, ws in w[side].items():
            gs = g[side][name]
            assert gs["counts"] == ws["counts"], name  # exactly
            if "sums" in ws:
                assert gs["missing"] == ws["missing"]
                if ws["min"] is None:
                    assert (gs["min"], gs["max"]) == (None, None)
                else:
                    assert (gs["min"], gs["max"]) == pytest.approx((ws["min"], ws["max"]),
                                                                   rel=rel)
                assert gs["sums"] == pytest.approx(ws["sums"], rel=rel, abs=1e-9)
                assert gs["m2"] == pytest.approx(ws["m2"], rel=rel, abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 60), min_size=1, max_size=12), seed=st.integers(0, 999))
def test_merging_packed_profiles_is_merging_profiles(sizes, seed):
    layout = layout_for(SPEC)
    parts = [profile(n, seed + i) for i, n in enumerate(sizes)]
    blobs = [layout.pack_profile(p).to_bytes() for p in parts]
    merged = layout.merge_bytes(blobs)
    assert merged.summaries == len(parts)
    want = Profile.merged(SPEC, parts)
    assert_same(merged.to_profile(), want, rel=1e-9)
    # min and max are exact, not merely close
    if want.inputs["x"].n:
        assert merged.to_profile().to_dict()["inputs"]["x"]["min"] == \
            want.to_dict()["inputs"]["x"]["min"]


@settings(max_examples=20, deadline=None)
@given(sizes=st.lists(st.integers(1, 50), min_size=1, max_size=8), seed=st.integers(0, 999))
def test_packing_the_wire_form_is_merging_what_was_sent(sizes, seed):
    """What a device sends (sums and M2 rounded to a few significant digits) merges exactly as
    the profile code merges those same numbers; the counts are the raw profiles' exactly."""
    layout = layout_for(SPEC)
    parts = [profile(n, seed + i) for i, n in enumerate(sizes)]
    wires = [to_wire(p) for p in parts]
    received = [from_wire(w, SPEC) for w in wires]  # the server validates before packing
    merged = layout.merge_bytes([layout.pack_wire(w).to_bytes() for w in wires]).to_profile()
    assert_same(merged, Profile.merged(SPEC, received), rel=1e-9)
    raw = Profile.merged(SPEC, parts).to_dict()
    for side in ("inputs", "outputs"):
        for name, state in merged.to_dict()[side].items():
            assert state["counts"] == raw[side][name]["counts"]


_ODD = [-1, 0, 1, 7, 10**6, 1.5, -0.0, True, False, None, "x", [], {}, [1, 2],
        float("nan"), float("inf"), -1e-9, 1e308]


def _mutate(doc, data) -> None:
    """Replace, drop or add one thing somewhere inside a wire document, in place."""
    node, path = doc, []
    while True:
        kids = list(node) if isinstance(node, list) else list(node.keys())
        if not kids or data.draw(st.booleans(), label="stop here"):
            break
        key = data.draw(st.sampled_from(range(len(kids)) if isinstance(node, list) else kids))
        child = node[key]
        if not isinstance(child, (list, dict)) or data.draw(st.booleans(), label="this one"):
            action = data.draw(st.sampled_from(["replace", "drop", "append"]))
            if action == "replace":
                node[key] = data.draw(st.sampled_from(_ODD))
            elif action == "drop":
                del node[key]
            elif isinstance(node, list):
                node.append(data.draw(st.sampled_from(_ODD)))
            else:
                node["extra"] = 1
            return
        node, path = child, [*path, key]


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 99), rows=st.integers(0, 30), data=st.data())
def test_pack_wire_refuses_exactly_what_from_wire_refuses(seed, rows, data):
    """The ingest fast path holds to the contract's own reader, document for document."""
    import copy

    doc = copy.deepcopy(to_wire(profile(rows, seed)))
    for _ in range(data.draw(st.integers(0, 2), label="mutations")):
        _mutate(doc, data)
    try:
        from_wire(copy.deepcopy(doc), SPEC)
        contract = None
    except (SchemaError, ReferenceMismatchError) as exc:
        contract = type(exc)
    try:
        packed = layout_for(SPEC).pack_wire(copy.deepcopy(doc))
        ours = None
    except (SchemaError, ReferenceMismatchError) as exc:
        ours = type(exc)
    event(f"refused: {contract.__name__ if contract else 'no'}")
    assert ours == contract, (doc, contract, ours)
    if contract is None:
        assert_same(packed.to_profile(), from_wire(doc, SPEC), rel=0)


def test_m2_is_the_sum_of_squared_deviations():
    layout = layout_for(SPEC)
    parts = [profile(n, s) for s, n in enumerate((30, 1, 0, 200, 7))]
    merged = layout.merge([layout.pack_profile(p) for p in parts]).to_profile().to_dict()
    finite = []
    for s, n in enumerate((30, 1, 0, 200, 7)):  # the values profile() drew
        rng = np.random.default_rng(s)
        x = rng.normal(0.3, 1.5, n)
        x[rng.random(n) < 0.1] = np.nan
        finite.append(x[np.isfinite(x)])
    vals = np.concatenate(finite)
    assert merged["inputs"]["x"]["missing"] == 238 - vals.size
    assert merged["inputs"]["x"]["m2"] == pytest.approx(float(((vals - vals.mean()) ** 2).sum()),
                                                        rel=1e-10)


def test_an_empty_merge_is_an_empty_profile():
    layout = layout_for(SPEC)
    empty = layout.merge_bytes([]).to_profile()
    assert empty == Profile(SPEC)
    assert layout.merge_bytes([layout.empty().to_bytes()] * 3).rows == 0


def test_merge_groups_is_one_merge_per_group():
    layout = layout_for(SPEC)
    parts = [profile(20 + i, i) for i in range(6)]
    blobs = [layout.pack_profile(p).to_bytes() for p in parts]
    groups = np.array([0, 1, 0, 2, 1, 0])
    out = layout.merge_groups(blobs, groups, 4)
    for g in range(3):
        want = Profile.merged(SPEC, [p for p, k in zip(parts, groups, strict=True) if k == g])
        assert_same(out[g].to_profile(), want, rel=1e-9)
    assert out[3].rows == 0


@pytest.mark.parametrize("blob", [b"", b"\x00" * 7, b"\x00" * (Layout(SPEC).nbytes + 8)],
                         ids=["empty", "short", "long"])
def test_a_rollup_of_another_layout_is_refused(blob):
    with pytest.raises(SchemaError, match="layout"):
        layout_for(SPEC).merge_bytes([blob])


def test_a_wire_form_of_another_reference_is_refused():
    other = ProfileSpec((numeric_spec("x", np.arange(10.0)),))
    with pytest.raises(ReferenceMismatchError, match="reference"):
        layout_for(SPEC).pack_wire(to_wire(Profile(other)))


# -- tiling a range into the fewest rollups -------------------------------------------------

LEVELS = (60, 600, 3600)


@settings(max_examples=200, deadline=None)
@given(lo=st.integers(0, 2000), n=st.integers(0, 3000))
def test_tiles_cover_the_range_exactly_with_aligned_buckets(lo, n):
    lo, hi = lo * 60, (lo + n) * 60
    pieces = tile(lo, hi, LEVELS)
    at = lo
    for width, a, b in pieces:
        assert a == at and a < b and a % width == 0 and b % width == 0
        at = b
    assert at == hi if n else pieces == []
    # never more than (ratio - 1) buckets of a level at each end
    for fine, coarse in itertools.pairwise(LEVELS):
        per_level = sum((b - a) // w for w, a, b in pieces if w == fine)
        assert per_level <= 2 * (coarse // fine - 1)


def test_an_aligned_hour_is_one_coarse_bucket():
    assert tile(7200, 10800, LEVELS) == [(3600, 7200, 10800)]
    assert tile(7260, 10800, (60, 3600)) == [(60, 7260, 10800)]
    assert math.isclose(sum(b - a for _, a, b in tile(60, 86400, LEVELS)), 86340)
