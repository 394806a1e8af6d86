"""Feature profiles: bin semantics, exact merges, spec building, the wire form."""

from __future__ import annotations

import copy
import math
import random
from collections import Counter
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefleet.contract.errors import ReferenceMismatchError, SchemaError
from edgefleet.contract.profile import (
    CONFIDENCE_EDGES,
    CategoricalSpec,
    NumericSpec,
    Profile,
    ProfileSpec,
    categorical_spec,
    numeric_spec,
)
from edgefleet.contract.wire import canonical_json, parse_json

NAN, INF = float("nan"), float("inf")

X = NumericSpec("x", (0.0, 2.0, 4.0, 6.0, 8.0, 10.0))
K = numeric_spec("k", np.full(10, 3.0))  # a constant reference: edges (3, 3)
C = CategoricalSpec("c", ("a", "b", "c"), ("d", "e"))
LABEL = CategoricalSpec("label", ("0", "1"), ("2",))
CONF = NumericSpec("confidence", CONFIDENCE_EDGES)
SPEC = ProfileSpec(inputs=(X, K, C), outputs=(LABEL, CONF))
NUMERIC = {"x": X, "k": K, "confidence": CONF}
CATEGORICAL = {"c": C, "label": LABEL}


def test_reference_specs_are_what_the_tests_assume():
    built = numeric_spec("x", np.linspace(0.0, 10.0, 101), bins=5)
    np.testing.assert_allclose(built.edges, X.edges, rtol=1e-12)
    assert K.edges == (3.0, 3.0)
    assert (X.bins, X.slots, K.slots, C.slots) == (5, 7, 3, 6)


# --------------------------------------------------------------------------- oracles
# Written from the module docstring, independently of the vectorised code.


def expected_numeric_slot(edges: tuple[float, ...], v: float) -> int:
    bins = len(edges) - 1
    if v < edges[0]:
        return 0
    if v > edges[-1]:
        return bins + 1
    for i in range(bins):
        if edges[i] <= v < edges[i + 1] or (i == bins - 1 and v == edges[-1]):
            return i + 1
    raise AssertionError("unreachable")


def is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and not math.isfinite(v))


def expected_categorical_slot(spec: CategoricalSpec, v: Any) -> int:
    k = len(spec.vocabulary)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return k + 2
    if str(v) in spec.vocabulary:
        return spec.vocabulary.index(str(v))
    return k if str(v) in spec.tail else k + 1


# --------------------------------------------------------------------------- data


num_values = st.one_of(
    st.floats(-1e3, 1e3),  # includes subnormals and -0.0
    st.floats(-3, 13),  # around the reference range [0, 10]
    st.sampled_from([*X.edges, 3.0]),  # exactly on edges and on the constant
    st.sampled_from([NAN, INF, -INF, None]),
)
cat_values = st.one_of(
    st.sampled_from(["a", "b", "c", "d", "e", "zz", "", "nan", "None"]),
    st.none(),
    st.just(NAN),
    st.text(max_size=3),
)


@st.composite
def batches(draw, max_rows: int = 20) -> tuple[dict[str, list], dict[str, list]]:
    n = draw(st.integers(0, max_rows))

    def column(values):
        return draw(st.lists(values, min_size=n, max_size=n))

    inputs = {"x": column(num_values), "k": column(num_values), "c": column(cat_values)}
    outputs = {"label": column(st.sampled_from(["0", "1", "2", "3", None])),
               "confidence": column(st.floats(0, 1) | st.just(NAN))}
    return inputs, outputs


def as_arrays(cols: dict[str, list]) -> dict[str, np.ndarray]:
    return {k: np.array(v, dtype=np.float64 if k in NUMERIC else object)
            for k, v in cols.items()}


def profile_of(*parts: tuple[dict[str, list], dict[str, list]]) -> Profile:
    p = Profile(SPEC)
    for inputs, outputs in parts:
        p.update(as_arrays(inputs), as_arrays(outputs))
    return p


