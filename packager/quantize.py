"""Quantise a converted ONNX model for the device, and report honestly what happened.

Four modes, as the manifest names them (:data:`edgefleet.contract.manifest.QUANT_MODES`):

- ``none``: the model ships as converted.
- ``dynamic``: int8 weights; activations are quantised at run time
  (onnxruntime ``quantize_dynamic``, QOperator kernels such as ``MatMulInteger``).
- ``static``: int8 weights and activations in QDQ form (``QuantizeLinear`` /
  ``DequantizeLinear`` pairs around float ops), activation ranges calibrated (MinMax)
  on rows the caller gives.
- ``fp16``: weights and activations in float16 in the graph; graph inputs and outputs
  stay float32. Where onnxruntime's CPU provider has no float16 kernel (an x86 build
  machine with onnxruntime 1.32 has none for ``MatMul``) it widens the weights to float32
  at load: half the bytes, float16-rounded weights, no speed-up; the note says so. The
  float model's values on the calibration rows must stay within float16's range, since
  a device that does compute in float16 would turn them into inf.

Only weight-bearing operators are touched: ``MatMul``, ``Gemm`` and ``Conv`` (the
layers of MLPs and CNNs). Elementwise ops stay in float32 -- wrapping them adds error
and size for no gain on a CPU. Graphs made only of ``ai.onnx.ml`` operators (tree
ensembles, and scikit-learn's linear models, which skl2onnx writes as
``LinearClassifier`` / ``LinearRegressor``) have nothing to quantise: they are returned
byte for byte unchanged with ``applied=False`` and a note naming their operators. A model
is never called quantised unless an operator in the result computes in reduced precision.

``keep_first_float`` leaves the first weight-bearing layer in float32: the one fed by a
graph input directly or through ops that only cast, reshape or scale it with constants
(``Cast``, ``Scaler``, ``Normalizer``, ``Reshape``, ``Add``/``Mul`` by an initializer,
...). Raw features of very different magnitudes (breast-cancer areas in the thousands
beside ratios near 0.01) share one per-tensor int8 scale there, and the small ones
vanish; later layers see activations on one scale.

Before quantising, duplicate ``opset_import`` entries are merged (:func:`repair_opsets`;
skl2onnx writes the default domain twice for ``ai.onnx.ml``-only graphs, and
onnxruntime's quantiser refuses those with "Failed to find proper ai.onnx domain"), and
``quant_pre_process`` runs ONNX shape inference. Its graph optimisation step is skipped on
purpose: it fuses ``MatMul`` + ``Add`` into ``Gemm``, stamps nine onnxruntime-internal
opset domains into the model and, in onnxruntime 1.32, fails on some scikit-learn graphs
(a ``Scaler`` input loses its type); the device's onnxruntime optimises at load anyway.
Symbolic shape inference is skipped too: it fails on ``ai.onnx.ml`` operators.

The float16 converter is onnxruntime's own copy
(``onnxruntime.transformers.float16``), the same code as onnxconverter-common's but
without another dependency (onnxconverter-common is not a dependency of skl2onnx 1.20 and
has pinned old protobuf releases).

Same input bytes and options give the same output bytes.

This module does not judge accuracy: the fidelity gate compares the returned model with
the original estimator. It reads and writes no files outside a private temporary
directory.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import numpy as np
import onnx

from edgefleet.contract.manifest import QUANT_MODES, Quantization
from packager.errors import QuantizationError
from packager.graph import (
    DEFAULT_DOMAINS,
    QUANTIZED_KERNELS,
    WEIGHT_OPS,
    check_feeds,
    check_kept,
    count_quantized,
    first_layer,
    first_line,
    is_weight_op,
    listing,
    load_session,
    name_nodes,
    reduced_nodes,
    root_logger_untouched,
)

__all__ = ["QUANTIZED_KERNELS", "WEIGHT_OPS", "quantize", "repair_opsets"]

"""The operators quantisation is asked to touch."""

"""onnxruntime's integer kernels that replace a weight-bearing operator (QOperator form)."""

_MAX_CHECK_FEEDS = 8


