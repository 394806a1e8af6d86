"""ONNX graph helpers for quantisation: which nodes carry weights, the first layer, what
a mode reduced, and the checks every quantised graph passes (it loads in onnxruntime, its
kept nodes stayed float, it runs on real feeds).

Nothing here decides a mode or writes a bundle: :mod:`packager.quantize` does.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import onnx

from packager.errors import QuantizationError

__all__ = [
    "CONST_ELEMENTWISE",
    "DEFAULT_DOMAINS",
    "PASS_THROUGH",
    "QUANTIZED_KERNELS",
    "WEIGHT_OPS",
    "check_feeds",
    "check_kept",
    "count_quantized",
    "first_layer",
    "first_line",
    "is_weight_op",
    "listing",
    "load_session",
    "name_nodes",
    "reduced_nodes",
    "root_logger_untouched",
]

WEIGHT_OPS = frozenset({"Conv", "Gemm", "MatMul"})
QUANTIZED_KERNELS = frozenset(
    {
        "ConvInteger",
        "DynamicQuantizeMatMul",
        "MatMulInteger",
        "MatMulIntegerToFloat",
        "QGemm",
        "QLinearConv",
        "QLinearMatMul",
    }
)
DEFAULT_DOMAINS = ("", "ai.onnx")
# Ops between a graph input and the first layer that do not mix features across rows or
# columns: the first layer behind them still sees the raw (or only linearly scaled) values.
PASS_THROUGH = frozenset(
    {
        "Cast",
        "Flatten",
        "Identity",
        "Normalizer",
        "Reshape",
        "Scaler",
        "Squeeze",
        "Transpose",
        "Unsqueeze",
    }
)
CONST_ELEMENTWISE = frozenset({"Add", "Div", "Mul", "Sub"})



def is_weight_op(node: onnx.NodeProto) -> bool:
    return node.domain in DEFAULT_DOMAINS and node.op_type in WEIGHT_OPS


def name_nodes(proto: onnx.ModelProto) -> None:
    """Give unnamed nodes a stable name; nodes_to_exclude matches by name."""
    taken = {n.name for n in proto.graph.node}
    for i, node in enumerate(proto.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def first_layer(proto: onnx.ModelProto) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The weight-bearing nodes fed by a graph input, directly or through ops that only
    cast, reshape or scale it by constants; and those ops. Names, in graph order."""
    graph = proto.graph
    constants = {t.name for t in graph.initializer}
    constants |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    reached = {i.name for i in graph.input} - constants
    frontier = list(reached)
    first: set[str] = set()
    path: set[str] = set()
    while frontier:
        tensor = frontier.pop()
        for node in consumers.get(tensor, ()):
            if is_weight_op(node):
                first.add(node.name)
                continue
            through = node.op_type in PASS_THROUGH or (
                node.op_type in CONST_ELEMENTWISE
                and all(i in constants or i == tensor for i in node.input)
            )
            if through:
                path.add(node.name)
                for out in node.output:
                    if out not in reached:
                        reached.add(out)
                        frontier.append(out)
    return (
        tuple(n.name for n in graph.node if n.name in first),
        tuple(n.name for n in graph.node if n.name in path),
    )


def check_kept(proto: onnx.ModelProto, kept: tuple[str, ...], mode: str) -> None:
    """The report must not say float for a layer that was quantised: each kept node is
    still a float weight op (under its name, or as the MatMul a Gemm became)."""
    nodes = {n.name: n for n in proto.graph.node}
    reduced = reduced_nodes(proto, mode)
    for name in kept:
        node = nodes.get(name) or nodes.get(f"{name}_MatMul")
        if node is None or not is_weight_op(node) or node.name in reduced:
            raise QuantizationError(
                f"onnxruntime {mode} quantisation did not keep node {name!r} in "
                "float as asked (keep_first_float)"
            )


def count_quantized(proto: onnx.ModelProto, mode: str) -> int:
    """The weight-bearing operators computing in reduced precision (see :func:`quantize`)."""
    graph = proto.graph
    return sum(1 for n in graph.node if n.op_type in QUANTIZED_KERNELS) + len(
        reduced_nodes(proto, mode)
    )


def reduced_nodes(proto: onnx.ModelProto, mode: str) -> set[str]:
    """Names of the MatMul/Gemm/Conv nodes that compute on int8 weights (through a
    DequantizeLinear) or, for fp16, on float16 inputs."""
    graph = proto.graph
    if mode == "fp16":
        try:
            inferred = onnx.shape_inference.infer_shapes(proto)
        except Exception:  # no types, nothing provable: count nothing
            return set()
        types = {
            v.name: v.type.tensor_type.elem_type
            for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
        }
        types.update({t.name: t.data_type for t in graph.initializer})
        fp16 = onnx.TensorProto.FLOAT16
        return {
            n.name
            for n in graph.node
            if is_weight_op(n) and n.input and all(types.get(i) == fp16 for i in n.input[:2])
        }
    dequantised = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return {
        n.name
        for n in graph.node
        if is_weight_op(n) and len(n.input) > 1 and n.input[1] in dequantised
    }


# ---------------------------------------------------------------------------- checks


def check_feeds(
    calibration: Iterable[Mapping[str, np.ndarray]] | None, *, required: bool
) -> list[dict[str, np.ndarray]]:
    if calibration is None:
        if required:
            raise QuantizationError(
                "static quantisation needs calibration rows "
                "(feed dicts: input name -> array); none were given"
            )
        return []
    feeds = []
    for i, feed in enumerate(calibration):
        if not isinstance(feed, Mapping) or not feed:
            raise QuantizationError(
                f"calibration batch {i} is not a non-empty dict of input name -> array"
            )
        feeds.append({str(k): np.asarray(v) for k, v in feed.items()})
    if required and not feeds:
        raise QuantizationError(
            "static quantisation needs calibration rows; the calibration data is empty"
        )
    return feeds


def load_session(data: bytes, what: str, *, wrap: bool = True) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only; the exception carries the reason
    try:
        return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        if not wrap:
            raise
        raise QuantizationError(f"{what} does not load in onnxruntime: {first_line(exc)}") from exc


@contextmanager
def root_logger_untouched() -> Iterator[None]:
    """onnxruntime's quantiser logs through the ``logging`` module functions, which
    install a stderr handler on an unconfigured root logger for good. Lend it a
    NullHandler for the call so the host application's logging stays as it was."""
    root = logging.getLogger()
    if root.handlers:
        yield
        return
    guard = logging.NullHandler()
    root.addHandler(guard)
    try:
        yield
    finally:
        root.removeHandler(guard)


def listing(names: Iterable[str], most: int = 12) -> str:
    """Names for a note; the manifest bounds a note to 2048 characters."""
    names = list(names)
    shown = ", ".join(n[:64] for n in names[:most])
    return shown if len(names) <= most else f"{shown} and {len(names) - most} more"


def first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."