def concat(a, b):
    return tuple({k: x[k] + y[k] for k in x} for x, y in zip(a, b, strict=True))


def assert_equivalent(p: Profile, q: Profile) -> None:
    """Exact for counts, missing, min, max, rows; to rounding for sums and M2."""
    dp, dq = p.to_dict(), q.to_dict()
    assert dp["rows"] == dq["rows"]
    assert dp["reference_hash"] == dq["reference_hash"]
    for group in ("inputs", "outputs"):
        assert dp[group].keys() == dq[group].keys()
        for name, sp in dp[group].items():
            sq = dq[group][name]
            assert sp["counts"] == sq["counts"], name
            if name in NUMERIC:
                assert (sp["missing"], sp["min"], sp["max"]) == (sq["missing"], sq["min"],
                                                                 sq["max"]), name
                np.testing.assert_allclose(sp["sums"], sq["sums"], rtol=1e-9, atol=1e-6)
                assert math.isclose(sp["m2"], sq["m2"], rel_tol=1e-9, abs_tol=1e-6), name


# --------------------------------------------------------------------------- merge


@settings(max_examples=150, deadline=None)
@given(batches(), batches())
def test_update_twice_equals_update_once_equals_merge(a, b):
    sequential = profile_of(a, b)
    at_once = profile_of(concat(a, b))
    merged = profile_of(a).merge(profile_of(b))
    assert_equivalent(sequential, at_once)
    assert_equivalent(merged, at_once)
    assert_equivalent(Profile.merged(SPEC, [profile_of(a), profile_of(b)]), at_once)


@settings(max_examples=150, deadline=None)
@given(batches(), batches())
def test_profile_agrees_with_the_oracles_and_numpy(a, b):
    (inputs, outputs) = concat(a, b)
    columns = {**inputs, **outputs}
    p = profile_of(a, b)
    doc = p.to_dict()
    assert doc["rows"] == len(inputs["x"])
    for name, spec in NUMERIC.items():
        d = doc["outputs" if name == "confidence" else "inputs"][name]
        values = np.array(columns[name], dtype=np.float64)
        finite = values[np.isfinite(values)]
        expected = Counter(expected_numeric_slot(spec.edges, float(v)) for v in finite)
        assert d["counts"] == [expected[i] for i in range(spec.slots)], name
        assert d["missing"] == sum(map(is_missing, columns[name]))
        n = finite.size
        if n == 0:
            assert (d["min"], d["max"], d["m2"]) == (None, None, 0.0)
            assert not any(d["sums"])
            continue
        assert (d["min"], d["max"]) == (finite.min(), finite.max())
        scale = max(1.0, float(np.abs(finite).max()))
        assert math.isclose(sum(d["sums"]) / n, finite.mean(), rel_tol=1e-9,
                            abs_tol=1e-12 * scale)
        assert math.isclose(d["m2"] / n, finite.var(), rel_tol=1e-9,
                            abs_tol=1e-12 * scale**2)
        for slot, s in enumerate(d["sums"]):
            in_slot = [v for v in finite if expected_numeric_slot(spec.edges, float(v)) == slot]
            assert math.isclose(s, math.fsum(in_slot), rel_tol=1e-9, abs_tol=1e-9 * scale)
    for name, spec in CATEGORICAL.items():
        d = doc["outputs" if name == "label" else "inputs"][name]
        expected = Counter(expected_categorical_slot(spec, v) for v in columns[name])
        assert d["counts"] == [expected[i] for i in range(spec.slots)], name


def test_merge_of_empty_profiles_is_neutral():
    data = ({"x": [1.0, 5.0], "k": [3.0, NAN], "c": ["a", None]},
            {"label": ["0", "1"], "confidence": [0.5, 0.99]})
    p = profile_of(data)
    assert profile_of(data).merge(Profile(SPEC)) == p
    assert Profile(SPEC).merge(profile_of(data)) == p
    empty = Profile(SPEC).to_dict()["inputs"]["x"]
    assert empty == {"counts": [0] * 7, "sums": [0.0] * 7, "missing": 0, "min": None,
                     "max": None, "m2": 0.0}