def repair_opsets(model: onnx.ModelProto) -> onnx.ModelProto:
    """Merge duplicate ``opset_import`` entries: one per domain, at its highest version.

    ``""`` and ``"ai.onnx"`` name the same domain and are merged into ``""``. Entries are
    written in a fixed order (default domain first, then by name) so the result is
    deterministic. The model given is not modified.
    """
    versions: dict[str, int] = {}
    for entry in model.opset_import:
        domain = "" if entry.domain in DEFAULT_DOMAINS else entry.domain
        versions[domain] = max(versions.get(domain, 0), entry.version)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.opset_import[:]
    for domain in sorted(versions, key=lambda d: (d != "", d)):
        out.opset_import.append(onnx.helper.make_opsetid(domain, versions[domain]))
    return out


# Over 60 lines only by its docstring (41 lines: what counts as a quantised op in each
# mode, which a caller needs); its code is 20 lines, each step a named helper.
def quantize(
    model: bytes,
    mode: str,
    *,
    calibration: Iterable[Mapping[str, np.ndarray]] | None = None,
    keep_first_float: bool = True,
) -> tuple[bytes, Quantization]:
    """Quantise ``model`` as ``mode`` asks; return the model bytes to ship and the report.

    ``Quantization.quantized_ops`` counts the weight-bearing operators that compute in
    reduced precision in the returned model:

    - ``dynamic``: the integer kernels of :data:`QUANTIZED_KERNELS` (``MatMulInteger``,
      ``ConvInteger``, ...) -- one per quantised ``MatMul``/``Conv``/``Gemm``;
    - ``static`` (QDQ): the ``MatMul``/``Gemm``/``Conv`` nodes whose weight input (input 1)
      comes out of a ``DequantizeLinear`` -- each one float op wrapped by Q/DQ pairs;
    - ``fp16``: the ``MatMul``/``Gemm``/``Conv`` nodes whose inputs are float16.

    The helper nodes (``DynamicQuantizeLinear``, ``QuantizeLinear``, ``DequantizeLinear``,
    ``Cast``) and elementwise ops are never counted, even when they run in reduced
    precision. ``applied`` is ``quantized_ops > 0``; when it is false the ORIGINAL bytes are
    returned unchanged and ``note`` says why. ``float_ops_kept`` names the weight-bearing
    nodes left in float32 by ``keep_first_float`` (checked in the result, not assumed).

    ``none`` and every ``applied=False`` outcome return ``model`` itself (same bytes).

    Args:
        model: a serialised ONNX model.
        mode: ``none``, ``dynamic``, ``static`` or ``fp16``.
        calibration: feed dicts (graph input name -> array), each one batch. Needed by
            ``static``; ``fp16`` checks (up to eight of) them: the result's outputs stay
            finite where the original's are, and no tensor computed in float16 leaves its
            range. ``dynamic`` and ``none`` ignore it.
        keep_first_float: leave the first weight-bearing layer in float32 (see the module
            docstring).

    Raises:
        QuantizationError: unknown mode, unreadable model, ``static`` without calibration
            rows, or onnxruntime failing to quantise or to load the result.
    """
    if mode not in QUANT_MODES:
        raise QuantizationError(
            f"unknown quantisation mode {mode!r}; use one of {', '.join(QUANT_MODES)}"
        )
    feeds = check_feeds(calibration, required=mode == "static")
    proto = _parse(model)
    if mode == "none":
        # nothing to do: the caller already holds a graph that loads (convert checked it)
        return model, Quantization(mode="none", note="not quantised (mode none)")
    # protobuf parses many a byte string as some model: only onnxruntime's word counts, and
    # every path below that ships these bytes unchanged relies on this check
    load_session(model, "the model to quantise")

    proto = repair_opsets(proto)
    name_nodes(proto)
    kept, path, why_not = _layers(proto, keep_first_float)
    if why_not:
        return model, Quantization(mode=mode, float_ops_kept=kept, note=why_not)
    out, note = _reduce(proto, mode, kept, path, feeds)
    if out is None:
        return model, Quantization(mode=mode, note=note)
    return _ship(model, proto, out, mode, kept, note)


def _parse(model: bytes) -> onnx.ModelProto:
    try:
        return onnx.load_from_string(model)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise QuantizationError(
            f"the model is not a readable ONNX file: {first_line(exc)}"
        ) from exc


