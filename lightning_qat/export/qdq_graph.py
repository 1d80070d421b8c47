"""Rewrites of an exported QDQ ONNX graph into what runtimes fuse into int8 kernels and compute as the int8 model does.

The exporter writes ``QuantizeLinear(float weight) -> DequantizeLinear``; runtimes expect the int8 weight itself. And
ONNX Runtime (like XNNPACK, and every runtime of int32 biases) fuses ``DequantizeLinear -> Conv/Gemm ->
QuantizeLinear`` into one int8 kernel whose bias is an int32 on the grid of input scale x weight scale; torch's int8
kernels add the bias in float, so QAT trained (and the int8 model computes) a bias that this grid may not hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

INT32 = np.iinfo(np.int32)
# The largest error of a bias rounded to its int32 grid that a runtime's int8 output may take, in output steps: half
# a step rounds to the same int8 value, but for a tie. Measured (timm mobilenetv2_100 on digits, a depthwise channel
# whose input ReLU6 never opened, its BatchNorm variance near 0 folded into a weight scale of 36): 16 steps in one
# layer, and ONNX Runtime's accuracy fell from 0.859 to 0.119.
MISS = 0.5


@dataclass
class Graph:
    """An ONNX graph's constants, producers and consumers, to read a QDQ pattern (names through Identity nodes)."""

    model: Any
    initializers: dict[str, Any] = field(init=False)
    producer: dict[str, Any] = field(init=False)
    consumers: dict[str, list[Any]] = field(init=False)

    def __post_init__(self) -> None:
        graph = self.model.graph
        self.initializers = {init.name: init for init in graph.initializer}
        self.producer = {name: node for node in graph.node for name in node.output}
        self.consumers = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    def constant(self, name: str) -> Any:
        """The array named ``name`` (an initializer, maybe behind Identity or Constant nodes), or None."""
        from onnx import numpy_helper

        while name not in self.initializers:
            node = self.producer.get(name)
            if node is None or node.op_type not in ("Identity", "Constant"):
                return None
            if node.op_type == "Constant":
                return numpy_helper.to_array(node.attribute[0].t)
            name = node.input[0]
        return numpy_helper.to_array(self.initializers[name])

    def scale(self, name: str, op: str) -> Any:
        """The scale of the ``op`` (QuantizeLinear / DequantizeLinear) node producing ``name``, or None."""
        node = self.producer.get(name)
        return self.constant(node.input[1]) if node is not None and node.op_type == op else None

    def output_scale(self, name: str) -> Any:
        """The scale of the QuantizeLinear that ``name`` reaches alone (through one Relu / Clip), or None."""
        for _ in range(2):
            readers = self.consumers.get(name, [])
            if len(readers) != 1:
                return None
            if readers[0].op_type == "QuantizeLinear":
                return self.constant(readers[0].input[1])
            if readers[0].op_type not in ("Relu", "Clip"):
                return None
            name = readers[0].output[0]
        return None


def bias_misses(graph: Graph, node: Any) -> bool:
    """Whether the int32 bias a runtime makes of ``node``'s bias misses its output by over :data:`MISS` steps."""
    if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or not node.input[2]:
        return False
    x_scale = graph.scale(node.input[0], "DequantizeLinear")
    w_scale = graph.scale(node.input[1], "DequantizeLinear")
    bias, out_scale = graph.constant(node.input[2]), graph.output_scale(node.output[0])
    if x_scale is None or w_scale is None or bias is None or out_scale is None:
        return False
    return misses(bias, x_scale, w_scale, out_scale)


def misses(bias: Any, x_scale: Any, w_scale: Any, out_scale: Any) -> bool:
    """Whether ``bias`` on the int32 grid of ``x_scale x w_scale`` misses by over :data:`MISS` steps of ``out_scale``.

    Or leaves int32. That grid's value is what a runtime's int8 kernel adds instead of the bias (per channel).
    """
    step = np.float64(x_scale) * np.asarray(w_scale, np.float64)
    q = np.rint(np.asarray(bias, np.float64) / step)
    missed = np.abs(bias - q * step).max() / float(out_scale)
    return bool(missed > MISS or q.max() > INT32.max or q.min() < INT32.min)


def for_runtimes(model_bytes: bytes) -> bytes:
    """The exported graph ``model_bytes`` as runtimes should read it.

    Int8 weights (:func:`int8_weights`, 4x smaller), and float biases where an int32 one would miss
    (:func:`float_bias_where_int32_misses`).
    """
    import onnx

    model = onnx.load_from_string(model_bytes)
    int8_weights(model)
    float_bias_where_int32_misses(model)
    drop_unused(model)
    return model.SerializeToString()


def int8_weights(model: Any) -> None:
    """Replace each QuantizeLinear of a constant weight by the int8 weight it computes."""
    from onnx import numpy_helper

    graph = Graph(model)
    folded = []
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        x, scale, zero_point = (graph.constant(name) for name in node.input)
        if x is None or scale is None or zero_point is None:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if scale.ndim == 1 and scale.size > 1:
            shape = [1] * x.ndim
            shape[axis] = -1
            scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
        info = np.iinfo(zero_point.dtype)
        q = np.clip(np.rint(x / scale) + zero_point.astype(np.int32), info.min, info.max).astype(zero_point.dtype)
        model.graph.initializer.append(numpy_helper.from_array(q, node.output[0]))
        folded.append(node)
    for node in folded:
        model.graph.node.remove(node)


def drop_unused(model: Any) -> None:
    """Remove the Identity nodes and initializers nothing reads (runtimes warn of each)."""
    graph = model.graph
    while True:
        used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        dead = [node for node in graph.node if node.op_type == "Identity" and node.output[0] not in used]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    for init in [init for init in graph.initializer if init.name not in used]:
        graph.initializer.remove(init)


def float_bias_where_int32_misses(model: Any) -> list[str]:
    """Move the bias of each layer whose int32 bias would miss (:func:`bias_misses`) into a float Add after it.

    The runtime then runs that layer in float between its DequantizeLinear and QuantizeLinear (slower, one layer),
    as torch's int8 model computes it. Returns the rewritten layers' output names.
    """
    import onnx
    from onnx import numpy_helper

    graph = Graph(model)
    moved = []
    for node in list(model.graph.node):
        if not bias_misses(graph, node):
            continue
        weight = graph.constant(graph.producer[node.input[1]].input[0])  # the int8 weight
        if weight is None:
            continue
        bias = graph.constant(node.input[2]).astype(np.float32)
        if node.op_type == "Conv":  # (C,) -> (1, C, 1, ...): added to an N C H W output
            bias = bias.reshape([1, -1] + [1] * (weight.ndim - 2))
        else:  # Gemm's C is scaled by its beta
            bias = bias * np.float32(next((a.f for a in node.attribute if a.name == "beta"), 1.0))
        name, out = f"{node.output[0]}_float_bias", node.output[0]
        model.graph.initializer.append(numpy_helper.from_array(bias, name))
        del node.input[2]
        node.output[0] = f"{out}_no_bias"
        add = onnx.helper.make_node("Add", [node.output[0], name], [out], name=f"{node.name}_float_bias")
        index = list(model.graph.node).index(node)
        model.graph.node.insert(index + 1, add)
        moved.append(out)
    return moved
