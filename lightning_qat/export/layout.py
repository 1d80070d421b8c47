"""Layout passes on the int8 PT2E graph before AOTInductor compiles it with a dynamic batch.

**One-channel convolutions** (:func:`pad_single_channel`).
torch 2.14's inductor gets the output layout of an int8 convolution wrong when its input has one channel and the
batch is dynamic: its helper (``mkldnn_ir._prepare_convolution_fusion_create``) says such a convolution writes
contiguous memory, which is true of the float convolution there (pytorch/pytorch#121400) but not of the int8 one,
whose prepacked weight makes oneDNN write channels-last. The code after it then reads the wrong strides: the
package's output is 120-140% away from the graph's (a grayscale image network's first convolution, or any layer
after a one-channel map). A one-channel tensor's strides cannot say channels-last, so the pass gives the input a
second channel of zeros: the quantized input is padded with its zero point (0.0 once dequantized) and the int8
weight with a zero input channel, so every product the padding adds is 0 and the output is exactly the same.

**Linears on a transposed input** (:func:`contiguous_linear_inputs`). ``nn.MultiheadAttention`` projects a
transposed (sequence-first) tensor; torchao 0.18's int8-linear pattern for such an input compares sizes with
``torch.Size(...)``, which raises on a dynamic batch ("torch.Size() takes an iterable of 'int'"). The tensor is made
contiguous before it is quantized: the same values.

**Weights prepacked for the wrong input** (:func:`separate_prepacks`, around the compile). ideep caches a
convolution's primitive descriptor under its shapes, attributes and OpenMP thread count, but not whether the input
has a zero point (torch 2.14, oneDNN 3.12). A weight prepacked for an input without one after a weight of the same
shape prepacked for an input with one (earlier in the graph, or earlier in the process: loading a quantized
TorchScript model prepacks its weights) gets that one's layout, with a zero-point compensation its kernel does not
use, and oneDNN reorders the weight on every call: resnet18's package ran 2-3x slower at batch 1. Each prepack runs
under a thread count that depends on the zero point, so the two never share an entry (docs/pt2e.md has the repro).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

_CONVS = ("aten.conv2d.default", "aten.conv3d.default")  # 1-d convolutions are written contiguous: not affected
_DEQUANTIZE = "quantized_decomposed.dequantize_per_tensor.default"
_QUANTIZE = "quantized_decomposed.quantize_per_tensor.default"
_DEQUANTIZE_WEIGHT = "quantized_decomposed.dequantize_per_channel.default"


def pad_single_channel(graph_module: torch.fx.GraphModule) -> int:
    """Give each int8 convolution with a one-channel input a zero second channel, in place; returns how many.

    Only convolutions whose int8 weight is the graph's own constant used there alone, with zero points of 0
    (symmetric: a zero byte is 0.0), and whose input zero point is a number, are padded (the shapes torchao's x86
    ``convert_pt2e`` writes); others are left as they are.
    """
    padded = 0
    for node in list(graph_module.graph.nodes):
        if node.op != "call_function" or str(node.target) not in _CONVS:
            continue
        activation, weight = node.args[0], node.args[1]
        groups = node.args[6] if len(node.args) > 6 else 1
        if not _is_call(activation, _DEQUANTIZE) or not isinstance(activation.args[2], int):
            continue
        if not _is_call(weight, _DEQUANTIZE_WEIGHT) or len(weight.users) != 1:
            continue
        constant = weight.args[0]
        if not isinstance(constant, torch.fx.Node) or constant.op != "get_attr" or len(constant.users) != 1:
            continue
        module, name = owner(graph_module, constant)
        int8_weight = getattr(module, name)
        if groups != 1 or int8_weight.shape[1] != 1 or not _zero(graph_module, weight.args[2]):
            continue
        setattr(module, name, torch.cat([int8_weight, torch.zeros_like(int8_weight)], dim=1))
        dims = int8_weight.dim() - 2
        with graph_module.graph.inserting_before(node):
            # (last dimension first: the spatial dimensions unpadded, then one channel after the input's)
            quantized = graph_module.graph.call_function(
                torch.ops.aten.constant_pad_nd.default, (activation.args[0], [0, 0] * dims + [0, 1], activation.args[2])
            )
            dequantized = graph_module.graph.call_function(activation.target, (quantized, *activation.args[1:]))
        node.update_arg(0, dequantized)
        if not activation.users:
            graph_module.graph.erase_node(activation)
        padded += 1
    if padded:
        graph_module.recompile()
    return padded


def contiguous_linear_inputs(graph_module: torch.fx.GraphModule) -> int:
    """Make each int8 linear's non-contiguous input (3-d or more) contiguous before it is quantized; how many."""
    changed = 0
    for node in list(graph_module.graph.nodes):
        if node.op != "call_function" or str(node.target) != "aten.linear.default":
            continue
        dequantized = node.args[0]
        if not _is_call(dequantized, _DEQUANTIZE) or not _is_call(dequantized.args[0], _QUANTIZE):
            continue
        quantize = dequantized.args[0]
        source = quantize.args[0]
        value = source.meta.get("val") if isinstance(source, torch.fx.Node) else None
        if not isinstance(value, torch.Tensor) or value.dim() <= 2 or value.is_contiguous():
            continue
        with graph_module.graph.inserting_before(quantize):
            copy = graph_module.graph.call_function(
                torch.ops.aten.clone.default, (source,), {"memory_format": torch.contiguous_format}
            )
        copy.meta["val"] = value.contiguous()
        quantize.replace_input_with(source, copy)
        changed += 1
    if changed:
        graph_module.recompile()
    return changed


def _zero(graph_module: torch.fx.GraphModule, zero_points: object) -> bool:
    """Whether ``zero_points`` (a number, or a constant of the graph) is 0 everywhere."""
    if isinstance(zero_points, torch.fx.Node) and zero_points.op == "get_attr":
        zero_points = getattr(*owner(graph_module, zero_points))
    if isinstance(zero_points, torch.Tensor):
        return not bool(zero_points.any())
    return zero_points == 0


def owner(graph_module: torch.fx.GraphModule, constant: torch.fx.Node) -> tuple[torch.nn.Module, str]:
    """The module holding a ``get_attr`` node's constant, and the constant's name there."""
    owner, _, name = str(constant.target).rpartition(".")
    return graph_module.get_submodule(owner), name


def _is_call(value: object, target: str) -> bool:
    return isinstance(value, torch.fx.Node) and value.op == "call_function" and str(value.target) == target


@contextmanager
def separate_prepacks() -> Iterator[None]:
    """Within this context, prepack int8 convolution weights with and without an input zero point apart (see above).

    The thread count is meant as ideep's cache key only: the prepacked layout is the same without AMX (with AMX it can
    differ: docs/pt2e.md). The caller's count is restored after each prepack and the original op after the context.
    """
    packet = torch.ops.onednn.qconv_prepack
    prepack = getattr(packet, "_op", None)
    if prepack is None:  # an op packet without the attribute: another torch, left as it is
        yield
        return

    def separated(*args: Any, **kwargs: Any) -> Any:
        threads = torch.get_num_threads()
        zero_point = args[3] if len(args) > 3 else kwargs.get("input_zero_point", 0)
        torch.set_num_threads(threads + (2 if zero_point else 1))  # counts the process rarely runs at
        try:
            return prepack(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    packet._op = separated
    try:
        yield
    finally:
        packet._op = prepack