def test_merge_over_a_different_reference_is_refused():
    other = ProfileSpec(inputs=(numeric_spec("x", np.linspace(0.0, 10.0, 101), bins=4), K, C),
                        outputs=(LABEL, CONF))
    assert other.reference_hash != SPEC.reference_hash
    with pytest.raises(ReferenceMismatchError) as excinfo:
        Profile(SPEC).merge(Profile(other))
    assert SPEC.reference_hash[:12] in str(excinfo.value)
    assert other.reference_hash[:12] in str(excinfo.value)
    with pytest.raises(ReferenceMismatchError):
        Profile.merged(SPEC, [Profile(SPEC), Profile(other)])


# --------------------------------------------------------------------------- bins


def counts_of(spec, values, kind="numeric") -> list[int]:
    profile_spec = ProfileSpec(inputs=(spec,))
    p = Profile(profile_spec)
    dtype = np.float64 if kind == "numeric" else object
    p.update({spec.name: np.array(values, dtype=dtype)})
    return p.to_dict()["inputs"][spec.name]["counts"]


@pytest.mark.parametrize(("value", "slot"), [
    pytest.param(-0.5, 0, id="below-e0"),
    pytest.param(np.nextafter(0.0, -1.0), 0, id="just-below-e0"),
    pytest.param(0.0, 1, id="equal-e0"),
    pytest.param(-0.0, 1, id="minus-zero-equal-e0"),
    pytest.param(1.999, 1, id="inside-first-bin"),
    pytest.param(2.0, 2, id="equal-e1-opens-second-bin"),
    pytest.param(np.nextafter(2.0, 0.0), 1, id="just-below-e1"),
    pytest.param(9.0, 5, id="inside-last-bin"),
    pytest.param(10.0, 5, id="equal-eB-last-inner-bin"),
    pytest.param(np.nextafter(10.0, 11.0), 6, id="just-above-eB"),
    pytest.param(1e300, 6, id="far-above"),
])
def test_numeric_bin_semantics(value, slot):
    expected = [0] * X.slots
    expected[slot] = 1
    assert counts_of(X, [value]) == expected
    assert expected_numeric_slot(X.edges, float(value)) == slot  # the oracle agrees


@pytest.mark.parametrize("value", [NAN, INF, -INF, None],
                         ids=["nan", "inf", "minus-inf", "none"])
def test_non_finite_values_are_missing(value):
    p = Profile(ProfileSpec(inputs=(X,)))
    p.update({"x": np.array([value, 1.0], dtype=np.float64)})
    d = p.to_dict()["inputs"]["x"]
    assert d["missing"] == 1
    assert d["counts"] == [0, 1, 0, 0, 0, 0, 0]
    assert (d["min"], d["max"], d["sums"][1]) == (1.0, 1.0, 1.0)


def test_constant_reference():
    assert counts_of(K, [2.0, 3.0, 3.0, 4.0]) == [1, 2, 1]
    assert counts_of(K, [np.nextafter(3.0, 0.0), np.nextafter(3.0, 4.0)]) == [1, 0, 1]
    assert numeric_spec("k", [7.5]).edges == (7.5, 7.5)


def test_categorical_slots():
    spec = CategoricalSpec("c", ("a", "b"), ("t1", "t2"))
    values = ["a", "b", "b", "t1", "t2", "t2", "never", "", None, NAN, "nan"]
    #                  a  b  other unseen missing
    assert counts_of(spec, values, "categorical") == [1, 2, 3, 3, 2]
    p = Profile(ProfileSpec(inputs=(spec,)))
    p.update({"c": values})  # a plain list works as well as an array
    assert p.to_dict()["inputs"]["c"]["counts"] == [1, 2, 3, 3, 2]


