"""A verified bundle, loaded and ready to serve: session, schema checks, bins, smoke test.

:class:`LoadedModel` is what the agent holds for its live model and for a shadow
candidate. It is built only from a :class:`~edgefleet.contract.bundle.VerifiedBundle`, so nothing
here is ever parsed from bytes whose signature did not check out.

Running is split in two so the request path stays short: :meth:`LoadedModel.run_cells`
takes rows that :class:`~edgefleet.contract.inputs.InputValidator` checked and returns the raw
output arrays (no copies, no per-row Python), :meth:`LoadedModel.run_matrix` does the same
for a checked array. Turning outputs into profile columns (:meth:`profile_outputs`) is
left to the profiling worker, off the request path.

This module does not record, profile or decide what to install.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from operator import itemgetter
from typing import Any, NamedTuple

import numpy as np

from edge_agent.errors import LoadError, PredictError
from edgefleet.contract.bundle import VerifiedBundle
from edgefleet.contract.errors import SchemaError
from edgefleet.contract.inputs import Batch, Cell, InputValidator
from edgefleet.contract.messages import BundleRef
from edgefleet.contract.profile import parse_reference
from edgefleet.contract.runtime import _NP, ModelRunner
from edgefleet.contract.samples import Samples, smoke_test

__all__ = ["LoadError", "LoadedModel", "Outputs", "PredictError", "concat_outputs"]


_new_tuple = tuple.__new__  # a NamedTuple from a tuple, without its Python __new__


class Outputs(NamedTuple):
    """Raw model outputs for a batch: numpy arrays as onnxruntime returned them."""

    labels: np.ndarray | None  # (n,)
    probabilities: np.ndarray | None  # (n, classes)
    values: np.ndarray | None  # (n,) or (n, 1)


class LoadedModel:
    """One bundle's model, schema and reference, loaded into an onnxruntime session.

    Args:
        bundle: a bundle that passed :func:`~edgefleet.contract.bundle.verify_bundle`.
        intra_op_threads: onnxruntime threads per operator (1 suits single rows).
        max_rows: most rows one call may carry.

    Raises:
        LoadError: the model does not load in onnxruntime, or reference.json or
            samples.json is malformed (named).
    """

    def __init__(self, bundle: VerifiedBundle, *, intra_op_threads: int = 1,
                 max_rows: int = 10_000) -> None:
        manifest = bundle.manifest
        self.manifest = manifest
        self.ref = BundleRef(manifest.name, manifest.version, bundle.sha256)
        self.label = self.ref.label
        try:
            self.spec, self.reference = parse_reference(bundle.member("reference.json"))
            self.samples = (Samples.from_bytes(bundle.member("samples.json"))
                            if manifest.file("samples.json") else None)
        except (SchemaError, KeyError) as exc:
            raise LoadError(f"{self.label}: {exc}") from exc
        if self.spec.reference_hash != manifest.reference_hash:
            raise LoadError(f"{self.label}: reference.json is not the reference the manifest "
                            "names (reference_hash differs)")
        # from its file when the bundle was verified into a directory: the model is read
        # once, by onnxruntime, never held as a second copy in Python
        source = (bundle.member("model.onnx") if bundle.directory is None
                  else str(bundle.path("model.onnx")))
        try:
            self.runner = ModelRunner(manifest, source, intra_op_threads=intra_op_threads)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise LoadError(f"{self.label}: model.onnx does not load in onnxruntime: "
                            f"{type(exc).__name__}: {str(exc)[:300]}") from exc
        self.validator = InputValidator(manifest, max_rows=max_rows)
        self.task = manifest.task
        self.classes = manifest.classes
        self._session_run = _direct_run(self.runner.session)
        # fast path: one float tensor in schema order, outputs by role
        self._tensor = manifest.binding.layout == "tensor"
        self._input_name = manifest.binding.input_name
        self._dtype = _NP[manifest.binding.dtype]
        roles = [(o.role, o.name) for o in manifest.outputs
                 if o.role in ("label", "probabilities", "value")]
        self._names = [name for _, name in roles]
        where = {role: i for i, (role, _) in enumerate(roles)}
        # the run's result list, with a None appended, read into Outputs in one C call
        self._pick = itemgetter(*(where.get(r, len(roles))
                                  for r in ("label", "probabilities", "value")))
        self._local = threading.local()  # this thread's row filler (see run_row)

    # -- running ---------------------------------------------------------------------

    def run_cells(self, cells: list[list[Cell]]) -> Outputs:
        """Run checked rows (from :meth:`InputValidator.row`).

        Raises:
            PredictError: onnxruntime failed on these rows.
        """
        if len(cells) == 1:
            return self.run_row(cells[0])
        if self._tensor:
            return self._run({self._input_name: np.array(cells, dtype=self._dtype)})
        return self.run_batch(self.validator.from_cells(cells))

    def run_row(self, cells: list[Cell]) -> Outputs:
        """Run one checked row (from :meth:`InputValidator.row`): the lean path, this
        thread's feed arrays rewritten in place (see
        :meth:`~edgefleet.contract.runtime.ModelRunner.row_feeds`), no array made.

        Raises:
            PredictError: the row does not fit the model's inputs, or onnxruntime failed.
        """
        try:
            fill = self._local.fill
        except AttributeError:  # this thread's first row
            fill = self._local.fill = self.runner.row_filler()
        try:
            feeds = fill(cells)
        except (ValueError, TypeError, OverflowError) as exc:  # e.g. NaN into int64
            raise PredictError(f"{self.label}: the row does not fit the model's inputs: "
                               f"{type(exc).__name__}: {str(exc)[:300]}") from exc
        try:  # (_run inlined: one frame less on the request path)
            results = self._session_run(self._names, feeds, None)
        except Exception as exc:
            raise PredictError(f"{self.label}: the model failed: {type(exc).__name__}: "
                               f"{str(exc)[:300]}") from exc
        results.append(None)
        return _new_tuple(Outputs, self._pick(results))

    def run_matrix(self, matrix: np.ndarray) -> Outputs:
        """Run a checked ``(n, F)`` float array in schema order."""
        if self._tensor:
            return self._run({self._input_name: matrix.astype(self._dtype, copy=False)})
        return self.run_batch(Batch(len(matrix), {
            n: matrix[:, j] for j, n in enumerate(self.validator.names)}, matrix))

    def run_batch(self, batch: Batch) -> Outputs:
        """Run a checked :class:`~edgefleet.contract.inputs.Batch` (any layout)."""
        if self._tensor and batch.matrix is not None:
            return self.run_matrix(batch.matrix)
        return self._run(self.runner.checked_feeds(batch.columns))

    def _run(self, feeds: dict[str, np.ndarray]) -> Outputs:
        try:
            results = self._session_run(self._names, feeds, None)
        except Exception as exc:
            raise PredictError(f"{self.label}: the model failed: {type(exc).__name__}: "
                               f"{str(exc)[:300]}") from exc
        results.append(None)  # what a role the model lacks reads
        return _new_tuple(Outputs, self._pick(results))

    # -- what the profile and the shadow need -----------------------------------------

    def profile_outputs(self, outputs: Outputs) -> dict[str, np.ndarray]:
        """The output columns the profile spec names (``class``, ``confidence``, ``value``)."""
        cols: dict[str, np.ndarray] = {}
        if outputs.labels is not None:
            # raw labels: the categorical profile turns only the distinct values into text
            cols["class"] = np.asarray(outputs.labels).reshape(-1)
        if outputs.probabilities is not None:
            cols["confidence"] = np.asarray(outputs.probabilities, dtype=np.float64).max(axis=1)
        if outputs.values is not None:
            cols["value"] = np.asarray(outputs.values, dtype=np.float64).reshape(-1)
        return cols

    def smoke_test(self) -> list[str]:
        """Run the bundle's own sample rows; what differs (empty: the bundle behaves)."""
        if self.samples is None:
            return ["the bundle carries no samples.json to smoke-test with"]
        try:
            return smoke_test(self.runner, self.samples)
        except Exception as exc:  # a model that cannot even run its samples fails the test
            return [f"running the samples failed: {type(exc).__name__}: {str(exc)[:200]}"]

    def __repr__(self) -> str:
        return f"LoadedModel({self.label}, sha256={self.ref.sha256[:12]}…)"


def _direct_run(session: Any) -> Callable[..., list[Any]]:
    """The session's compiled ``run(output_names, feeds, run_options)``, past
    ``InferenceSession.run``'s Python checks: that every graph input is fed, that no
    ``OrtValue`` belongs to another device, that no WebGPU graph capture is on. The agent
    always feeds every input as a numpy array it built from the manifest, to a CPU-only
    session, and onnxruntime's C++ run still refuses a missing or mistyped input. Those
    checks cost about 4 µs a call (measured, 5 inputs): as much as all the rest the agent
    adds to a single row. Falls back to the public ``run`` when the binding is not there."""
    inner = getattr(session, "_sess", None)
    run = getattr(inner, "run", None)
    return run if callable(run) else session.run


def concat_outputs(parts: list[Outputs]) -> Outputs:
    """One :class:`Outputs` from several (the profiling worker's chunks)."""
    if len(parts) == 1:
        return parts[0]

    def cat(i: int) -> np.ndarray | None:
        arrays = [p[i] for p in parts]
        return None if arrays[0] is None else np.concatenate(arrays, axis=0)

    return Outputs(cat(0), cat(1), cat(2))