def _ship(model: bytes, proto: onnx.ModelProto, out: onnx.ModelProto, mode: str,
          kept: tuple[str, ...], note: str) -> tuple[bytes, Quantization]:
    """The reduced model's bytes and report, once onnxruntime loads it; the original
    ``model`` when onnxruntime quantised no weight-bearing operator after all."""
    count = count_quantized(out, mode)
    check_kept(out, kept, mode)
    if count == 0:
        return model, Quantization(
            mode=mode,
            note=f"onnxruntime left every weight-bearing operator in float "
            f"({listing(sorted({n.op_type for n in proto.graph.node if is_weight_op(n)}))}); "
            "shipped in float",
        )
    # Inferred shapes are a cache onnxruntime rebuilds at load; they only cost bytes.
    del out.graph.value_info[:]
    data = out.SerializeToString()
    load_session(data, f"the {mode} model")
    if kept:
        note += f"; kept in float: {listing(kept)}"
    return data, Quantization(
        mode=mode, applied=True, quantized_ops=count, float_ops_kept=kept, note=note
    )


def _layers(proto: onnx.ModelProto, keep_first_float: bool
            ) -> tuple[tuple[str, ...], tuple[str, ...], str]:
    """The weight-bearing nodes kept in float (and the path to them), or why nothing is
    left to quantise (then the caller ships the float graph)."""
    candidates = [n.name for n in proto.graph.node if is_weight_op(n)]
    if not candidates:
        ops = listing(sorted({n.op_type for n in proto.graph.node})) or "no operators"
        return (), (), (f"nothing quantisable in this graph ({ops}; only MatMul, Gemm and "
                        "Conv are); shipped in float")
    kept, path = first_layer(proto) if keep_first_float else ((), ())
    if set(candidates) <= set(kept):
        return kept, path, (f"the only weight-bearing layer ({listing(kept)}) is kept in "
                            "float by keep_first_float; shipped in float")
    return kept, path, ""


def _reduce(proto: onnx.ModelProto, mode: str, kept: tuple[str, ...], path: tuple[str, ...],
            feeds: list) -> tuple[onnx.ModelProto | None, str]:
    """The reduced-precision graph of ``mode`` and its note (None and why: shipped float)."""
    if mode == "fp16":
        with root_logger_untouched():
            # the ops on the way to the kept layer stay float32 too: in float16 they would
            # round the raw features the kept layer is there to see exactly
            return _fp16(proto, kept + path, feeds)
    with TemporaryDirectory(prefix="edgepack-quant-") as tmp, root_logger_untouched():
        src = _pre_process(proto, Path(tmp))
        out = _quantize_int8(src, mode, kept, feeds, Path(tmp))
    return out, ("int8 weights, activations quantised at run time" if mode == "dynamic"
                 else f"int8 QDQ, activation ranges calibrated on {len(feeds)} batch(es)")


# ---------------------------------------------------------------------------- int8


def _pre_process(proto: onnx.ModelProto, tmp: Path) -> Path:
    from onnxruntime.quantization import quant_pre_process

    src, pre = tmp / "source.onnx", tmp / "pre.onnx"
    onnx.save_model(proto, src)
    try:
        quant_pre_process(str(src), str(pre), skip_optimization=True, skip_symbolic_shape=True)
    except Exception as exc:
        raise QuantizationError(
            f"shape inference before quantisation failed: {first_line(exc)}"
        ) from exc
    return pre


def _quantize_int8(
    src: Path, mode: str, kept: tuple[str, ...], feeds: list[dict[str, np.ndarray]], tmp: Path
) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantFormat, quantize_dynamic, quantize_static

    dst = tmp / f"{mode}.onnx"
    common: dict[str, Any] = {
        "op_types_to_quantize": sorted(WEIGHT_OPS),
        # quantize_dynamic rewrites Gemm as MatMul "<name>_MatMul" + Add before it
        # looks at exclusions; name both so the kept layer really stays float
        "nodes_to_exclude": [*kept, *(f"{k}_MatMul" for k in kept)],
        # ai.onnx.ml outputs (Scaler, ...) may have no inferred type; they are float.
        "extra_options": {"DefaultTensorType": onnx.TensorProto.FLOAT},
    }
    try:
        if mode == "dynamic":
            quantize_dynamic(str(src), str(dst), **common)
        else:
            quantize_static(
                str(src), str(dst), _Reader(feeds), quant_format=QuantFormat.QDQ, **common
            )
        return onnx.load_model(str(dst))
    except QuantizationError:
        raise
    except Exception as exc:
        raise QuantizationError(
            f"onnxruntime {mode} quantisation failed: {first_line(exc)}"
        ) from exc


