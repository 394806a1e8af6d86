"""Run a bundle's ONNX model: rows in, labels / probabilities / values out.

The manifest's :class:`~edgefleet.contract.manifest.Binding` says how to feed the graph, and
its outputs say which ONNX output is which. The packager's fidelity gate runs models
through this same class, so what was checked at build time is what the device runs.

This module does not validate rows against the schema (see :mod:`edgefleet.contract.inputs`
in the agent) and does not profile; it only converts columns to tensors and runs.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from edgefleet.contract.errors import InputError
from edgefleet.contract.inputs import Cell
from edgefleet.contract.manifest import Manifest

__all__ = ["ModelRunner", "Prediction"]

_NP = {"float32": np.float32, "float64": np.float64, "int64": np.int64, "string": object}
_ORT_NP = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(int64)": np.int64,
           "tensor(int32)": np.int32, "tensor(string)": object, "tensor(float16)": np.float16}
_STRUCT = {np.float32: "f", np.float64: "d"}  # inputs written with struct / memoryview


@dataclass(frozen=True)
class Prediction:
    labels: np.ndarray | None = None  # (n,) class labels, classifiers
    probabilities: np.ndarray | None = None  # (n, classes), classifiers with probabilities
    values: np.ndarray | None = None  # (n,) regressors

    def __len__(self) -> int:
        for arr in (self.labels, self.values, self.probabilities):
            if arr is not None:
                return len(arr)
        return 0

    def profile_outputs(self) -> dict[str, np.ndarray]:
        """The outputs as the profile spec names them (``class``, ``confidence``, ``value``)."""
        out: dict[str, np.ndarray] = {}
        if self.labels is not None:
            out["class"] = self.labels.astype(str)
        if self.probabilities is not None:
            out["confidence"] = self.probabilities.max(axis=1)
        if self.values is not None:
            out["value"] = self.values
        return out


def session_options(intra_op_threads: int = 1) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    # A device runs one model for small requests: one thread per op avoids the
    # spin-waiting thread pool that costs more than it saves on single rows.
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return opts


class ModelRunner:
    """An onnxruntime session bound to a manifest."""

    def __init__(self, manifest: Manifest, model: bytes | str, *,
                 intra_op_threads: int = 1) -> None:
        """``model``: the ONNX bytes, or the path of a verified ``model.onnx`` file."""
        self.manifest = manifest
        self.session = ort.InferenceSession(
            model, sess_options=session_options(intra_op_threads),
            providers=["CPUExecutionProvider"])
        self._label = manifest.output("label")
        self._proba = manifest.output("probabilities")
        self._value = manifest.output("value")
        names = [o.name for o in (self._label, self._proba, self._value) if o is not None]
        self._output_names = names
        binding = manifest.binding
        self._tensor_dtype = _NP[binding.dtype]
        # columns layout: feed each input as the graph declares it (a model can take an
        # int64 feature as float)
        self._feed_dtypes = {i.name: _ORT_NP.get(i.type, np.float32)
                             for i in self.session.get_inputs()}
        self._columns_layout = binding.layout == "columns"
        self._local = threading.local()  # per-thread single-row feeds (row_feeds)
        # per feature, in schema order: (name, feed dtype, categorical, missing allowed)
        self.feed_plan = tuple(
            (spec.name, self._feed_dtypes.get(spec.name, np.float32)
             if self._columns_layout else self._tensor_dtype,
             spec.kind == "categorical", spec.missing_allowed)
            for spec in manifest.inputs)

    def run_matrix(self, matrix: np.ndarray) -> Prediction:
        """Run a 2-D numeric array in schema order (tensor layout only)."""
        if self._columns_layout:
            names = [s.name for s in self.manifest.inputs]
            return self.run_columns({n: matrix[:, i] for i, n in enumerate(names)})
        x = np.ascontiguousarray(matrix, dtype=self._tensor_dtype)
        return self._run({self.manifest.binding.input_name: x})

    def run_columns(self, columns: Mapping[str, np.ndarray]) -> Prediction:
        """Run columns keyed by feature name.

        Raises:
            InputError: a feature is missing from ``columns``.
        """
        for spec in self.manifest.inputs:
            if spec.name not in columns:
                raise InputError(f"feature {spec.name!r} is missing", feature=spec.name)
        if not self._columns_layout:
            x = np.column_stack(
                [np.asarray(columns[s.name], dtype=self._tensor_dtype)
                 for s in self.manifest.inputs])
            return self._run({self.manifest.binding.input_name: x})
        feeds = {}
        for spec in self.manifest.inputs:
            col = np.asarray(columns[spec.name])
            dtype = self._feed_dtypes.get(spec.name, np.float32)
            if dtype is object:
                col = np.array([("" if v is None else str(v)) for v in col.tolist()],
                               dtype=object)
            else:
                col = col.astype(dtype, copy=False)
            feeds[spec.name] = col.reshape(-1, 1)
        return self._run(feeds)

    def checked_feeds(self, columns: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The session's feeds from columns that the agent's schema check produced
        (numeric float64 with NaN, categorical object arrays of str with None): one numpy
        call per feature, no per-cell Python beyond replacing a missing category by ``""``.
        """
        if not self._columns_layout:
            x = np.column_stack([columns[name] for name, *_ in self.feed_plan])
            return {self.manifest.binding.input_name: x.astype(self._tensor_dtype, copy=False)}
        feeds = {}
        for name, dtype, categorical, missing_ok in self.feed_plan:
            col = columns[name]
            if categorical:
                if missing_ok:
                    missing = np.equal(col, None)
                    if missing.any():
                        col = col.copy()
                        col[missing] = ""
            else:
                col = col.astype(dtype, copy=False)
            feeds[name] = col.reshape(-1, 1)
        return feeds

    def row_feeds(self, cells: list[Cell]) -> dict[str, np.ndarray]:
        """The session's feeds for one checked row (either layout).

        The arrays are this thread's own, allocated once and overwritten on every call:
        onnxruntime copies its inputs before ``run`` returns, and a thread runs one call
        at a time. The returned dict is valid until this thread's next call.

        Raises:
            ValueError: a cell does not fit its input (NaN into an int64 input).
        """
        try:
            fill = self._local.fill
        except AttributeError:
            fill = self._local.fill = self.row_filler()
        return fill(cells)

    def row_filler(self) -> Callable[[list[Cell]], dict[str, np.ndarray]]:
        """A function that writes one row into feed arrays of its own (for one thread:
        :meth:`row_feeds` keeps one per thread, as the agent does): no array made
        per call, and no numpy indexing where a float input takes a float (a memoryview
        store is a fifth of ``a[0, 0] = v``; one ``struct.pack_into`` fills a whole
        float tensor, a half of ``np.array(cells)``)."""
        if not self._columns_layout:
            dtype = self._tensor_dtype
            buf = np.empty((1, len(self.feed_plan)), dtype=dtype)
            tensor = {self.manifest.binding.input_name: buf}
            if dtype not in _STRUCT:
                def fill_tensor(cells: list[Cell]) -> dict[str, np.ndarray]:
                    buf[0] = cells
                    return tensor
                return fill_tensor
            pack = struct.Struct(f"={len(self.feed_plan)}{_STRUCT[dtype]}").pack_into

            def pack_tensor(cells: list[Cell]) -> dict[str, np.ndarray]:
                try:
                    pack(buf, 0, *cells)
                except (struct.error, OverflowError):  # the numpy cast decides
                    buf[0] = cells
                return tensor
            return pack_tensor
        feeds: dict[str, np.ndarray] = {}
        targets: list[tuple[Any, bool]] = []
        for name, dtype, categorical, _ in self.feed_plan:
            arr = feeds[name] = np.empty((1, 1), dtype=dtype)
            code = _STRUCT.get(dtype)
            targets.append((arr.reshape(-1) if categorical or code is None
                            else memoryview(arr).cast("B").cast(code), categorical))

        def fill_columns(cells: list[Cell]) -> dict[str, np.ndarray]:
            for (target, categorical), v in zip(targets, cells, strict=True):
                target[0] = ("" if v is None else v) if categorical else v
            return feeds
        return fill_columns

    def _run(self, feeds: dict[str, np.ndarray]) -> Prediction:
        results = dict(zip(self._output_names, self.session.run(self._output_names, feeds),
                           strict=True))
        labels = probs = values = None
        if self._label is not None:
            labels = np.asarray(results[self._label.name]).reshape(-1)
        if self._proba is not None:
            probs = np.asarray(results[self._proba.name], dtype=np.float64)
        if self._value is not None:
            values = np.asarray(results[self._value.name], dtype=np.float64).reshape(-1)
        return Prediction(labels, probs, values)
