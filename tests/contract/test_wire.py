"""Canonical JSON, the strict field reader, and bounded JSON parsing."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefleet.contract.errors import SchemaError
from edgefleet.contract.wire import Fields, canonical_json, parse_json, sha256_hex

# --------------------------------------------------------------------------- canonical JSON


@pytest.mark.parametrize(("value", "expected"), [
    pytest.param({"b": 1, "a": 2}, b'{"a":2,"b":1}', id="sorted-keys"),
    pytest.param({"z": {"y": 1, "x": [3, {"d": 0, "c": 0}]}},
                 b'{"z":{"x":[3,{"c":0,"d":0}],"y":1}}', id="sorted-nested"),
    pytest.param([1, 2, 3], b"[1,2,3]", id="no-spaces"),
    pytest.param({"k": "café ☕ 日本"}, '{"k":"café ☕ 日本"}'.encode(), id="unicode-kept"),
    pytest.param("a\"b\\c\n\x01", b'"a\\"b\\\\c\\n\\u0001"', id="escapes"),
    pytest.param(0.1, b"0.1", id="shortest-float"),
    pytest.param(1e-7, b"1e-07", id="small-float"),
    pytest.param(1.0, b"1.0", id="integral-float-keeps-point"),
    pytest.param(-0.0, b"-0.0", id="negative-zero"),
    pytest.param(10**30, b"1000000000000000000000000000000", id="big-int"),
    pytest.param([True, False, None], b"[true,false,null]", id="literals"),
    pytest.param((1, 2), b"[1,2]", id="tuple-as-list"),
    pytest.param({}, b"{}", id="empty-object"),
])
def test_canonical_json_bytes(value, expected):
    assert canonical_json(value) == expected


@pytest.mark.parametrize("value", [
    float("nan"), float("inf"), -float("inf"), {"a": [1.0, float("nan")]}, {1, 2}, b"bytes",
    object(), {"k": "\ud800"}, {(1, 2): 3},
], ids=["nan", "inf", "minus-inf", "nested-nan", "set", "bytes", "object", "lone-surrogate",
        "tuple-key"])
def test_canonical_json_refuses(value):
    with pytest.raises(SchemaError, match="canonical JSON"):
        canonical_json(value)


@pytest.mark.parametrize("value", [{2: "a", 10: "b"}, {"a": [{1: 0}]}, {1: "a", "b": 2},
                                   {None: 1}, {1.5: 1}, {True: 1}],
                         ids=["int-keys", "nested-int-key", "mixed-keys", "none-key",
                              "float-key", "bool-key"])
def test_canonical_json_refuses_keys_that_are_not_strings(value):
    # json would sort {2:, 10:} as numbers and write '{"2":..,"10":..}': not canonical
    with pytest.raises(SchemaError, match="not a string"):
        canonical_json(value)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_canonical_json_round_trip_and_idempotence(value):
    data = canonical_json(value)
    parsed = parse_json(data, what="v", max_bytes=1 << 20)
    assert parsed == value
    assert canonical_json(parsed) == data
    assert data == json.dumps(value, sort_keys=True, separators=(",", ":"),
                              ensure_ascii=False).encode("utf-8")
    # no layout whitespace: the separators are "," and ":" (the dumps above says so); a
    # ": " inside a string value is data, not layout
    assert b"\n" not in data


def test_sha256_hex():
    assert sha256_hex(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


# --------------------------------------------------------------------------- parse_json


def test_parse_json_size_limit_is_inclusive():
    data = b'{"a":1}'
    assert parse_json(data, what="doc", max_bytes=len(data)) == {"a": 1}
    with pytest.raises(SchemaError) as excinfo:
        parse_json(data, what="doc", max_bytes=len(data) - 1)
    assert "doc" in str(excinfo.value)
    assert str(len(data)) in str(excinfo.value)


@pytest.mark.parametrize("data", [
    b"", b"{", b"{'a': 1}", b"[1,]", b"NaN", b"[Infinity]", b"[-Infinity]", b"1e400",
    b"[-1e400]", b"\xff\xfe", b"\xc3", b"[" * 100_000 + b"]" * 100_000, b"{} {}",
], ids=["empty", "truncated", "single-quotes", "trailing-comma", "nan", "infinity",
        "minus-infinity", "overflow", "negative-overflow", "not-utf8", "cut-utf8",
        "deep-nesting", "two-documents"])
def test_parse_json_refuses(data):
    with pytest.raises(SchemaError, match=r"message\.json: not valid JSON"):
        parse_json(data, what="message.json", max_bytes=1 << 20)


def test_parse_json_keeps_big_and_small_numbers():
    assert parse_json(b"[1e308, 5e-324, 12345678901234567890]", what="v",
                      max_bytes=100) == [1e308, 5e-324, 12345678901234567890]


# --------------------------------------------------------------------------- Fields


DOC = {"s": "text", "i": 3, "f": 1.5, "fi": 2, "b": True, "l": [1, 2], "o": {"x": 1},
       "m": {"k": "v"}, "c": "red", "n": None, "z": 0, "neg": -1}


@pytest.mark.parametrize(("getter", "key", "expected"), [
    pytest.param(lambda f, k: f.str(k), "s", "text", id="str"),
    pytest.param(lambda f, k: f.int(k), "i", 3, id="int"),
    pytest.param(lambda f, k: f.int(k), "z", 0, id="int-zero"),
    pytest.param(lambda f, k: f.int(k, minimum=None), "neg", -1, id="int-no-minimum"),
    pytest.param(lambda f, k: f.float(k), "f", 1.5, id="float"),
    pytest.param(lambda f, k: f.float(k), "fi", 2.0, id="float-from-int"),
    pytest.param(lambda f, k: f.bool(k), "b", True, id="bool"),
    pytest.param(lambda f, k: f.list(k), "l", [1, 2], id="list"),
    pytest.param(lambda f, k: f.mapping(k), "m", {"k": "v"}, id="mapping"),
    pytest.param(lambda f, k: f.choice(k, ("red", "blue")), "c", "red", id="choice"),
    pytest.param(lambda f, k: f.opt_float(k), "n", None, id="opt-float-null"),
    pytest.param(lambda f, k: f.opt_float(k), "absent", None, id="opt-float-absent"),
    pytest.param(lambda f, k: f.opt_float(k), "f", 1.5, id="opt-float-value"),
    pytest.param(lambda f, k: f.str(k, "dflt"), "absent", "dflt", id="str-default"),
    pytest.param(lambda f, k: f.int(k, 7), "absent", 7, id="int-default"),
    pytest.param(lambda f, k: f.bool(k, False), "absent", False, id="bool-default"),
    pytest.param(lambda f, k: f.raw(k), "n", None, id="raw"),
])
def test_fields_getters(getter, key, expected):
    f = Fields(DOC, "doc")
    value = getter(f, key)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(("getter", "key", "message"), [
    pytest.param(lambda f, k: f.str(k), "i", "expected a string, got an integer", id="str-int"),
    pytest.param(lambda f, k: f.str(k, max_len=3), "s", "longer than 3", id="str-too-long"),
    pytest.param(lambda f, k: f.int(k), "b", "expected an integer, got a boolean",
                 id="int-bool"),
    pytest.param(lambda f, k: f.int(k), "f", "expected an integer, got a number",
                 id="int-float"),
    pytest.param(lambda f, k: f.int(k), "s", "expected an integer, got a string",
                 id="int-string"),
    pytest.param(lambda f, k: f.int(k), "neg", "must be >= 0", id="int-negative"),
    pytest.param(lambda f, k: f.int(k, minimum=5), "i", "must be >= 5", id="int-minimum"),
    pytest.param(lambda f, k: f.float(k), "b", "expected a number, got a boolean",
                 id="float-bool"),
    pytest.param(lambda f, k: f.float(k), "s", "expected a number", id="float-string"),
    pytest.param(lambda f, k: f.float(k), "n", "expected a number, got null", id="float-null"),
    pytest.param(lambda f, k: f.bool(k), "i", "expected true or false", id="bool-int"),
    pytest.param(lambda f, k: f.bool(k), "z", "expected true or false", id="bool-zero"),
    pytest.param(lambda f, k: f.list(k), "o", "expected a list, got an object", id="list-obj"),
    pytest.param(lambda f, k: f.list(k, max_len=1), "l", "more than 1 items",
                 id="list-too-long"),
    pytest.param(lambda f, k: f.mapping(k), "l", "expected an object", id="mapping-list"),
    pytest.param(lambda f, k: f.choice(k, ("blue",)), "c", "must be one of blue, got 'red'",
                 id="choice-other"),
    pytest.param(lambda f, k: f.str(k), "absent", "missing", id="missing"),
])
def test_fields_refusals_name_the_field(getter, key, message):
    f = Fields(DOC, "doc.sub[2]")
    with pytest.raises(SchemaError, match=message) as excinfo:
        getter(f, key)
    assert excinfo.value.field == f"doc.sub[2].{key}"
    assert str(excinfo.value).startswith(f"doc.sub[2].{key}: ")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")],
                         ids=["nan", "inf", "minus-inf"])
def test_fields_float_must_be_finite(value):
    with pytest.raises(SchemaError, match="finite") as excinfo:
        Fields({"x": value}, "d").float("x")
    assert excinfo.value.field == "d.x"


def test_fields_refuses_unknown_fields():
    f = Fields({"a": 1, "zz": 2, "b": 3}, "doc")
    f.int("a")
    with pytest.raises(SchemaError, match="unknown field") as excinfo:
        f.done()
    assert excinfo.value.field == "doc.b"  # the first unknown one, by name
    assert "'b'" in str(excinfo.value) and "'zz'" in str(excinfo.value)


def test_fields_done_accepts_when_everything_was_read():
    f = Fields({"a": 1, "b": None}, "doc")
    f.int("a")
    assert f.opt_float("b") is None
    f.done()
    assert f.has("a") and not f.has("c")


def test_fields_default_for_absent_field_is_not_an_unknown_field():
    f = Fields({}, "doc")
    assert f.int("a", 3) == 3
    f.done()


@pytest.mark.parametrize("obj", [[], "x", 1, None, True], ids=["list", "str", "int", "null",
                                                               "bool"])
def test_fields_needs_an_object(obj):
    with pytest.raises(SchemaError, match="expected an object") as excinfo:
        Fields(obj, "doc.part")
    assert excinfo.value.field == "doc.part"


def test_nested_fields_carry_the_path():
    f = Fields({"outer": {"inner": "x"}}, "doc")
    inner = f.obj("outer")
    assert inner.where == "doc.outer"
    with pytest.raises(SchemaError) as excinfo:
        inner.int("inner")
    assert excinfo.value.field == "doc.outer.inner"
    with pytest.raises(SchemaError) as excinfo:
        Fields({"outer": [1]}, "doc").obj("outer")
    assert excinfo.value.field == "doc.outer"


@pytest.mark.parametrize("literal", [
    b"1e400", b"1E+400", b"1e0400", b"9" * 400 + b".0", b"9" * 308 + b"e1",
    b"1" + b"0" * 290 + b"e99", b"-1e309",
])
def test_every_overflowing_float_literal_is_refused(literal):
    from edgefleet.contract.wire import parse_json

    with pytest.raises(SchemaError):
        parse_json(b"[" + literal + b"]", what="x", max_bytes=10_000)


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_finite_floats_parse_back_exactly(x):
    from edgefleet.contract.wire import parse_json

    assert parse_json(json.dumps([x]).encode(), what="x", max_bytes=1000) == [x]