class _Reader:
    """A CalibrationDataReader over feed dicts (onnxruntime checks for ``get_next`` only)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds = feeds
        self._i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._i >= len(self.feeds):
            return None
        self._i += 1
        return self.feeds[self._i - 1]

    def rewind(self) -> None:
        self._i = 0

    def __len__(self) -> int:
        return len(self.feeds)


# ---------------------------------------------------------------------------- fp16


def _fp16(
    proto: onnx.ModelProto, keep: tuple[str, ...], feeds: list[dict[str, np.ndarray]]
) -> tuple[onnx.ModelProto | None, str]:
    """Convert to float16; ``None`` and why when the result is unusable on onnxruntime CPU."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    # ai.onnx.ml operators (and the converter's own list) have no float16 kernels at all
    blocked = set(DEFAULT_OP_BLOCK_LIST) | {
        n.op_type for n in proto.graph.node if n.domain not in DEFAULT_DOMAINS
    }
    try:
        out = convert_float_to_float16(
            proto, keep_io_types=True, op_block_list=sorted(blocked), node_block_list=list(keep)
        )
    except Exception as exc:
        raise QuantizationError(f"float16 conversion failed: {first_line(exc)}") from exc
    _drop_cast_round_trips(out)
    _sort_topologically(out)
    count = count_quantized(out, "fp16")
    if count == 0:
        return None, "no weight-bearing operator converts to float16; shipped in float"
    data = out.SerializeToString()
    try:
        session = load_session(data, "the fp16 model", wrap=False)
    except Exception as exc:
        why = first_line(exc)
        return None, f"the float16 model does not load in onnxruntime CPU ({why}); shipped in float"
    bad = _fp16_nonfinite(proto, session, feeds) or _fp16_out_of_range(proto, out, feeds)
    if bad:
        return None, f"float16 {bad}; shipped in float"
    here = _fp16_kernels_here(data)
    note = "float16 weights and activations in the graph, float32 inputs and outputs"
    if not feeds:
        note += "; float16 range not checked (no calibration rows)"
    if here < count:
        note += (
            f"; onnxruntime on this machine's CPU computes {count - here} of {count} in float32 "
            "(no float16 kernel: it widens the weights at load)"
        )
    return out, note


def _fp16_kernels_here(data: bytes) -> int:
    """How many weight-bearing ops still compute in float16 after onnxruntime's CPU
    provider has placed its kernels: where it has none it inserts casts to float32."""
    import onnxruntime as ort

    with TemporaryDirectory(prefix="edgepack-fp16-") as tmp:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.optimized_model_filepath = str(Path(tmp) / "placed.onnx")
        try:
            ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
            placed = onnx.load_model(options.optimized_model_filepath)
        except Exception:  # only a note depends on it; the model loaded above
            return 0
    return len(reduced_nodes(placed, "fp16"))


def _drop_cast_round_trips(proto: onnx.ModelProto) -> None:
    """Feed float32 consumers the float32 tensor itself, not its float16 round trip.

    With ``keep_io_types`` the converter casts every graph input to float16 and casts it
    back in front of each node it left in float32 (the kept first layer, a ``Scaler``): a
    lossy identity on raw features. A ``Cast`` to float32 whose input is a chain of
    float-to-float ``Cast`` nodes starting from a float32 tensor is bypassed; the nodes
    left without consumers are removed.
    """
    graph = proto.graph
    float32, float16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info]}
    producer: dict[str, onnx.NodeProto] = {}
    for node in graph.node:
        for out in node.output:
            producer[out] = node
        if node.op_type == "Cast" and node.domain in DEFAULT_DOMAINS:
            types[node.output[0]] = _cast_to(node)
    outputs = {o.name for o in graph.output}
    replace: dict[str, str] = {}
    for node in graph.node:
        if node.op_type != "Cast" or _cast_to(node) != float32 or node.output[0] in outputs:
            continue
        src, origin = node.input[0], None
        while (
            (p := producer.get(src)) is not None
            and p.op_type == "Cast"
            and _cast_to(p) in (float32, float16)
            and types.get(p.input[0]) in (float32, float16)
        ):
            src = p.input[0]
            if types[src] == float32:
                origin = src
        if origin is not None:
            replace[node.output[0]] = origin
    if not replace:
        return
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in replace:
                node.input[i] = replace[name]
    while True:  # drop nodes nobody reads any more
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if n.op_type == "Cast" and not set(n.output) & used]
        if not dead:
            return
        for node in dead:
            graph.node.remove(node)


def _cast_to(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "to"), 0)


