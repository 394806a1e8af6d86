"""The manifest: Hypothesis round trips, a table of invalid documents, version order."""

from __future__ import annotations

import copy
import functools
import itertools
import json
import operator
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefleet.contract.errors import SchemaError
from edgefleet.contract.manifest import (
    DTYPES,
    MEMBER_RE,
    NAME_RE,
    Binding,
    FeatureSpec,
    Fidelity,
    FileEntry,
    Lineage,
    Manifest,
    OutputSpec,
    Quantization,
    parse_version,
)
from tests.contract.test_calibration import calibrations

# --------------------------------------------------------------------------- strategies

finite = st.floats(allow_nan=False, allow_infinity=False)
opt_finite = st.none() | finite
text = st.text(max_size=20)  # the default alphabet has no surrogates
hex64 = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)

numeric_ident = st.integers(0, 10**6).map(str)
alnum_ident = st.text("0123456789abcxyzABCXYZ-", min_size=1, max_size=6).filter(
    lambda s: not s.isdigit())  # an identifier with a non-digit: compared as text
versions = st.builds(
    lambda core, pre: ".".join(map(str, core)) + (f"-{'.'.join(pre)}" if pre else ""),
    st.tuples(*[st.integers(0, 10**6)] * 3),
    st.lists(numeric_ident | alnum_ident, max_size=4),
)
# NAME_RE and MEMBER_RE: [a-z0-9] then up to 63 of [a-z0-9._-] (from_regex is slower)
plain_names = st.builds(operator.add, st.sampled_from("abcxyz0189"),
                        st.text("abcxyz0189._-", max_size=63))
feature_names = st.text(st.characters(min_codepoint=0x20, exclude_categories=("Cs",)),
                        min_size=1, max_size=128)


@st.composite
def feature_specs(draw) -> FeatureSpec:
    kind = draw(st.sampled_from(["numeric", "categorical"]))
    lo, hi = draw(opt_finite), draw(opt_finite)
    if lo is not None and hi is not None and lo > hi:
        lo, hi = hi, lo
    return FeatureSpec(
        name=draw(feature_names),
        kind=kind,
        dtype="string" if kind == "categorical" else draw(st.sampled_from(DTYPES[:3])),
        min=lo,
        max=hi,
        categories=tuple(draw(st.lists(text, max_size=5))),
        missing_allowed=draw(st.booleans()),
    )


file_entries = st.builds(
    FileEntry,
    path=plain_names.filter(
        lambda p: p not in ("manifest.json", "signatures.json")),
    sha256=hex64,
    size=st.integers(0, 2**40),
)
outputs = st.builds(OutputSpec, name=st.text(max_size=128),
                    role=st.sampled_from(["label", "probabilities", "value"]),
                    dtype=st.sampled_from(DTYPES))
bindings = st.builds(Binding, layout=st.sampled_from(["tensor", "columns"]),
                     input_name=st.text(max_size=128),
                     dtype=st.sampled_from(["float32", "float64"]))
quantizations = st.builds(
    Quantization, mode=st.sampled_from(["none", "dynamic", "static", "fp16"]),
    applied=st.booleans(), quantized_ops=st.integers(0, 10**6),
    float_ops_kept=st.lists(text, max_size=4).map(tuple), note=st.text(max_size=100))
fidelities = st.builds(
    Fidelity, rows=st.integers(0, 10**9), passed=st.booleans(), forced=st.booleans(),
    label_agreement=opt_finite, max_abs_prob_diff=opt_finite, mean_abs_prob_diff=opt_finite,
    max_abs_error=opt_finite, max_rel_error=opt_finite,
    bounds=st.dictionaries(text, finite, max_size=4))
lineages = st.builds(
    Lineage, source_sha256=hex64, source_kind=st.sampled_from(["sklearn", "onnx"]),
    estimator=st.text(max_size=100), data_sha256=hex64, data_rows=st.integers(0, 10**12),
    code_revision=st.none() | st.text(max_size=40),
    libraries=st.dictionaries(text, text, max_size=5))
labels = st.integers(-(2**63), 2**63) | text

