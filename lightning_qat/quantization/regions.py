"""Which ops of a converted PT2E graph compute in int8 and which in float, for the report.

torchao's converted graph is float ops between quantize / dequantize nodes; inductor (x86) or XNNPACK turns a
pattern into an int8 kernel. What becomes int8:

- a convolution or linear whose weight is dequantized (a layer);
- an op fused into the layer before it (a ReLU or GELU, a residual add of a dequantized tensor);
- an op whose tensor inputs are all dequantized and whose output is quantized again (pooling, ``cat``, ``add``).

Every other op that computes on float data (not a shape, index or mask op) runs in float between them: a
transformer's LayerNorm, softmax attention, the residual adds of float tensors, an embedding with a float table.
"""

from __future__ import annotations

import torch

from lightning_qat.quantization.exported import LAYER_CALLS

_NOT_ARITHMETIC = {  # shape, index, mask and identity ops: no arithmetic on float data to count
    *("view", "_unsafe_view", "reshape", "permute", "transpose", "t", "expand", "unsqueeze", "squeeze", "flatten"),
    *("slice", "select", "index", "gather", "contiguous", "clone", "alias", "detach", "_to_copy", "to", "getitem"),
    *("sym_size", "arange", "full", "zeros", "ones", "empty", "dropout", "dropout_", "scalar_tensor", "where"),
    *("eq", "ne", "ge", "gt", "le", "lt", "logical_and", "logical_or", "logical_not", "bitwise_not", "split"),
    *("unbind", "chunk", "lift_fresh_copy", "_assert_tensor_metadata", "sym_constrain_range_for_size"),
}


def float_ops(graph_module: torch.fx.GraphModule) -> dict[str, int]:
    """The ops of the converted PT2E ``graph_module`` that compute in float (see the module's note), by aten name."""
    int8: set[torch.fx.Node] = set()
    counts: dict[str, int] = {}
    for node in graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        target = str(node.target)
        if target in LAYER_CALLS and len(node.args) > 1 and _dequantized(node.args[1]):
            int8.add(node)
            continue
        name = _name(node)
        data = [arg for arg in node.all_input_nodes if arg.op != "get_attr" and _is_float(arg)]
        if "quantize" in target or name in _NOT_ARITHMETIC:
            continue
        if not data:  # a lookup in a float table (an embedding of token ids), else constants only
            if any(arg.op == "get_attr" and _is_float(arg) for arg in node.all_input_nodes) and name == "embedding":
                counts[name] = counts.get(name, 0) + 1
            continue
        quantized_out = any(_quantizes(user) for user in node.users)
        if all(_dequantized(arg) for arg in data) and quantized_out:
            int8.add(node)  # an int8 op of its own: pooling, cat, add
        elif any(arg in int8 for arg in data) and all(arg in int8 or _dequantized(arg) for arg in data):
            int8.add(node)  # the layer's post-op
        else:
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: -item[1]))


def _name(node: torch.fx.Node) -> str:
    """``aten.layer_norm.default`` -> ``layer_norm``; ``operator.getitem`` -> ``getitem``."""
    parts = str(node.target).split(".")
    return parts[1] if parts[0] == "aten" and len(parts) > 1 else getattr(node.target, "__name__", parts[-1])


def _is_float(node: torch.fx.Node) -> bool:
    value = node.meta.get("val")
    return not isinstance(value, torch.Tensor) or value.is_floating_point()


def _dequantized(node: object) -> bool:
    return isinstance(node, torch.fx.Node) and "dequantize" in str(node.target)


def _quantizes(node: torch.fx.Node) -> bool:
    target = str(node.target)
    return "quantize" in target and "dequantize" not in target


def float_weights(graph_module: torch.fx.GraphModule) -> dict[str, int]:
    """The float parameters of ops other than layers (embedding tables, LayerNorm weights), by aten name."""
    counts: dict[str, int] = {}
    seen: set[str] = set()
    for node in graph_module.graph.nodes:
        if node.op != "call_function" or str(node.target) in LAYER_CALLS or "quantize" in str(node.target):
            continue
        for arg in node.all_input_nodes:
            if arg.op != "get_attr" or str(arg.target) in seen:
                continue
            tensor = _parameter(graph_module, arg)
            if tensor is not None and tensor.is_floating_point():
                seen.add(str(arg.target))
                counts[_name(node)] = counts.get(_name(node), 0) + tensor.numel()
    return counts


def _parameter(graph_module: torch.fx.GraphModule, node: torch.fx.Node) -> torch.Tensor | None:
    """The parameter ``node`` reads, ``None`` for a buffer or a constant."""
    try:
        return graph_module.get_parameter(str(node.target))
    except AttributeError:
        return None
