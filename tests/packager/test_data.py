"""``packager.data``: how a data file becomes typed columns (the bundle's input schema)."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pandas as pd
import pytest

from packager.data import MAX_COLUMNS, load_table
from packager.errors import DataError

MIXED_CSV = (
    "count,ratio,whole,colour,code,label\n"
    "1,0.5,1.0,red,7,yes\n"
    "2,,2.0,,8,no\n"
    "3,1.25,3.0,blue,x9,yes\n"
)


@pytest.fixture
def mixed(tmp_path):
    path = tmp_path / "mixed.csv"
    path.write_text(MIXED_CSV)
    return path


def test_csv_column_types_are_inferred(mixed):
    t = load_table(mixed)
    assert t.names == ["count", "ratio", "whole", "colour", "code", "label"]
    assert t.kinds == {"count": "numeric", "ratio": "numeric", "whole": "numeric",
                       "colour": "categorical", "code": "categorical", "label": "categorical"}
    # all integers, none missing -> int64; a missing value -> float64; integral floats
    # with none missing are integers too
    assert t.dtypes == {"count": "int64", "ratio": "float64", "whole": "int64",
                        "colour": "string", "code": "string", "label": "string"}
    assert t.rows == 3
    # numeric columns are float64 arrays with NaN for missing
    assert t.columns["count"].dtype == np.float64
    assert t.columns["count"].tolist() == [1.0, 2.0, 3.0]
    ratio = t.columns["ratio"]
    assert ratio.dtype == np.float64 and ratio[0] == 0.5 and np.isnan(ratio[1])
    # strings: object arrays with None for an empty cell
    assert t.columns["colour"].dtype == object
    assert t.columns["colour"].tolist() == ["red", None, "blue"]
    # one value that is not a number makes the whole column categorical, as text
    assert t.columns["code"].tolist() == ["7", "8", "x9"]
    assert t.target is None and t.target_name is None


def test_target_is_split_off(mixed):
    t = load_table(mixed, target="label")
    assert "label" not in t.names and "label" not in t.columns
    assert t.target_name == "label"
    assert t.target.tolist() == ["yes", "no", "yes"]
    assert t.names == ["count", "ratio", "whole", "colour", "code"]


def test_numeric_target_keeps_its_type(tmp_path):
    path = tmp_path / "t.csv"
    pd.DataFrame({"x": [0.1, 0.2, 0.3], "y": [0, 1, 1]}).to_csv(path, index=False)
    t = load_table(path, target="y")
    assert t.target.dtype.kind == "i" and t.target.tolist() == [0, 1, 1]
    assert t.names == ["x"]


def test_unknown_target_is_named(mixed):
    with pytest.raises(DataError, match="target column 'species' not found") as info:
        load_table(mixed, target="species")
    assert "count, ratio" in str(info.value)  # lists what there is


def test_sha256_is_of_the_file_bytes(mixed):
    assert load_table(mixed).sha256 == hashlib.sha256(mixed.read_bytes()).hexdigest()


def test_npy_loads_without_pickle(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.array([[1.0, 0.5, np.nan], [2.0, 2.0, 3.0], [3.0, 3.5, 4.0]]))
    t = load_table(path)
    assert t.names == ["x0", "x1", "x2"]
    assert t.columns["x1"].tolist() == [0.5, 2.0, 3.5]
    assert t.dtypes == {"x0": "int64", "x1": "float64", "x2": "float64"}
    assert t.kinds == dict.fromkeys(t.names, "numeric")
    ints = tmp_path / "ints.npy"
    np.save(ints, np.array([[1, 2], [3, 4]], dtype=np.int32))
    t = load_table(ints)
    assert t.dtypes == {"x0": "int64", "x1": "int64"}
    assert t.columns["x1"].dtype == np.float64 and t.columns["x1"].tolist() == [2.0, 4.0]


def test_object_npy_is_refused_without_running_it(tmp_path):
    path = tmp_path / "evil.npy"
    np.save(path, np.array([[object(), 1]], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=re.escape("evil.npy: cannot read")) as info:
        load_table(path)
    assert "allow_pickle" in str(info.value)


def test_npy_must_be_two_dimensional(tmp_path):
    path = tmp_path / "flat.npy"
    np.save(path, np.arange(5.0))
    with pytest.raises(DataError, match=re.escape("flat.npy: a .npy data file must be 2-D, "
                                                  "got shape (5,)")):
        load_table(path)


@pytest.mark.parametrize("name, content, message", [
    ("data.xlsx", b"PK\x03\x04", "unknown data format '.xlsx'"),
    ("data", b"a,b\n1,2\n", "unknown data format ''"),
    ("empty.csv", b"", "empty.csv: cannot read"),
    ("header-only.csv", b"a,b\n", "header-only.csv: no rows"),
    ("ragged.csv", b"a,b\n1,2\n3,4,5,6\n", "ragged.csv: cannot read"),
    ("bad.npy", b"\x93NUMPY garbage", "bad.npy: cannot read"),
], ids=["xlsx", "no-extension", "empty-file", "header-only", "ragged-rows", "corrupt-npy"])
def test_unreadable_data_is_refused_naming_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        load_table(path)
    assert message in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=re.escape("absent.csv: no such data file")):
        load_table(tmp_path / "absent.csv")


def test_a_directory_is_not_a_data_file(tmp_path):
    with pytest.raises(DataError, match="no such data file"):
        load_table(tmp_path)


def test_too_many_columns(tmp_path):
    path = tmp_path / "wide.npy"
    np.save(path, np.zeros((2, MAX_COLUMNS + 1)))
    with pytest.raises(DataError, match=f"{MAX_COLUMNS + 1} columns; at most {MAX_COLUMNS}"):
        load_table(path)


def test_select_take_frame_and_matrix(mixed):
    t = load_table(mixed)
    numeric = t.select(["ratio", "count"])
    assert numeric.names == ["ratio", "count"]
    m = numeric.matrix()
    assert m.shape == (3, 2) and m[:, 1].tolist() == [1.0, 2.0, 3.0]
    assert np.isnan(m[1, 0])
    part = t.take(np.array([2, 0]))
    assert part.columns["colour"].tolist() == ["blue", "red"] and part.rows == 2
    frame = t.select(["colour", "count"]).frame()
    assert list(frame.columns) == ["colour", "count"] and frame["count"].tolist() == [1, 2, 3]
    with pytest.raises(DataError, match="'colour' is categorical"):
        t.select(["count", "colour"]).matrix()
    with pytest.raises(DataError, match="column\\(s\\) 'size', 'weight' that the model expects"):
        t.select(["count", "size", "weight"])