def test_categorical_values_are_compared_as_text():
    spec = CategoricalSpec("c", ("1", "True"))
    assert counts_of(spec, [1, "1", True, 1.5], "categorical") == [2, 1, 0, 1, 0]


def test_update_needs_every_input_and_counts_rows():
    p = Profile(SPEC)
    with pytest.raises(SchemaError) as excinfo:
        p.update({"x": [1.0], "c": ["a"]})
    assert excinfo.value.field == "k"
    p.update({"x": [1.0, 2.0], "k": [3.0, 3.0], "c": ["a", "b"], "ignored": [0, 0]},
             outputs={"label": ["0", "1"], "not-profiled": [1, 2]})
    assert p.rows == 2
    p.update({"x": [], "k": [], "c": []}, rows=5)
    assert p.rows == 7
    assert p.to_dict()["outputs"]["label"]["counts"] == [1, 1, 0, 0, 0]
    assert p.to_dict()["outputs"]["confidence"]["counts"] == [0] * CONF.slots


# --------------------------------------------------------------------------- building specs


@pytest.mark.parametrize("bins", [1, 4, 10, 32], ids=lambda b: f"bins-{b}")
@pytest.mark.parametrize("dist", ["normal", "exponential", "uniform"], ids=str)
def test_numeric_spec_has_equal_mass_bins(dist, bins):
    rng = np.random.default_rng(42)
    n = 10_000
    data = getattr(rng, dist)(size=n)
    spec = numeric_spec("x", data, bins=bins)
    assert spec.bins == bins
    assert spec.edges[0] == data.min() and spec.edges[-1] == data.max()
    assert all(b > a for a, b in zip(spec.edges, spec.edges[1:], strict=False))
    counts = counts_of(spec, data)
    assert counts[0] == counts[-1] == 0
    assert sum(counts) == n
    for c in counts[1:-1]:
        assert abs(c - n / bins) <= 2, counts


def test_numeric_spec_collapses_duplicate_edges():
    data = np.array([0.0] * 90 + [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0])
    spec = numeric_spec("x", data, bins=10)
    assert spec.edges[0] == 0.0 and spec.edges[-1] == 10.0
    assert len(set(spec.edges)) == len(spec.edges)  # strictly increasing: no empty bins
    assert spec.bins < 10


def test_numeric_spec_ignores_non_finite_reference_values():
    spec = numeric_spec("x", [NAN, 1.0, INF, 2.0, -INF], bins=1)
    assert spec.edges == (1.0, 2.0)


@pytest.mark.parametrize(("values", "bins", "message"), [
    pytest.param([1.0, 2.0], 0, "bins", id="zero-bins"),
    pytest.param([1.0, 2.0], 33, "bins", id="too-many-bins"),
    pytest.param([], 10, "no finite value", id="empty"),
    pytest.param([NAN, INF], 10, "no finite value", id="nothing-finite"),
])
def test_numeric_spec_refusals(values, bins, message):
    with pytest.raises(SchemaError, match=message) as excinfo:
        numeric_spec("feature-x", np.array(values), bins=bins)
    assert excinfo.value.field == "feature-x"


category_counts = st.dictionaries(
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e), min_size=1, max_size=4),
    st.integers(1, 60), min_size=1, max_size=150)


@settings(max_examples=150, deadline=None)
@given(category_counts, st.integers(0, 10), st.randoms(use_true_random=False))
def test_categorical_spec_covers_the_mass_with_at_most_64(counts, n_missing, rnd):
    values: list[Any] = [c for c, n in counts.items() for _ in range(n)]
    values += [None, NAN] * n_missing
    rnd.shuffle(values)
    spec = categorical_spec("c", values)
    total = sum(counts.values())
    order = sorted(counts, key=lambda c: (-counts[c], c))
    k = len(spec.vocabulary)
    assert 1 <= k <= 64
    assert list(spec.vocabulary) == order[:k]  # by count, ties by text
    covered = sum(counts[c] for c in spec.vocabulary)
    assert covered >= 0.99 * total or k == 64
    if k < 64:  # no more than needed
        assert covered - counts[order[k - 1]] < 0.99 * total
    assert spec.tail == tuple(sorted(order[k:]))
    assert spec.tail_complete
    rnd.shuffle(values)
    assert categorical_spec("c", values) == spec  # order of the data does not matter


