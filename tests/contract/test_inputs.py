"""Input checks against a bundle's schema: every refusal names the feature and the row."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from edgefleet.contract import inputs as schema_module
from edgefleet.contract.errors import InputError
from edgefleet.contract.inputs import InputValidator
from edgefleet.contract.manifest import Binding, FeatureSpec, Lineage, Manifest, OutputSpec


def manifest(*inputs: FeatureSpec) -> Manifest:
    return Manifest(
        name="m", version="1.0.0", created_at="2026-01-01T00:00:00Z", task="classification",
        inputs=inputs, outputs=(OutputSpec("label", "label", "int64"),),
        binding=Binding("columns" if any(i.kind == "categorical" for i in inputs) else "tensor"),
        files=(), reference_hash="0" * 64, lineage=Lineage("0" * 64, "sklearn", "x", "0" * 64, 1))


NUMERIC = manifest(FeatureSpec("temp", "numeric", "float32", 0.0, 100.0),
                   FeatureSpec("rpm", "numeric", "float32", 0.0, 9000.0))
MIXED = manifest(FeatureSpec("temp", "numeric", "float32", missing_allowed=True),
                 FeatureSpec("count", "numeric", "int64"),
                 FeatureSpec("site", "categorical", "string", categories=("a", "b")),
                 FeatureSpec("mode", "categorical", "string", categories=("x",),
                             missing_allowed=True))


@pytest.mark.parametrize(("schema", "row", "feature", "text"), [
    pytest.param(NUMERIC, {"temp": 1.0}, "rpm", "missing", id="missing-feature"),
    pytest.param(NUMERIC, {"temp": "hot", "rpm": 1.0}, "temp", "numeric, got a string",
                 id="string-for-number"),
    pytest.param(NUMERIC, {"temp": True, "rpm": 1.0}, "temp", "boolean", id="bool-for-number"),
    pytest.param(NUMERIC, {"temp": None, "rpm": 1.0}, "temp", "does not allow missing",
                 id="null-not-allowed"),
    pytest.param(NUMERIC, {"temp": math.nan, "rpm": 1.0}, "temp", "does not allow missing",
                 id="nan-not-allowed"),
    pytest.param(NUMERIC, {"temp": math.inf, "rpm": 1.0}, "temp", "not finite", id="inf"),
    pytest.param(NUMERIC, {"temp": [1.0], "rpm": 1.0}, "temp", "a list", id="list-for-number"),
    pytest.param(NUMERIC, {"temp": 10**400, "rpm": 1.0}, "temp", "not finite", id="huge-int"),
    pytest.param(MIXED, {"temp": 1.0, "count": 2.5, "site": "a", "mode": "x"}, "count",
                 "whole numbers", id="fraction-for-int"),
    pytest.param(MIXED, {"temp": 1.0, "count": 2, "site": 3, "mode": "x"}, "site",
                 "takes a string", id="number-for-category"),
    pytest.param(MIXED, {"temp": 1.0, "count": 2, "site": None, "mode": "x"}, "site",
                 "does not allow missing", id="null-category-not-allowed"),
])
def test_bad_rows_are_refused_naming_the_feature(schema, row, feature, text):
    with pytest.raises(InputError, match=text) as info:
        InputValidator(schema).row(row, index=3)
    assert info.value.feature == feature
    assert info.value.row == 3
    assert feature in str(info.value) and "row 3" in str(info.value)


@pytest.mark.parametrize(("rows", "text"), [
    pytest.param([], "no rows", id="empty"),
    pytest.param("temp=1", "expected a list", id="a-string"),
    pytest.param([[1.0]], "1 values, the model takes 2", id="short-list"),
    pytest.param([[1.0, 2.0, 3.0]], "3 values", id="long-list"),
    pytest.param([42], "expected an object", id="a-number-row"),
    pytest.param([{"temp": 1.0, "rpm": 2.0}] * 11, "limit is 10", id="too-many"),
])
def test_bad_batches(rows, text):
    with pytest.raises(InputError, match=text):
        InputValidator(NUMERIC, max_rows=10).batch(rows)


def test_good_rows_in_every_form_give_the_same_cells():
    v = InputValidator(NUMERIC)
    want = [12.5, 3000.0]
    assert v.row({"temp": 12.5, "rpm": 3000.0, "extra": "ignored"}) == want
    assert v.row({"temp": 12.5, "rpm": 3000}) == want  # ints are numbers
    assert v.row([12.5, 3000.0]) == want
    assert v.row(np.array([12.5, 3000.0])) == want
    batch = v.array(np.array([want, want]))
    assert batch.rows == 2 and batch.matrix.tolist() == [want, want]
    assert batch.columns["rpm"].tolist() == [3000.0, 3000.0]


def test_out_of_range_and_unseen_are_served():
    assert InputValidator(NUMERIC).row({"temp": -50.0, "rpm": 1e9}) == [-50.0, 1e9]
    cells = InputValidator(MIXED).row({"temp": None, "count": 3, "site": "zz", "mode": None})
    assert math.isnan(cells[0]) and cells[1:] == [3.0, "zz", None]


@pytest.mark.parametrize(("matrix", "feature", "row"), [
    pytest.param([[1.0, 2.0], [np.nan, 1.0]], "temp", 1, id="nan"),
    pytest.param([[1.0, 2.0], [1.0, np.inf]], "rpm", 1, id="inf"),
    pytest.param([[1e308, 1e308], [1e308, np.nan]], "rpm", 1, id="overflowing-sum-then-nan"),
])
def test_bad_arrays_name_feature_and_row(matrix, feature, row):
    with pytest.raises(InputError) as info:
        InputValidator(NUMERIC).array(np.array(matrix))
    assert (info.value.feature, info.value.row) == (feature, row)


def test_an_overflowing_sum_of_finite_values_is_not_refused():
    assert InputValidator(NUMERIC).array(np.array([[1e308, 1e308]] * 3)).rows == 3


@pytest.mark.parametrize("matrix", [np.zeros((2, 3)), np.zeros(2), np.array([["a", "b"]])],
                         ids=["wrong-width", "1-d", "strings"])
def test_badly_shaped_arrays(matrix):
    with pytest.raises(InputError):
        InputValidator(NUMERIC).array(matrix)


def test_arrays_need_an_all_numeric_model():
    with pytest.raises(InputError, match="categorical"):
        InputValidator(MIXED).array(np.zeros((1, 4)))


values = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5),
                   st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2),
                                                                        st.integers(), max_size=2))


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.dictionaries(st.sampled_from(["temp", "count", "site", "mode", "x"]), values),
                 st.lists(values, max_size=5), values))
def test_anything_a_caller_sends_is_accepted_or_an_input_error(row):
    for schema in (NUMERIC, MIXED):
        try:
            cells = InputValidator(schema).row(row)
        except InputError:
            continue
        assert len(cells) == len(schema.inputs)


# -- the columnar batch path against the single-row path ---------------------------------

_FEATURE_NAMES = ("a", "b", "c", "d", "e")


@st.composite
def mixed_schemas(draw):
    n = draw(st.integers(1, 5))
    specs = []
    for name in _FEATURE_NAMES[:n]:
        missing = draw(st.booleans())
        if draw(st.booleans()):
            specs.append(FeatureSpec(name, "numeric", draw(st.sampled_from(["float32", "int64"])),
                                     missing_allowed=missing))
        else:
            specs.append(FeatureSpec(name, "categorical", "string", categories=("x", "y"),
                                     missing_allowed=missing))
    return manifest(*specs)


class _Str(str):
    """A str subclass: accepted as a category by both paths."""


# mostly good cells (so that whole batches pass often), and every kind of bad one
good_number = st.one_of(st.floats(-1e6, 1e6, allow_nan=False), st.integers(-10**6, 10**6))
good_whole = st.one_of(st.integers(-10**6, 10**6).map(float), st.integers(-10**6, 10**6))
good_category = st.sampled_from(["x", "y", "zz", ""])
odd = st.one_of(st.none(), st.just(math.nan), st.just(math.inf), st.just(-math.inf),
                st.booleans(), st.integers(), st.floats(), st.text(max_size=3),
                st.just(2**63), st.just(-(2**63)), st.just(2**63 - 1), st.just(10**400),
                st.just(np.float64(1.5)), st.just(np.int64(3)), st.just(_Str("x")),
                st.just([1.0]), st.just({"x": 1}))


def _cell(spec, clean):
    good = (good_category if spec.kind == "categorical"
            else good_whole if spec.dtype == "int64" else good_number)
    if spec.missing_allowed:
        good = st.one_of(good, st.none(), st.just(math.nan)) if spec.kind == "numeric" \
            else st.one_of(good, st.none())
    return good if clean else st.one_of(*[good] * 6, odd)


@st.composite
def schema_and_rows(draw):
    schema = draw(mixed_schemas())
    n = draw(st.integers(1, 12))
    as_lists = draw(st.integers(0, 4)) == 0
    clean = draw(st.integers(0, 2)) == 0  # a third of the batches: only good cells
    rows = []
    for _ in range(n):
        cells = {s.name: draw(_cell(s, clean)) for s in schema.inputs}
        if as_lists:
            rows.append([cells[s.name] for s in schema.inputs])
            continue
        if not clean and draw(st.integers(0, 30)) == 0:  # now and then a row lacks one
            cells.pop(draw(st.sampled_from([s.name for s in schema.inputs])))
        if draw(st.integers(0, 10)) == 0:
            cells["extra"] = "ignored"
        rows.append(cells)
    return schema, rows


def _by_rows(v, rows):
    return v.from_cells([v.row(r, i) for i, r in enumerate(rows)])


def _outcome(fn):
    try:
        return "ok", fn()
    except InputError as exc:
        return "error", (type(exc), exc.feature, exc.row, str(exc))


def _same_batch(a, b) -> None:
    assert a.rows == b.rows and list(a.columns) == list(b.columns)
    for name in a.columns:
        x, y = a.columns[name], b.columns[name]
        assert x.dtype == y.dtype, name
        if x.dtype == object:
            assert x.tolist() == y.tolist() and [type(c) for c in x] == [type(c) for c in y]
        else:
            assert np.array_equal(x, y, equal_nan=True), name
    assert (a.matrix is None) == (b.matrix is None)
    if a.matrix is not None:
        assert np.array_equal(a.matrix, b.matrix, equal_nan=True)


def _profile(schema, batch):
    from edgefleet.contract.profile import (
        Profile,
        ProfileSpec,
        categorical_spec,
        numeric_spec,
        to_wire,
    )
    spec = ProfileSpec(tuple(
        numeric_spec(s.name, np.linspace(-10, 10, 50)) if s.kind == "numeric"
        else categorical_spec(s.name, ["x", "y", "x"]) for s in schema.inputs))
    p = Profile(spec)
    p.update(batch.columns, rows=batch.rows, matrix=batch.matrix)
    return to_wire(p)


@settings(max_examples=600, deadline=None)
@given(schema_and_rows())
def test_the_column_path_and_the_row_path_agree(case):
    schema, rows = case
    v = InputValidator(schema)
    want = _outcome(lambda: _by_rows(v, rows))
    event(f"{want[0]}, {len(rows)} rows" if len(rows) == 1 else want[0])
    for block in (1, 10**6):  # numeric cells read row by row (as for wide schemas), by column
        saved, schema_module._BLOCK = schema_module._BLOCK, block
        try:
            got = _outcome(lambda: v.batch(rows))
        finally:
            schema_module._BLOCK = saved
        assert got[0] == want[0], (got, want)
        if want[0] == "error":
            assert got[1] == want[1]
            continue
        _same_batch(got[1], want[1])
        assert _profile(schema, got[1]) == _profile(schema, want[1])


def test_the_column_path_names_the_first_bad_row_across_features():
    v = InputValidator(MIXED)
    good = {"temp": 1.0, "count": 2, "site": "a", "mode": "x"}
    rows = [good] * 5 + [{**good, "site": 7}] + [{**good, "count": 1.5}] * 2
    rows[3] = {**good, "mode": 9}
    with pytest.raises(InputError) as info:
        v.batch(rows)
    assert (info.value.feature, info.value.row) == ("mode", 3)
    rows[2] = {k: val for k, val in good.items() if k != "temp"}
    with pytest.raises(InputError, match="missing") as info:
        v.batch(rows)
    assert (info.value.feature, info.value.row) == ("temp", 2)


WIDE = manifest(*(FeatureSpec(f"f{j}", "numeric", "int64" if j == 3 else "float32",
                              missing_allowed=j == 5) for j in range(12)))


@pytest.mark.parametrize("odd_cell", [
    pytest.param(None, id="all-floats"), pytest.param(True, id="bool"),
    pytest.param(3, id="int"), pytest.param("1.5", id="numeric-string"),
    pytest.param(np.float64(2.0), id="numpy-float64"), pytest.param(np.float32(2.0),
                                                                      id="numpy-float32"),
    pytest.param(math.nan, id="nan"), pytest.param(math.inf, id="inf"),
    pytest.param(2.5, id="fraction-in-whole"), pytest.param(1e300 * 10, id="overflow")])
@pytest.mark.parametrize("column", [0, 3, 5, 11])
def test_a_wide_all_float_batch_with_one_odd_cell_agrees_with_the_row_path(odd_cell, column):
    """The numeric block's fast type check (every cell exactly a float) and its fallback:
    the same values, or the same error, as the single-row path."""
    rng = np.random.default_rng(column)
    rows = [{f"f{j}": float(round(x)) if j == 3 else float(x)
             for j, x in enumerate(rng.normal(0, 100, 12))} for _ in range(40)]
    if odd_cell is not None:
        rows[17][f"f{column}"] = odd_cell
    v = InputValidator(WIDE)
    assert len(WIDE.inputs) >= schema_module._BLOCK  # the block path is taken
    want = _outcome(lambda: _by_rows(v, rows))
    got = _outcome(lambda: v.batch(rows))
    assert got[0] == want[0], (got, want)
    if want[0] == "error":
        assert got[1] == want[1]
    else:
        _same_batch(got[1], want[1])