manifests = st.builds(
    Manifest,
    name=plain_names,
    version=versions,
    created_at=st.text(max_size=64),
    task=st.sampled_from(["classification", "regression"]),
    inputs=st.lists(feature_specs(), min_size=1, max_size=5,
                    unique_by=lambda s: s.name).map(tuple),
    outputs=st.lists(outputs, max_size=3).map(tuple),
    binding=bindings,
    # from_dict returns files sorted (the wire order), so generate them sorted
    files=st.lists(file_entries, max_size=5, unique_by=lambda e: e.path).map(
        lambda es: tuple(sorted(es))),
    reference_hash=hex64,
    lineage=lineages,
    classes=st.lists(labels, max_size=5).map(tuple),
    quantization=quantizations,
    fidelity=fidelities,
    metrics=st.dictionaries(text, finite, max_size=5),
    description=st.text(max_size=200),
    calibration=st.none() | calibrations(),
)


# --------------------------------------------------------------------------- round trips


@settings(max_examples=100, deadline=None)
@given(manifests)
def test_manifest_round_trip(m: Manifest):
    assert NAME_RE.match(m.name) and all(MEMBER_RE.match(e.path) for e in m.files)
    data = m.to_bytes()
    assert Manifest.from_bytes(data) == m
    assert Manifest.from_dict(m.to_dict()) == m
    assert Manifest.from_dict(json.loads(data)) == m
    assert Manifest.from_bytes(data).to_bytes() == data


@settings(max_examples=50, deadline=None)
@given(manifests)
def test_manifest_bytes_are_canonical_json(m: Manifest):
    data = m.to_bytes()
    assert data == json.dumps(json.loads(data), sort_keys=True, separators=(",", ":"),
                              ensure_ascii=False).encode()
    # any other spelling of the same document is refused
    spaced = json.dumps(json.loads(data), sort_keys=True).encode()
    assert spaced != data
    with pytest.raises(SchemaError, match="canonical"):
        Manifest.from_bytes(spaced)


def test_manifest_lookups(manifest: Manifest):
    assert manifest.file("model.onnx").size == 8192
    assert manifest.file("absent") is None
    assert manifest.feature("colour").kind == "categorical"
    assert manifest.feature("absent") is None
    assert manifest.output("probabilities").name == "probabilities"
    assert manifest.output("value") is None
    assert manifest.version_key == parse_version("1.2.0")


def test_unsorted_files_are_written_sorted(manifest: Manifest):
    shuffled = replace(manifest, files=tuple(reversed(manifest.files)))
    assert shuffled.to_bytes() == manifest.to_bytes()
    assert Manifest.from_bytes(shuffled.to_bytes()).files == tuple(sorted(manifest.files))


# --------------------------------------------------------------------------- invalid


_DELETE = object()


