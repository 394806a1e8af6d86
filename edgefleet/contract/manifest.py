"""The bundle manifest: a typed, frozen description of everything inside a bundle.

``Manifest.to_dict``/``from_dict`` are exact inverses (property-tested); ``from_dict``
refuses unknown fields and names the field at fault. The manifest is signed as
canonical JSON (:func:`edgefleet.contract.wire.canonical_json`), so it holds no floats that
JSON cannot carry and every list has a defined order.

The manifest describes how the ONNX graph is fed (:class:`Binding`): one 2-D tensor
in schema order (``tensor`` layout, numeric models), or one ``[N, 1]`` input per
feature (``columns`` layout, mixed numeric and categorical models). The device's
runtime (:mod:`edgefleet.contract.runtime`) reads only this, never the graph's own metadata.

The optional ``card`` section (:mod:`edgefleet.contract.card`) is the model card, so its
numbers are signed with everything else; a manifest without one is written without the
field, byte for byte as before cards existed. The optional ``calibration`` section
(:mod:`edgefleet.contract.calibration`) likewise.

This module does not read files or check signatures.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from edgefleet.contract.calibration import Calibration
from edgefleet.contract.card import ModelCard
from edgefleet.contract.errors import SchemaError
from edgefleet.contract.wire import Fields, canonical_json, parse_json

__all__ = [
    "MANIFEST_SCHEMA",
    "Binding",
    "FeatureSpec",
    "Fidelity",
    "FileEntry",
    "Lineage",
    "Manifest",
    "OutputSpec",
    "Quantization",
    "parse_version",
]

MANIFEST_SCHEMA = 1
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_FEATURES = 4096
MAX_CATEGORIES = 4096

# \Z, not $: "$" also matches before a trailing newline ("model\n" would pass).
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}\Z")
FEATURE_RE = re.compile(r"^[^\x00-\x1f]{1,128}\Z")
# semver.org 2.0.0, without build metadata (it would not order versions); [0-9], not
# \d, which also matches non-ASCII digits that int() then accepts ("1\u0663.0.0" == 13.0.0).
SEMVER_RE = re.compile(
    r"^(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)"
    r"(?:-((?:0|[1-9][0-9]*|[0-9]*[a-zA-Z-][0-9a-zA-Z-]*)"
    r"(?:\.(?:0|[1-9][0-9]*|[0-9]*[a-zA-Z-][0-9a-zA-Z-]*))*))?\Z"
)
SHA256_RE = re.compile(r"^[0-9a-f]{64}\Z")
MEMBER_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}\Z")

KINDS = ("numeric", "categorical")
DTYPES = ("float32", "float64", "int64", "string")
TASKS = ("classification", "regression")
ROLES = ("label", "probabilities", "value")
LAYOUTS = ("tensor", "columns")
QUANT_MODES = ("none", "dynamic", "static", "fp16")
Label = int | str


def parse_version(text: str) -> tuple:
    """A sortable key for a semantic version (pre-releases sort before the release).

    Raises:
        SchemaError: not a semantic version ``MAJOR.MINOR.PATCH[-PRERELEASE]``.
    """
    m = SEMVER_RE.match(text)
    if not m:
        raise SchemaError(f"version {text!r} is not a semantic version like 1.4.0 or 2.0.0-rc.1",
                          field="version")
    major, minor, patch, pre = m.groups()
    if pre is None:
        pre_key: tuple = ((1,),)  # a release sorts after all of its pre-releases
    else:
        pre_key = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split("."))
        pre_key = ((0,), *pre_key)
    return (int(major), int(minor), int(patch), pre_key)


@dataclass(frozen=True)
class FeatureSpec:
    """One input feature: what the device accepts, and what training saw."""

    name: str
    kind: str  # numeric | categorical
    dtype: str  # float32 | float64 | int64 | string
    min: float | None = None  # training range (numeric); outside is served and counted
    max: float | None = None
    categories: tuple[str, ...] = ()  # training categories (categorical)
    missing_allowed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "dtype": self.dtype, "min": self.min,
                "max": self.max, "categories": list(self.categories),
                "missing_allowed": self.missing_allowed}

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> FeatureSpec:
        f = Fields(obj, where)
        name = f.matching("name", FEATURE_RE, "must be 1-128 printable characters",
                          max_len=128)
        kind = f.choice("kind", KINDS)
        dtype = f.choice("dtype", DTYPES)
        lo, hi = f.opt_float("min"), f.opt_float("max")
        cats = f.list("categories", max_len=MAX_CATEGORIES)
        if not all(isinstance(c, str) for c in cats):
            raise f.bad("categories", "must be strings")
        spec = cls(name, kind, dtype, lo, hi, tuple(cats), f.bool("missing_allowed"))
        f.done()
        if kind == "categorical" and dtype != "string":
            raise f.bad("dtype", "a categorical feature has dtype string")
        if kind == "numeric" and dtype == "string":
            raise f.bad("dtype", "a numeric feature cannot have dtype string")
        if lo is not None and hi is not None and lo > hi:
            raise f.bad("min", f"min {lo} is above max {hi}")
        return spec


@dataclass(frozen=True)
class OutputSpec:
    name: str  # the ONNX output name
    role: str  # label | probabilities | value
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role, "dtype": self.dtype}

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> OutputSpec:
        f = Fields(obj, where)
        out = cls(f.str("name", max_len=128), f.choice("role", ROLES), f.choice("dtype", DTYPES))
        f.done()
        return out


@dataclass(frozen=True)
class Binding:
    """How rows become ONNX inputs."""

    layout: str  # tensor | columns
    input_name: str = "input"  # tensor layout only
    dtype: str = "float32"  # tensor layout only: the tensor's element type

    def to_dict(self) -> dict[str, Any]:
        return {"layout": self.layout, "input_name": self.input_name, "dtype": self.dtype}

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> Binding:
        f = Fields(obj, where)
        out = cls(f.choice("layout", LAYOUTS), f.str("input_name", max_len=128),
                  f.choice("dtype", ("float32", "float64")))
        f.done()
        return out


@dataclass(frozen=True, order=True)
class FileEntry:
    path: str
    sha256: str
    size: int

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "size": self.size}

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> FileEntry:
        f = Fields(obj, where)
        path = f.matching("path", MEMBER_RE, "{value!r} is not a plain lower-case file name",
                          max_len=64)
        sha = f.matching("sha256", SHA256_RE, "must be 64 lower-case hex digits", max_len=64)
        out = cls(path, sha, f.int("size"))
        f.done()
        return out


@dataclass(frozen=True)
class Quantization:
    mode: str = "none"  # what was asked
    applied: bool = False  # whether any operator was actually quantised
    quantized_ops: int = 0
    float_ops_kept: tuple[str, ...] = ()  # nodes deliberately left in float
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "applied": self.applied, "quantized_ops": self.quantized_ops,
                "float_ops_kept": list(self.float_ops_kept), "note": self.note}

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> Quantization:
        f = Fields(obj, where)
        kept = f.list("float_ops_kept", max_len=MAX_FEATURES)
        if not all(isinstance(k, str) for k in kept):
            raise f.bad("float_ops_kept", "must be strings")
        out = cls(f.choice("mode", QUANT_MODES), f.bool("applied"), f.int("quantized_ops"),
                  tuple(kept), f.str("note", max_len=2048))
        f.done()
        return out


@dataclass(frozen=True)
class Fidelity:
    """ONNX outputs against the original model on held-out rows."""

    rows: int = 0
    passed: bool = True
    forced: bool = False  # built past a failed gate with --force
    label_agreement: float | None = None  # classifiers
    max_abs_prob_diff: float | None = None
    mean_abs_prob_diff: float | None = None
    max_abs_error: float | None = None  # regressors
    max_rel_error: float | None = None
    bounds: dict[str, float] = field(default_factory=dict)

    _OPT = ("label_agreement", "max_abs_prob_diff", "mean_abs_prob_diff", "max_abs_error",
            "max_rel_error")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"rows": self.rows, "passed": self.passed, "forced": self.forced,
                             "bounds": dict(sorted(self.bounds.items()))}
        for k in self._OPT:
            d[k] = getattr(self, k)
        return d

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> Fidelity:
        f = Fields(obj, where)
        bounds = f.mapping("bounds")
        for k, v in bounds.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise f.bad("bounds", f"bound {k!r} is not a number")
        out = cls(f.int("rows"), f.bool("passed"), f.bool("forced"),
                  *(f.opt_float(k) for k in cls._OPT),
                  bounds={k: float(v) for k, v in bounds.items()})
        f.done()
        return out


@dataclass(frozen=True)
class Lineage:
    source_sha256: str  # the model file as given to edgepack
    source_kind: str  # sklearn | onnx
    estimator: str  # e.g. "Pipeline(StandardScaler, MLPClassifier)"
    data_sha256: str
    data_rows: int
    code_revision: str | None = None  # git revision of the working tree, when there is one
    libraries: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"source_sha256": self.source_sha256, "source_kind": self.source_kind,
                "estimator": self.estimator, "data_sha256": self.data_sha256,
                "data_rows": self.data_rows, "code_revision": self.code_revision,
                "libraries": dict(sorted(self.libraries.items()))}

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> Lineage:
        f = Fields(obj, where)
        src, kind = f.str("source_sha256", max_len=64), f.choice("source_kind", ("sklearn", "onnx"))
        est, data = f.str("estimator", max_len=1024), f.str("data_sha256", max_len=64)
        rows = f.int("data_rows")
        rev = f.raw("code_revision")
        if rev is not None and not isinstance(rev, str):
            raise f.bad("code_revision", "must be a string or null")
        libs = f.mapping("libraries")
        if not all(isinstance(v, str) for v in libs.values()):
            raise f.bad("libraries", "versions must be strings")
        f.done()
        return cls(src, kind, est, data, rows, rev, libs)


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    created_at: str  # RFC 3339, UTC; from SOURCE_DATE_EPOCH when set
    task: str  # classification | regression
    inputs: tuple[FeatureSpec, ...]
    outputs: tuple[OutputSpec, ...]
    binding: Binding
    files: tuple[FileEntry, ...]
    reference_hash: str  # of reference.json's edges and vocabularies
    lineage: Lineage
    classes: tuple[Label, ...] = ()
    quantization: Quantization = Quantization()
    fidelity: Fidelity = Fidelity()
    metrics: dict[str, float] = field(default_factory=dict)
    description: str = ""
    card: ModelCard | None = None  # None: built before cards (such manifests still verify)
    calibration: Calibration | None = None  # fitted on held-out rows (classifiers only)
    schema: int = MANIFEST_SCHEMA

    def file(self, path: str) -> FileEntry | None:
        return next((e for e in self.files if e.path == path), None)

    def feature(self, name: str) -> FeatureSpec | None:
        return next((s for s in self.inputs if s.name == name), None)

    def output(self, role: str) -> OutputSpec | None:
        return next((o for o in self.outputs if o.role == role), None)

    @property
    def version_key(self) -> tuple:
        return parse_version(self.version)

    def to_dict(self) -> dict[str, Any]:
        doc = {
            "schema": self.schema,
            "name": self.name,
            "version": self.version,
            "created_at": self.created_at,
            "description": self.description,
            "task": self.task,
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [o.to_dict() for o in self.outputs],
            "classes": list(self.classes),
            "binding": self.binding.to_dict(),
            "files": [e.to_dict() for e in sorted(self.files)],
            "reference_hash": self.reference_hash,
            "quantization": self.quantization.to_dict(),
            "fidelity": self.fidelity.to_dict(),
            "metrics": dict(sorted(self.metrics.items())),
            "lineage": self.lineage.to_dict(),
        }
        # only when present: a manifest from before cards keeps its exact signed bytes
        if self.card is not None:
            doc["card"] = self.card.to_dict()
        if self.calibration is not None:  # likewise
            doc["calibration"] = self.calibration.to_dict()
        return doc

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_dict())

    @classmethod
    def from_dict(cls, obj: Any) -> Manifest:
        """Parse and check a manifest document, one reader per part, in the order of the
        document (so the first field at fault is the one named).

        Raises:
            SchemaError: naming the field at fault.
        """
        f = Fields(obj, "manifest")
        schema, name, version = _read_identity(f)
        inputs, outputs, classes = _read_signature(f)
        files = _read_files(f)
        metrics = _read_metrics(f)
        ref = f.matching("reference_hash", SHA256_RE, "must be 64 lower-case hex digits",
                         max_len=64)
        card, calibration = _optional(f, "card"), _optional(f, "calibration")
        m = cls(
            name=name,
            version=version,
            created_at=f.str("created_at", max_len=64),
            description=f.str("description", max_len=4096),
            task=f.choice("task", TASKS),
            inputs=inputs,
            outputs=outputs,
            classes=classes,
            binding=Binding.from_dict(f.raw("binding"), "manifest.binding"),
            files=files,
            reference_hash=ref,
            quantization=Quantization.from_dict(f.raw("quantization"), "manifest.quantization"),
            fidelity=Fidelity.from_dict(f.raw("fidelity"), "manifest.fidelity"),
            metrics=metrics,
            lineage=Lineage.from_dict(f.raw("lineage"), "manifest.lineage"),
            card=ModelCard.from_dict(card, "manifest.card") if card is not None else None,
            calibration=None if calibration is None else
            Calibration.from_dict(calibration, "manifest.calibration"),
            schema=schema,
        )
        f.done()
        return m

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """Parse manifest bytes, which must be canonical JSON.

        Raises:
            SchemaError: not JSON, not canonical, or not a valid manifest.
        """
        obj = parse_json(data, what="manifest.json", max_bytes=MAX_MANIFEST_BYTES)
        manifest = cls.from_dict(obj)
        # Stricter than canonical JSON: the bytes must be exactly what this manifest
        # writes, so re-signing or re-packing a parsed manifest never changes a byte.
        if manifest.to_bytes() != data:
            raise SchemaError("manifest.json: not in canonical form", field="manifest")
        return manifest


def _read_identity(f: Fields) -> tuple[int, str, str]:
    """The manifest's schema, and the bundle's name and version."""
    schema = f.int("schema")
    if schema != MANIFEST_SCHEMA:
        raise f.bad("schema", f"unsupported manifest schema {schema} "
                              f"(this edgefleet reads {MANIFEST_SCHEMA})")
    name = f.matching("name", NAME_RE,
                      "{value!r} must be lower-case letters, digits, '.', '_' or '-'", max_len=64)
    version = f.str("version", max_len=128)
    try:
        parse_version(version)
    except SchemaError as exc:
        raise f.bad("version", str(exc)) from exc
    return schema, name, version


def _read_signature(f: Fields
                    ) -> tuple[tuple[FeatureSpec, ...], tuple[OutputSpec, ...], tuple[Label, ...]]:
    """The model's inputs (at least one, unique names), outputs and classes."""
    inputs = tuple(FeatureSpec.from_dict(o, f"manifest.inputs[{i}]")
                   for i, o in enumerate(f.list("inputs", max_len=MAX_FEATURES)))
    if not inputs:
        raise f.bad("inputs", "a model needs at least one input feature")
    names = [s.name for s in inputs]
    if len(set(names)) != len(names):
        raise f.bad("inputs", "feature names must be unique")
    outputs = tuple(OutputSpec.from_dict(o, f"manifest.outputs[{i}]")
                    for i, o in enumerate(f.list("outputs", max_len=16)))
    classes = f.list("classes", max_len=MAX_CATEGORIES)
    if not all(isinstance(c, (str, int)) and not isinstance(c, bool) for c in classes):
        raise f.bad("classes", "class labels must be strings or integers")
    return inputs, outputs, tuple(classes)


def _read_files(f: Fields) -> tuple[FileEntry, ...]:
    """The listed members, sorted: unique paths, never the manifest or the signatures."""
    files = tuple(FileEntry.from_dict(o, f"manifest.files[{i}]")
                  for i, o in enumerate(f.list("files", max_len=64)))
    paths = [e.path for e in files]
    if len(set(paths)) != len(paths):
        raise f.bad("files", "file paths must be unique")
    if {"manifest.json", "signatures.json"} & set(paths):
        raise f.bad("files", "manifest.json and signatures.json are not listed in files")
    return tuple(sorted(files))


def _read_metrics(f: Fields) -> dict[str, float]:
    metrics = f.mapping("metrics")
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise f.bad("metrics", f"metric {k!r} is not a number")
    return {k: float(v) for k, v in metrics.items()}


def _optional(f: Fields, key: str) -> Any:
    """An optional section: absent is None; null is refused (absent keeps old manifests'
    signed bytes, so there is one way to say "none")."""
    raw = f.raw(key, None)
    if raw is None and f.has(key):
        raise f.bad(key, "leave the field out rather than null")
    return raw