def test_categorical_spec_ties_are_broken_by_text():
    values = ["b"] * 5 + ["a"] * 5 + ["c"] * 5 + ["z"] * 9
    spec = categorical_spec("c", values, max_vocab=3)
    assert spec.vocabulary == ("z", "a", "b")
    assert spec.tail == ("c",)


def test_categorical_spec_coverage_stops_early():
    values = ["a"] * 990 + ["b"] * 5 + ["c"] * 5
    spec = categorical_spec("c", values)
    assert spec.vocabulary == ("a",)  # 99.0 % already
    assert spec.tail == ("b", "c")


def test_categorical_spec_tail_is_bounded():
    values = [f"v{i:05d}" for i in range(64 + 2000)]
    spec = categorical_spec("c", values)
    assert len(spec.vocabulary) == 64
    assert len(spec.tail) == 1024
    assert not spec.tail_complete
    assert spec.tail == tuple(sorted(set(values) - set(spec.vocabulary)))[:1024]


def test_categorical_spec_of_only_missing_values():
    spec = categorical_spec("c", [None, NAN])
    assert (spec.vocabulary, spec.tail, spec.slots) == ((), (), 3)
    assert counts_of(spec, ["x", None], "categorical") == [0, 1, 1]


# --------------------------------------------------------------------------- reference hash


def _spec_with(**changes) -> ProfileSpec:
    x, c = changes.get("x", X), changes.get("c", C)
    return ProfileSpec(inputs=(x, K, c), outputs=changes.get("outputs", (LABEL, CONF)))


@pytest.mark.parametrize("spec", [
    pytest.param(_spec_with(x=NumericSpec("x", (0.0, 2.0, 4.0, 6.0, 8.0,
                                                float(np.nextafter(10.0, 11.0))))),
                 id="last-edge-one-ulp"),
    pytest.param(_spec_with(x=NumericSpec("x", (0.0, 2.0, 4.5, 6.0, 8.0, 10.0))), id="inner-edge"),
    pytest.param(_spec_with(x=NumericSpec("x2", X.edges)), id="feature-renamed"),
    pytest.param(_spec_with(c=CategoricalSpec("c", ("a", "b", "f"), ("d", "e"))),
                 id="vocab-changed"),
    pytest.param(_spec_with(c=CategoricalSpec("c", ("b", "a", "c"), ("d", "e"))), id="vocab-order"),
    pytest.param(_spec_with(c=CategoricalSpec("c", ("a", "b", "c"), ("d",))), id="tail-changed"),
    pytest.param(_spec_with(c=CategoricalSpec("c", ("a", "b", "c"), ("d", "e"), False)),
                 id="tail-incomplete"),
    pytest.param(_spec_with(outputs=(LABEL,)), id="output-dropped"),
])
def test_reference_hash_changes_with_the_bins(spec):
    assert spec.reference_hash != SPEC.reference_hash
    with pytest.raises(ReferenceMismatchError):
        Profile(SPEC).merge(Profile(spec))


def test_reference_hash_is_stable():
    again = ProfileSpec(inputs=(NumericSpec("x", tuple(X.edges)), K, C), outputs=(LABEL, CONF))
    assert again.reference_hash == SPEC.reference_hash
    assert ProfileSpec.from_dict(SPEC.to_dict()).reference_hash == SPEC.reference_hash
    assert len(SPEC.reference_hash) == 64
    assert Profile(SPEC).reference_hash == SPEC.reference_hash


# --------------------------------------------------------------------------- wire: spec


edges_strategy = st.lists(st.floats(-1e6, 1e6, allow_subnormal=False), min_size=2,
                          max_size=33, unique=True).map(lambda e: tuple(sorted(e)))