def _sort_topologically(proto: onnx.ModelProto) -> None:
    """Order nodes so each comes after its inputs' producers, keeping the given order
    where it already is (the float16 converter appends its casts at the end)."""
    nodes = list(proto.graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    waits = [
        {producer[x] for x in n.input if x in producer and producer[x] != i}
        for i, n in enumerate(nodes)
    ]
    blocks: dict[int, list[int]] = {}
    for i, deps in enumerate(waits):
        for d in deps:
            blocks.setdefault(d, []).append(i)
    ready = [i for i, deps in enumerate(waits) if not deps]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for j in blocks.get(i, ()):
            waits[j].discard(i)
            if not waits[j]:
                heapq.heappush(ready, j)
    if len(order) != len(nodes):
        raise QuantizationError("the float16 graph has a cycle; cannot order its nodes")
    del proto.graph.node[:]
    proto.graph.node.extend(nodes[i] for i in order)


def _fp16_nonfinite(
    proto: onnx.ModelProto, session: Any, feeds: list[dict[str, np.ndarray]]
) -> str:
    """Why the fp16 model is unusable on these feeds (non-finite where float is not), or ''."""
    reference = load_session(proto.SerializeToString(), "the model")
    checks = [(f"calibration batch {i}", f) for i, f in enumerate(feeds[:_MAX_CHECK_FEEDS])]
    for what, feed in checks or [("", _dummy_feed(session))]:
        try:
            want = reference.run(None, feed)
        except Exception as exc:
            if not what:  # zeros need not be a valid input (categories): nothing to judge
                return ""
            raise QuantizationError(
                f"{what} does not run on the model: {first_line(exc)}"
            ) from exc
        try:
            got = session.run(None, feed)
        except Exception as exc:
            return f"model fails to run: {first_line(exc)}"
        for g, w in zip(got, want, strict=True):
            g, w = np.asarray(g), np.asarray(w)
            if g.dtype.kind == "f" and np.any(~np.isfinite(g) & np.isfinite(w)):
                return "overflows (non-finite outputs where float32 is finite)"
    return ""


def _fp16_out_of_range(
    proto: onnx.ModelProto, out: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]
) -> str:
    """Which tensor the float16 graph computes past +-65504 on the calibration rows, or ''.

    A device with float16 kernels turns such a value into inf; a CPU without them (this
    build machine, perhaps) widens to float32 and never shows it. So the float model runs
    with those tensors exposed as outputs, and their values are checked.
    """
    if not feeds:
        return ""
    try:
        inferred = onnx.shape_inference.infer_shapes(out)
    except Exception:  # no types, nothing to watch; the run check above still applies
        return ""
    half = {
        v.name
        for v in [*inferred.graph.value_info, *inferred.graph.output]
        if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    }
    converted = {n.name: n for n in out.graph.node if n.op_type != "Cast"}
    watch = [
        original
        for node in proto.graph.node
        if node.name in converted
        for original, now in zip(node.output, converted[node.name].output, strict=False)
        if now in half
    ]
    if not watch:
        return ""
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    outputs = {o.name for o in probe.graph.output}
    probe.graph.output.extend(
        onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
        for name in watch
        if name not in outputs
    )
    session = load_session(probe.SerializeToString(), "the model with its float16 tensors exposed")
    limit = float(np.finfo(np.float16).max)
    for i, feed in enumerate(feeds[:_MAX_CHECK_FEEDS]):
        for name, value in zip(watch, session.run(watch, feed), strict=True):
            value = np.abs(np.asarray(value, dtype=np.float64))
            peak = float(value[np.isfinite(value)].max(initial=0.0))
            if peak > limit:
                return (
                    f"overflows: {name!r} reaches {peak:.4g} on calibration batch {i}, "
                    f"beyond float16's {limit:.0f}"
                )
    return ""


def _dummy_feed(session: Any) -> dict[str, np.ndarray]:
    types = {
        "tensor(float)": np.float32,
        "tensor(double)": np.float64,
        "tensor(int64)": np.int64,
        "tensor(int32)": np.int32,
        "tensor(string)": np.str_,
        "tensor(bool)": np.bool_,
    }
    feed = {}
    for arg in session.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in arg.shape]
        feed[arg.name] = np.zeros(shape, dtype=types.get(arg.type, np.float32))
        if arg.type == "tensor(string)":
            feed[arg.name] = feed[arg.name].astype(object)
    return feed
