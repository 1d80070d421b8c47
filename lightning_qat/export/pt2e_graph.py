"""Rewrites of the converted PT2E int8 graph into what ExecuTorch's XNNPACK delegate computes as torch does.

XNNPACK, like ONNX Runtime (:mod:`~lightning_qat.export.qdq_graph`), runs ``dequantize -> conv -> quantize`` as one
int8 operator whose bias is an int32 on the grid of input scale x weight scale; torch's int8 graph adds the bias in
float. A channel whose input never opened folds a weight scale of tens, and that grid misses its bias by many output
steps (the conftest's ``DeadChannel``: the program 4% off its graph on digits, against 0% with the layer in float).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lightning_qat.export.layout import owner
from lightning_qat.export.qdq_graph import misses
from lightning_qat.quantization.fallback import module_name


def float_bias_where_int32_misses(graph_module: torch.fx.GraphModule) -> list[str]:
    """Run in float each int8 conv / linear whose int32 bias would miss (:func:`~.qdq_graph.misses`); their modules.

    The layer's weight becomes its dequantized float constant and its bias a float ``add`` after it: ExecuTorch's
    XNNPACK partitioner then lowers it as a float operator between XNNPACK's quantize and dequantize, inside the
    delegate (a dequantize of the weight left in the graph has no ExecuTorch kernel outside it).
    """
    moved = []
    for node in list(graph_module.graph.nodes):
        if str(node.target) not in _BIASED or len(node.args) < 3 or not isinstance(node.args[2], torch.fx.Node):
            continue
        x_scale = _dequantized_scale(graph_module, node.args[0])
        w_scale = _dequantized_scale(graph_module, node.args[1])
        out_scale, bias = _output_scale(graph_module, node), _constant(graph_module, node.args[2])
        if any(v is None for v in (x_scale, w_scale, out_scale, bias)) or not misses(
            np.asarray(bias), x_scale, np.asarray(w_scale), out_scale
        ):
            continue
        dequantize = node.args[1]  # computed here: ExecuTorch runs a float layer's weight as a constant
        weight = dequantize.target(*_constants(graph_module, dequantize))
        shape = [-1] if "linear" in str(node.target) else [-1] + [1] * (weight.dim() - 2)
        with graph_module.graph.inserting_before(node):
            weight = _buffer(graph_module, f"{node.name}_float_weight", weight)
            constant = _buffer(graph_module, f"{node.name}_float_bias", bias.reshape(shape))
        with graph_module.graph.inserting_after(node):
            add = graph_module.graph.call_function(torch.ops.aten.add.Tensor, (node, constant))
        node.replace_all_uses_with(add)  # the add's own input too: set again below
        add.args = (node, constant)
        node.args = (node.args[0], weight, None, *node.args[3:])
        moved.append(module_name(node) or node.name)
    if moved:
        graph_module.graph.eliminate_dead_code()
        graph_module.recompile()
    return moved


_BIASED = ("aten.conv1d.default", "aten.conv2d.default", "aten.linear.default")
_DEQUANTIZE = "quantized_decomposed.dequantize_per_"
_ACTIVATIONS = ("aten.relu.default", "aten.hardtanh.default", "aten.clamp.default")


def _buffer(graph_module: torch.fx.GraphModule, name: str, value: torch.Tensor) -> torch.fx.Node:
    """``value`` as the graph's buffer ``name``, read by a new ``get_attr`` node at the graph's insert point."""
    graph_module.register_buffer(name, value.detach().clone())
    return graph_module.graph.get_attr(name)


def _constants(graph_module: torch.fx.GraphModule, node: torch.fx.Node) -> list[Any]:
    """``node``'s arguments, each ``get_attr`` node replaced by its tensor."""
    return [_constant(graph_module, arg) if isinstance(arg, torch.fx.Node) else arg for arg in node.args]


def _constant(graph_module: torch.fx.GraphModule, arg: Any) -> Any:
    """A float literal as is, a ``get_attr`` node's tensor, else None."""
    if isinstance(arg, float):
        return arg
    if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
        return getattr(*owner(graph_module, arg)).detach()
    return None


def _dequantized_scale(graph_module: torch.fx.GraphModule, arg: Any) -> Any:
    """The scale (a float, or a tensor per channel) of the dequantize call producing ``arg``, else None."""
    if not isinstance(arg, torch.fx.Node) or not str(arg.target).startswith(_DEQUANTIZE):
        return None
    scale = _constant(graph_module, arg.args[1])
    return scale.item() if isinstance(scale, torch.Tensor) and scale.numel() == 1 else scale


def _output_scale(graph_module: torch.fx.GraphModule, node: torch.fx.Node) -> float | None:
    """The scale of the quantize call ``node`` reaches alone (through one activation), else None."""
    for _ in range(2):
        if len(node.users) != 1:
            return None
        (node,) = node.users
        if str(node.target).startswith("quantized_decomposed.quantize_per_tensor"):
            scale = _constant(graph_module, node.args[1])
            return None if scale is None else float(scale)
        if str(node.target) not in _ACTIVATIONS:
            return None
    return None