numeric_specs = st.builds(NumericSpec, name=st.text(max_size=10), edges=edges_strategy) | \
    st.builds(lambda n, v: NumericSpec(n, (v, v)), st.text(max_size=10), st.floats(-1e6, 1e6))


@st.composite
def categorical_specs(draw) -> CategoricalSpec:
    cats = draw(st.lists(st.text(max_size=5), max_size=20, unique=True))
    k = draw(st.integers(0, min(len(cats), 64)))
    return CategoricalSpec(draw(st.text(max_size=10)), tuple(cats[:k]), tuple(cats[k:]),
                           draw(st.booleans()))


profile_specs = st.builds(
    ProfileSpec,
    inputs=st.lists(numeric_specs | categorical_specs(), max_size=5,
                    unique_by=lambda s: s.name).map(tuple),
    outputs=st.lists(numeric_specs | categorical_specs(), max_size=3,
                     unique_by=lambda s: s.name).map(tuple),
)


@settings(max_examples=150, deadline=None)
@given(profile_specs)
def test_profile_spec_round_trip(spec):
    doc = parse_json(canonical_json(spec.to_dict()), what="spec", max_bytes=1 << 20)
    again = ProfileSpec.from_dict(doc)
    assert again == spec
    assert again.reference_hash == spec.reference_hash


def _spec_doc(path: str, value: Any) -> dict:
    doc = copy.deepcopy(SPEC.to_dict())
    *parents, leaf = path.split(".")
    target: Any = doc
    for p in parents:
        target = target[int(p)] if p.isdigit() else target[p]
    target[int(leaf) if leaf.isdigit() else leaf] = value
    return doc


@pytest.mark.parametrize(("path", "value", "field"), [
    pytest.param("schema", 2, "spec.schema", id="schema-2"),
    pytest.param("extra", 1, "spec.extra", id="unknown-field"),
    pytest.param("inputs.0.edges", [1.0], "spec.inputs[0].edges", id="one-edge"),
    pytest.param("inputs.0.edges", [0.0, NAN], "spec.inputs[0].edges", id="nan-edge"),
    pytest.param("inputs.0.edges", [0.0, True], "spec.inputs[0].edges", id="bool-edge"),
    pytest.param("inputs.0.edges", [0.0, "1"], "spec.inputs[0].edges", id="string-edge"),
    pytest.param("inputs.0.edges", [2.0, 1.0], "spec.inputs[0].edges", id="decreasing-pair"),
    pytest.param("inputs.0.edges", [0.0, 1.0, 1.0], "spec.inputs[0].edges",
                 id="repeated-edge"),
    pytest.param("inputs.0.edges", list(range(34)), "spec.inputs[0].edges",
                 id="too-many-edges"),
    pytest.param("inputs.0.kind", "ordinal", "spec.inputs[0].kind", id="unknown-kind"),
    pytest.param("inputs.0.unit", "cm", "spec.inputs[0].unit", id="unknown-feature-field"),
    pytest.param("inputs.2.vocabulary", ["a", "a"], "spec.inputs[2].vocabulary",
                 id="duplicate-vocabulary"),
    pytest.param("inputs.2.vocabulary", ["a", "d"], "spec.inputs[2].vocabulary",
                 id="vocabulary-overlaps-tail"),
    pytest.param("inputs.2.vocabulary", ["a", 1], "spec.inputs[2].vocabulary",
                 id="vocabulary-not-strings"),
    pytest.param("inputs.2.vocabulary", [f"v{i}" for i in range(65)],
                 "spec.inputs[2].vocabulary", id="vocabulary-too-long"),
    pytest.param("inputs.2.tail_complete", 1, "spec.inputs[2].tail_complete",
                 id="tail-complete-not-bool"),
    pytest.param("inputs.1.name", "x", "spec.inputs", id="duplicate-names"),
])
def test_profile_spec_refusals(path, value, field):
    with pytest.raises(SchemaError) as excinfo:
        ProfileSpec.from_dict(_spec_doc(path, value))
    assert excinfo.value.field == field, str(excinfo.value)


