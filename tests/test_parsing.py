"""edgefleet.parsing's thresholds (``accuracy>=+0.01``): what is accepted, what it means,
and refusals that quote the item."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgefleet.contract.errors import SchemaError
from edgefleet.parsing import Threshold, parse_threshold


@pytest.mark.parametrize(("text", "want"), [
    ("accuracy>=+0.01", Threshold("accuracy", ">=", 0.01, "", "accuracy>=+0.01")),
    ("f1_macro>=+2%", Threshold("f1_macro", ">=", 0.02, "%", "f1_macro>=+2%")),
    ("mae<=-0.5", Threshold("mae", "<=", -0.5, "", "mae<=-0.5")),
    ("latency_p95 <= 1.2x", Threshold("latency_p95", "<=", 1.2, "x", "latency_p95<=1.2x")),
    ("size<=.5x", Threshold("size", "<=", 0.5, "x", "size<=.5x")),
    ("accuracy>=0", Threshold("accuracy", ">=", 0.0, "", "accuracy>=0")),
])
def test_thresholds(text, want):
    assert parse_threshold(text, "--promote-if") == want


@pytest.mark.parametrize("text", ["accuracy>+0.01", "accuracy=>0.1", "accuracy>=", ">=0.1",
                                  "accuracy>=0.1y", "accuracy>=1e", "size<=0x", "size<=-1x",
                                  "acc uracy>=0.1x2", "accuracy>=nan", "accuracy>=inf"])
def test_malformed_thresholds_are_refused_quoting_them(text):
    with pytest.raises(SchemaError) as err:
        parse_threshold(text, "--promote-if")
    assert repr(text) in str(err.value) and err.value.field == "--promote-if"


@given(st.from_regex(r"[a-z_][a-z0-9_]{0,10}", fullmatch=True), st.sampled_from([">=", "<="]),
       st.decimals(min_value=-1000, max_value=1000, places=3, allow_nan=False,
                   allow_infinity=False), st.sampled_from(["", "%", "x"]))
def test_any_well_formed_threshold_parses_to_its_parts(name, op, number, unit):
    if unit == "x":
        number = abs(number) + 1
    text = f"{name}{op}{number:+}{unit}"
    t = parse_threshold(text, "--promote-if")
    assert (t.name, t.op, t.unit, t.text) == (name, op, unit, text)
    assert t.value == pytest.approx(float(number) / (100 if unit == "%" else 1))