def mutate(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """``doc`` with the value at ``path`` (dots, and digits for list items) replaced."""
    doc = copy.deepcopy(doc)
    *parents, leaf = path.split(".")
    target: Any = doc
    for p in parents:
        target = target[int(p)] if p.isdigit() else target[p]
    key = int(leaf) if leaf.isdigit() else leaf
    if value is _DELETE:
        del target[key]
    else:
        target[key] = value
    return doc


def _with_file_copy(doc):
    doc = copy.deepcopy(doc)
    doc["files"].append(dict(doc["files"][0]))
    return doc


def _with_listed(name):
    def change(doc):
        doc = copy.deepcopy(doc)
        doc["files"].append({**doc["files"][0], "path": name})
        return doc
    return change


def _with_input_copy(doc):
    doc = copy.deepcopy(doc)
    doc["inputs"].append(dict(doc["inputs"][0]))
    return doc


INVALID = [
    # (id, path, value or a function of the document, the field named)
    ("schema-2", "schema", 2, "manifest.schema"),
    ("schema-string", "schema", "1", "manifest.schema"),
    ("name-upper", "name", "Iris", "manifest.name"),
    ("name-space", "name", "iris model", "manifest.name"),
    ("name-empty", "name", "", "manifest.name"),
    ("name-leading-dash", "name", "-iris", "manifest.name"),
    ("name-trailing-newline", "name", "iris\n", "manifest.name"),
    ("name-too-long", "name", "a" * 65, "manifest.name"),
    ("name-not-string", "name", 5, "manifest.name"),
    ("version-two-parts", "version", "1.0", "manifest.version"),
    ("version-leading-zero", "version", "01.0.0", "manifest.version"),
    ("version-prerelease-leading-zero", "version", "1.0.0-01", "manifest.version"),
    ("version-empty-prerelease", "version", "1.0.0-", "manifest.version"),
    ("version-build-metadata", "version", "1.0.0+build.1", "manifest.version"),
    ("version-v-prefix", "version", "v1.0.0", "manifest.version"),
    ("version-trailing-newline", "version", "1.0.0\n", "manifest.version"),
    ("version-arabic-digit", "version", "1\u0663.0.0", "manifest.version"),
    ("version-number", "version", 1, "manifest.version"),
    ("unknown-field", "extra", "x", "manifest.extra"),
    ("missing-task", "task", _DELETE, "manifest.task"),
    ("task-unknown", "task", "clustering", "manifest.task"),
    ("created-at-too-long", "created_at", "x" * 65, "manifest.created_at"),
    ("description-too-long", "description", "x" * 4097, "manifest.description"),
    ("no-inputs", "inputs", [], "manifest.inputs"),
    ("inputs-not-list", "inputs", {}, "manifest.inputs"),
    ("duplicate-feature-names", _with_input_copy, None, "manifest.inputs"),
    ("feature-unknown-field", "inputs.0.unit", "cm", "manifest.inputs[0].unit"),
    ("feature-name-empty", "inputs.0.name", "", "manifest.inputs[0].name"),
    ("feature-name-control-char", "inputs.0.name", "a\x01b", "manifest.inputs[0].name"),
    ("feature-name-trailing-newline", "inputs.0.name", "a\n", "manifest.inputs[0].name"),
    ("feature-name-too-long", "inputs.0.name", "a" * 129, "manifest.inputs[0].name"),
    ("feature-kind-unknown", "inputs.0.kind", "text", "manifest.inputs[0].kind"),
    ("feature-dtype-unknown", "inputs.0.dtype", "int8", "manifest.inputs[0].dtype"),
    ("categorical-float-dtype", "inputs.1.dtype", "float32", "manifest.inputs[1].dtype"),
    ("numeric-string-dtype", "inputs.0.dtype", "string", "manifest.inputs[0].dtype"),
    ("min-above-max", "inputs.0.min", 8.0, "manifest.inputs[0].min"),
    ("min-infinite", "inputs.0.min", float("-inf"), "manifest.inputs[0].min"),
    ("max-nan", "inputs.0.max", float("nan"), "manifest.inputs[0].max"),
    ("max-bool", "inputs.0.max", True, "manifest.inputs[0].max"),
    ("categories-not-strings", "inputs.1.categories", ["a", 1], "manifest.inputs[1].categories"),
    ("missing-allowed-string", "inputs.1.missing_allowed", "yes",
     "manifest.inputs[1].missing_allowed"),
    ("output-role-unknown", "outputs.0.role", "score", "manifest.outputs[0].role"),
    ("output-unknown-field", "outputs.0.shape", [1], "manifest.outputs[0].shape"),
    ("classes-bool", "classes", [True, False], "manifest.classes"),
    ("classes-float", "classes", [0.5], "manifest.classes"),
    ("binding-missing", "binding", _DELETE, "manifest.binding"),
    ("binding-not-object", "binding", "tensor", "manifest.binding"),
    ("binding-layout-unknown", "binding.layout", "rows", "manifest.binding.layout"),
    ("binding-dtype-int", "binding.dtype", "int64", "manifest.binding.dtype"),
    ("file-sha256-upper", "files.0.sha256", "AB" * 32, "manifest.files[0].sha256"),
    ("file-sha256-short", "files.0.sha256", "ab" * 31, "manifest.files[0].sha256"),
    ("file-sha256-not-hex", "files.0.sha256", "zz" * 32, "manifest.files[0].sha256"),
    ("file-path-upper", "files.0.path", "Model.onnx", "manifest.files[0].path"),
    ("file-path-nested", "files.0.path", "models/model.onnx", "manifest.files[0].path"),
    ("file-path-dotdot", "files.0.path", "..", "manifest.files[0].path"),
    ("file-path-absolute", "files.0.path", "/model.onnx", "manifest.files[0].path"),
    ("file-path-trailing-newline", "files.0.path", "model.onnx\n", "manifest.files[0].path"),
    ("file-size-negative", "files.0.size", -1, "manifest.files[0].size"),
    ("file-size-bool", "files.0.size", True, "manifest.files[0].size"),
    ("file-size-float", "files.0.size", 10.0, "manifest.files[0].size"),
    ("file-unknown-field", "files.0.mode", 420, "manifest.files[0].mode"),
    ("duplicate-file-paths", _with_file_copy, None, "manifest.files"),
    ("manifest-listed-in-files", _with_listed("manifest.json"), None, "manifest.files"),
    ("signatures-listed-in-files", _with_listed("signatures.json"), None, "manifest.files"),
    ("reference-hash-short", "reference_hash", "ab", "manifest.reference_hash"),
    ("reference-hash-upper", "reference_hash", "AB" * 32, "manifest.reference_hash"),
    ("metrics-string", "metrics", {"accuracy": "high"}, "manifest.metrics"),
    ("metrics-bool", "metrics", {"accuracy": True}, "manifest.metrics"),
    ("metrics-list", "metrics", [], "manifest.metrics"),
    ("quantization-mode-unknown", "quantization.mode", "int4", "manifest.quantization.mode"),
    ("quantization-ops-negative", "quantization.quantized_ops", -1,
     "manifest.quantization.quantized_ops"),
    ("fidelity-rows-negative", "fidelity.rows", -1, "manifest.fidelity.rows"),
    ("fidelity-bound-string", "fidelity.bounds", {"x": "a"}, "manifest.fidelity.bounds"),
    ("fidelity-agreement-string", "fidelity.label_agreement", "1",
     "manifest.fidelity.label_agreement"),
    ("lineage-kind-unknown", "lineage.source_kind", "pytorch", "manifest.lineage.source_kind"),
    ("lineage-revision-number", "lineage.code_revision", 5, "manifest.lineage.code_revision"),
    ("lineage-revision-missing", "lineage.code_revision", _DELETE,
     "manifest.lineage.code_revision"),
    ("lineage-library-version-number", "lineage.libraries", {"numpy": 2},
     "manifest.lineage.libraries"),
    ("lineage-rows-bool", "lineage.data_rows", False, "manifest.lineage.data_rows"),
]


@pytest.mark.parametrize(("path", "value", "field"),
                         [pytest.param(p, v, f, id=i) for i, p, v, f in INVALID])
def test_invalid_manifest_names_the_field(manifest: Manifest, path, value, field):
    doc = manifest.to_dict()
    bad = path(doc) if callable(path) else mutate(doc, path, value)
    assert bad != doc
    with pytest.raises(SchemaError) as excinfo:
        Manifest.from_dict(bad)
    assert type(excinfo.value) is SchemaError
    assert excinfo.value.field == field, str(excinfo.value)
    where, _, key = field.rpartition(".")
    # "manifest.files[0].size: must be >= 0" or "manifest.files[0]: unknown field(s) 'mode'"
    assert field in str(excinfo.value) or f"{where}: unknown field(s) '{key}'" in str(
        excinfo.value)


def test_the_table_base_is_valid(manifest: Manifest):
    assert Manifest.from_dict(manifest.to_dict()) == manifest


@pytest.mark.parametrize("doc", [[], "manifest", None, 1], ids=["list", "string", "null",
                                                                "number"])
def test_manifest_must_be_an_object(doc):
    with pytest.raises(SchemaError) as excinfo:
        Manifest.from_dict(doc)
    assert excinfo.value.field == "manifest"


@pytest.mark.parametrize(("data", "message"), [
    pytest.param(b"", "not valid JSON", id="empty"),
    pytest.param(b"{", "not valid JSON", id="truncated"),
    pytest.param(b"\xff", "not valid JSON", id="not-utf8"),
    pytest.param(b'{"schema": Infinity}', "not valid JSON", id="infinity"),
    pytest.param(b'{"schema": 1e999}', "not valid JSON", id="overflowing-number"),
    pytest.param(b" " * (4 * 1024 * 1024 + 1), "exceeds the limit", id="too-large"),
])
def test_manifest_bytes_refused(data, message):
    with pytest.raises(SchemaError, match=message) as excinfo:
        Manifest.from_bytes(data)
    assert "manifest.json" in str(excinfo.value)


def test_non_canonical_manifest_bytes_refused(manifest: Manifest):
    doc = manifest.to_dict()
    for variant in (json.dumps(doc, indent=2, sort_keys=True),
                    json.dumps(doc, sort_keys=True, separators=(",", ":")) + "\n",
                    json.dumps(doc, separators=(",", ":"))):  # keys in insertion order
        data = variant.encode()
        assert json.loads(data) == json.loads(manifest.to_bytes())
        with pytest.raises(SchemaError, match="canonical") as excinfo:
            Manifest.from_bytes(data)
        assert excinfo.value.field == "manifest"


def test_non_ascii_manifest_is_refused_when_escaped(manifest: Manifest):
    m = replace(manifest, description="café ☕")
    assert "café ☕".encode() in m.to_bytes()
    assert Manifest.from_bytes(m.to_bytes()) == m
    escaped = json.dumps(m.to_dict(), sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(SchemaError, match="canonical"):
        Manifest.from_bytes(escaped)


# --------------------------------------------------------------------------- versions

ORDERED = ["0.0.1", "0.1.0", "1.0.0-0", "1.0.0-1", "1.0.0-2", "1.0.0-10", "1.0.0-alpha",
           "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta", "1.0.0-beta.2", "1.0.0-beta.11",
           "1.0.0-rc.1", "1.0.0", "1.0.1", "1.1.0", "1.2.0", "1.10.0", "2.0.0", "10.0.0"]


def test_semver_org_ordering():
    keys = [parse_version(v) for v in ORDERED]
    for i, (a, b) in enumerate(itertools.pairwise(keys)):
        assert a < b, (ORDERED[i], ORDERED[i + 1])
    assert sorted(reversed(ORDERED), key=parse_version) == ORDERED


def _semver_cmp(a: str, b: str) -> int:
    """semver.org section 11, written out independently of parse_version."""
    def split(v):
        core, _, pre = v.partition("-")
        return [int(x) for x in core.split(".")], pre.split(".") if pre else []

    (ca, pa), (cb, pb) = split(a), split(b)
    if ca != cb:
        return -1 if ca < cb else 1
    if not pa or not pb:
        return (not pa) - (not pb)  # a release is higher than its pre-releases
    for x, y in zip(pa, pb, strict=False):
        if x == y:
            continue
        if x.isdigit() and y.isdigit():
            return -1 if int(x) < int(y) else 1
        if x.isdigit() != y.isdigit():
            return -1 if x.isdigit() else 1  # numeric identifiers sort first
        return -1 if x < y else 1  # ASCII order
    return (len(pa) > len(pb)) - (len(pa) < len(pb))


@settings(max_examples=200, deadline=None)
@given(versions, versions)
def test_parse_version_agrees_with_semver(a, b):
    ka, kb = parse_version(a), parse_version(b)
    expected = _semver_cmp(a, b)
    assert ((ka > kb) - (ka < kb)) == expected
    assert (ka == kb) == (a == b)


@settings(max_examples=100, deadline=None)
@given(st.lists(versions, min_size=2, max_size=8))
def test_parse_version_sorts_like_semver(vs):
    assert sorted(vs, key=parse_version) == sorted(vs, key=functools.cmp_to_key(_semver_cmp))


@pytest.mark.parametrize("text", [
    "", "1", "1.0", "1.0.0.0", "01.0.0", "1.01.0", "1.0.01", "1.0.0-", "1.0.0-01",
    "1.0.0-alpha..1", "1.0.0-alpha_1", "1.0.0+build", "v1.0.0", " 1.0.0", "1.0.0 ",
    "1.0.0\n", "1\u0663.0.0", "1.0.0-\u0663", "-1.0.0", "1.-1.0", "a.b.c",
], ids=lambda t: repr(t))
def test_invalid_versions_are_refused(text):
    with pytest.raises(SchemaError) as excinfo:
        parse_version(text)
    assert excinfo.value.field == "version"


@pytest.mark.parametrize("text", ["0.0.0", "1.0.0-0", "1.0.0-x-y-z.-", "1.0.0-0a",
                                  "999999999999.0.0", "1.0.0-alpha.0.beta"],
                         ids=lambda t: t)
def test_valid_edge_versions(text):
    assert parse_version(text)[:3] == tuple(int(x) for x in text.split("-")[0].split("."))


@settings(max_examples=100, deadline=None)
@given(versions)
def test_a_trailing_newline_is_never_a_version(v):
    parse_version(v)
    with pytest.raises(SchemaError):
        parse_version(v + "\n")