# --------------------------------------------------------------------------- wire: profile


@settings(max_examples=100, deadline=None)
@given(batches(), batches())
def test_profile_round_trip(a, b):
    p = profile_of(a, b)
    doc = parse_json(canonical_json(p.to_dict()), what="profile", max_bytes=1 << 20)
    again = Profile.from_dict(doc, SPEC)
    assert again == p
    assert again.to_dict() == p.to_dict()
    # a loaded profile keeps accumulating like the original
    assert_equivalent(again.merge(profile_of(a)), profile_of(a, b, a))
    copied = p.copy()
    assert copied == p
    copied.update(as_arrays(a[0]))
    assert copied.rows == p.rows + len(a[0]["x"])


def _profile_doc() -> dict:
    p = profile_of(({"x": [1.0, 5.0, 11.0], "k": [3.0, NAN, 2.0], "c": ["a", "zz", None]},
                    {"label": ["0", "1", "2"], "confidence": [0.5, 0.97, 1.0]}))
    return p.to_dict()


_DELETE = object()


def _profile_mutation(path: str, value: Any) -> dict:
    doc = _profile_doc()
    *parents, leaf = path.split(".")
    target: Any = doc
    for p in parents:
        target = target[p]
    if value is _DELETE:
        del target[leaf]
    elif callable(value):
        target[leaf] = value(target[leaf])
    else:
        target[leaf] = value
    return doc


def _set(i, v):
    return lambda xs: [v if j == i else x for j, x in enumerate(xs)]


@pytest.mark.parametrize(("path", "value", "field"), [
    pytest.param("schema", 2, "profile.schema", id="schema-2"),
    pytest.param("rows", -1, "profile.rows", id="rows-negative"),
    pytest.param("rows", True, "profile.rows", id="rows-bool"),
    pytest.param("rows", 1.0, "profile.rows", id="rows-float"),
    pytest.param("extra", 1, "profile.extra", id="unknown-field"),
    pytest.param("inputs.x.counts", lambda c: c[:-1], "profile.inputs.x.counts",
                 id="wrong-bin-count"),
    pytest.param("inputs.x.sums", lambda s: [*s, 0.0], "profile.inputs.x.sums",
                 id="wrong-sums-count"),
    pytest.param("inputs.x.counts", _set(1, -1), "profile.inputs.x.counts",
                 id="negative-count"),
    pytest.param("inputs.x.counts", _set(0, True), "profile.inputs.x.counts",
                 id="bool-count"),
    pytest.param("inputs.x.counts", _set(0, 1.0), "profile.inputs.x.counts",
                 id="float-count"),
    pytest.param("inputs.x.sums", _set(1, NAN), "profile.inputs.x.sums", id="nan-sum"),
    pytest.param("inputs.x.sums", _set(1, "1"), "profile.inputs.x.sums", id="string-sum"),
    pytest.param("inputs.x.missing", True, "profile.inputs.x.missing", id="bool-missing"),
    pytest.param("inputs.x.missing", -1, "profile.inputs.x.missing", id="negative-missing"),
    pytest.param("inputs.x.m2", -0.5, "profile.inputs.x.m2", id="negative-m2"),
    pytest.param("inputs.x.m2", _DELETE, "profile.inputs.x.m2", id="missing-m2"),
    pytest.param("inputs.x.min", None, "profile.inputs.x.min", id="no-min-with-values"),
    pytest.param("inputs.x.min", 100.0, "profile.inputs.x.min", id="min-above-max"),
    pytest.param("inputs.x.unit", "cm", "profile.inputs.x.unit", id="unknown-feature-field"),
    pytest.param("inputs.c.counts", lambda c: [*c, 0], "profile.inputs.c.counts",
                 id="categorical-wrong-count"),
    pytest.param("inputs.c.sums", [0.0] * 6, "profile.inputs.c.sums",
                 id="categorical-with-sums"),
    pytest.param("inputs.y", {"counts": []}, "profile.inputs", id="extra-feature"),
    pytest.param("inputs.x", _DELETE, "profile.inputs", id="missing-feature"),
    pytest.param("outputs.label", _DELETE, "profile.outputs", id="missing-output"),
    pytest.param("outputs", [], "profile.outputs", id="outputs-not-object"),
])
def test_profile_from_dict_refusals(path, value, field):
    bad = _profile_mutation(path, value)
    assert bad != _profile_doc()
    with pytest.raises(SchemaError) as excinfo:
        Profile.from_dict(bad, SPEC)
    assert type(excinfo.value) is SchemaError
    assert excinfo.value.field == field, str(excinfo.value)


def test_profile_table_base_is_valid():
    assert Profile.from_dict(_profile_doc(), SPEC).to_dict() == _profile_doc()


@pytest.mark.parametrize("ref", ["0" * 64, SPEC.reference_hash[:-1] + "x", ""],
                         ids=["other-hash", "one-character-off", "empty"])
def test_profile_from_dict_refuses_another_reference(ref):
    doc = _profile_doc()
    doc["reference_hash"] = ref
    with pytest.raises(ReferenceMismatchError) as excinfo:
        Profile.from_dict(doc, SPEC)
    assert "reference_hash" in str(excinfo.value)


def test_profile_from_dict_refuses_a_document_for_another_spec():
    other = _spec_with(x=NumericSpec("x", (0.0, 5.0, 10.0)))
    with pytest.raises(ReferenceMismatchError):
        Profile.from_dict(_profile_doc(), other)


def test_profiles_are_not_hashable_and_compare_by_value():
    a, b = Profile(SPEC), Profile(SPEC)
    assert a == b and a != object()
    b.update({"x": [1.0], "k": [3.0], "c": ["a"]})
    assert a != b
    with pytest.raises(TypeError):
        hash(a)


def test_large_batches_are_profiled_like_small_ones():
    rng = random.Random(5)
    values = [rng.uniform(-5, 15) for _ in range(5000)]
    whole = Profile(ProfileSpec(inputs=(X,)))
    whole.update({"x": np.array(values)})
    parts = Profile(ProfileSpec(inputs=(X,)))
    for i in range(0, 5000, 7):
        parts.update({"x": np.array(values[i:i + 7])})
    dw, dp = whole.to_dict()["inputs"]["x"], parts.to_dict()["inputs"]["x"]
    assert dw["counts"] == dp["counts"]
    assert math.isclose(dw["m2"], dp["m2"], rel_tol=1e-9)
    assert math.isclose(dw["m2"] / 5000, float(np.var(values)), rel_tol=1e-9)


def test_values_near_the_float_limit_still_give_a_sendable_profile():
    from edgefleet.contract.profile import to_wire
    from edgefleet.contract.wire import canonical_json

    spec = ProfileSpec((numeric_spec("x", np.array([0.0, 1.0, 2.0])),))
    profile = Profile(spec)
    profile.update({"x": np.array([1e200, -1e200, 1e300, 1e300])})
    assert profile.inputs["x"].n == 4 and profile.inputs["x"].counts.tolist()[-1] == 3
    canonical_json(profile.to_dict())  # no inf anywhere: it serialises
    canonical_json(to_wire(profile))


def test_counts_beyond_64_bits_are_a_schema_error_not_an_overflow():
    from edgefleet.contract.profile import from_wire, to_wire

    spec = ProfileSpec((numeric_spec("x", np.array([0.0, 1.0, 2.0])),))
    p = Profile(spec)
    p.update({"x": np.array([0.5, 1.5])})
    wire = to_wire(p)
    wire["in"][0][0][1] = 2**64
    with pytest.raises(SchemaError, match="64-bit"):
        from_wire(wire, spec)
