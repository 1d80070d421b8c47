"""Quantized layers kept float after QAT: what must go float together, in the int8 model and in the QAT network.

A layer of an FX network cannot go float alone when its output quantizer is what loses the accuracy: int8 keeps that
quantizer wherever one side of it is int8 (the layer's consumers quantize their input with it). So a layer's
:class:`Group` is the layer, every op that reads its output quantizer and every other op writing into that quantizer
(inputs of a ``torch.cat`` share one): with all of them float the quantizer disappears. A Conv-BN-ReLU is one fused
module, so one layer. Eager and dynamic networks have no graph: a group is the layer alone.

A PT2E network (torchao's captured graph) has the same fake-quant modules, but its layers are convolution / linear
calls whose weight goes through one, named by the module that made the call, and a Conv-BN is several ops (the
convolution, torchao's rescaling, the batch norm, the activation) before the output quantizer: they go float together.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from lightning_qat.quantization import ao
from lightning_qat.quantization.exported import BATCH_NORM, LAYER_CALLS, ExportedQAT

_OPS = ("call_module", "call_function", "call_method")
_FUSED = (  # what the x86 quantizer annotates as one pattern with the convolution / linear before it
    BATCH_NORM,
    "aten.relu.default",
    "aten.relu_.default",
    "aten.hardtanh.default",
    "aten.hardtanh_.default",
    "aten.add.Tensor",
    "aten.add_.Tensor",
)
_REWRITE = "WrapperModule"  # torchao's Conv-BN rewrite: its ops are named by their node, not the user's module


@dataclass(frozen=True)
class Group:
    """The graph nodes (FX) that go float with ``layer``, and their names for people (modules, or ``add_3``)."""

    layer: str
    nodes: tuple[str, ...]  # FX node names (empty for an eager or dynamic network: the layer is a module name)
    names: tuple[str, ...]  # the modules (qualified names) and functional ops (node names) kept float


def quantized_layers(network: nn.Module) -> list[str]:
    """The qualified names of the layers with a weight fake-quant (QAT Conv, Linear, Embedding...), in order."""
    return [name for name, module in network.named_modules() if ao.weight_fake_quant(module) is not None]


def _is_fake_quant(modules: dict[str, nn.Module], node: torch.fx.Node) -> bool:
    return node.op == "call_module" and ao.is_fake_quant(modules[str(node.target)])


def _graph(network: nn.Module) -> tuple[torch.fx.GraphModule, dict[str, nn.Module]] | None:
    if isinstance(network, ExportedQAT):
        network = network.exported
    if not isinstance(network, torch.fx.GraphModule):
        return None
    return network, dict(network.named_modules(remove_duplicate=False))


def _is_layer_call(modules: dict[str, nn.Module], node: torch.fx.Node) -> bool:
    """A captured graph's quantized layer: a convolution or linear call whose weight goes through a fake-quant."""
    weight = node.args[1] if node.op == "call_function" and len(node.args) > 1 else None
    return str(node.target) in LAYER_CALLS and isinstance(weight, torch.fx.Node) and _is_fake_quant(modules, weight)


def _module_name(node: torch.fx.Node) -> str:
    """The qualified name of the module whose forward made this call in a captured graph ("" at the top)."""
    stack = node.meta.get("nn_module_stack")
    return str(list(stack.values())[-1][0]) if stack else ""


def _name(node: torch.fx.Node) -> str | None:
    """What people call a group member: its module (FX modules; a captured op's module), else the op's node name."""
    if node.op == "call_module":
        return str(node.target)
    if _rewritten(node):
        return None
    return _module_name(node) or node.name


def _rewritten(node: torch.fx.Node) -> bool:
    """An op of torchao's Conv-BN rewrite (its rescaling), not one the user's module made."""
    stack = node.meta.get("nn_module_stack") or {}
    return bool(stack) and _REWRITE in str(list(stack.values())[-1][1])


def layer_calls(graph_module: torch.fx.GraphModule) -> dict[str, torch.fx.Node]:
    """A QAT graph's quantized layers by name: FX's QAT module calls, or a captured graph's convolution and linears."""
    return _layer_nodes(graph_module, dict(graph_module.named_modules(remove_duplicate=False)))


def _layer_nodes(gm: torch.fx.GraphModule, modules: dict[str, nn.Module]) -> dict[str, torch.fx.Node]:
    """Each quantized layer's (first) node, by the layer's name, in network order."""
    found: dict[str, torch.fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and ao.weight_fake_quant(modules[str(node.target)]) is not None:
            found.setdefault(str(node.target), node)
        elif _is_layer_call(modules, node):  # a second call in one module (attention's projections): its node name
            name = _module_name(node) or node.name
            found[name if name not in found else node.name] = node
    return found


def output_calls(graph_module: torch.fx.GraphModule) -> dict[str, list[torch.fx.Node]]:
    """Each captured layer's fake-quant calls on its output (past the ops fused into it), by :func:`layer_calls`."""
    modules = dict(graph_module.named_modules(remove_duplicate=False))
    return {name: _downstream(node, modules)[0] for name, node in _layer_nodes(graph_module, modules).items()}


def _downstream(node: torch.fx.Node, modules: dict[str, nn.Module]) -> tuple[list[torch.fx.Node], list[torch.fx.Node]]:
    """The output quantizers a captured layer's output reaches, and the ops on the way there (float with it)."""
    quantizers: list[torch.fx.Node] = []
    between: list[torch.fx.Node] = []
    todo, seen = list(node.users), {node}
    while todo:
        user = todo.pop(0)
        if user in seen:
            continue
        seen.add(user)
        if _is_fake_quant(modules, user):
            quantizers.append(user)
        elif _fused(user):
            between.append(user)
            todo += list(user.users)
    return quantizers, between


def _fused(node: torch.fx.Node) -> bool:
    """An op the x86 quantizer fuses into the layer before it (what FX's fused module holds, and a residual add).

    Past other ops (a LayerNorm, an attention's reshapes), a quantizer is not the layer's output quantizer.
    """
    return node.op == "call_function" and (_rewritten(node) or str(node.target) in _FUSED)


def output_quantizers(network: nn.Module) -> dict[str, ao.FakeQuantizeBase]:
    """Each quantized layer's output fake-quant: the module FX calls on its output, or the eager layer's own."""
    graph = _graph(network)
    if graph is None:
        layers = ((name, network.get_submodule(name)) for name in quantized_layers(network))
        return {name: fq for name, module in layers if (fq := ao.output_fake_quant(module)) is not None}
    gm, modules = graph
    found: dict[str, ao.FakeQuantizeBase] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and ao.weight_fake_quant(modules[str(node.target)]) is not None:
            after = [u for u in node.users if _is_fake_quant(modules, u)]
            if after:
                found.setdefault(str(node.target), modules[str(after[0].target)])  # type: ignore[arg-type]
    return found


def groups(network: nn.Module, static: bool = True) -> dict[str, Group]:
    """Every quantized layer of a QAT network and the :class:`Group` that goes float with it, in network order.

    ``static=False``: for dynamic int8 activations, which have no quantizer to share: each layer alone (FX, eager).
    """
    graph = _graph(network)
    captured = isinstance(network, ExportedQAT)
    if graph is None or not (static or captured):
        return {name: Group(name, (), (name,)) for name in quantized_layers(network)}
    gm, modules = graph
    sites: dict[str, list[torch.fx.Node]] = {}  # fake-quant module -> the nodes calling it (a shared one: several)
    for node in gm.graph.nodes:
        if _is_fake_quant(modules, node):
            sites.setdefault(str(node.target), []).append(node)
    members: dict[str, dict[torch.fx.Node, None]] = {}
    for layer, node in _layer_nodes(gm, modules).items():
        group = members.setdefault(layer, {node: None})
        if captured:
            quantizers, between = _downstream(node, modules)
            group.update(dict.fromkeys(between))
        else:
            quantizers = [u for u in node.users if _is_fake_quant(modules, u)]
        for quantizer in {str(q.target) for q in quantizers}:
            for site in sites[quantizer]:
                for other in (*site.all_input_nodes, *site.users):
                    if other.op in _OPS and not _is_fake_quant(modules, other):
                        group[other] = None
    return {
        layer: Group(
            layer,
            tuple(n.name for n in nodes),
            tuple(dict.fromkeys(name for n in nodes if (name := _name(n)) is not None)),
        )
        for layer, nodes in members.items()
    }


def float_nodes(chosen: Iterable[Group]) -> set[str]:
    """The FX node names of ``chosen`` groups, for :func:`~lightning_qat.quantization.convert.to_int8`."""
    return {node for group in chosen for node in group.nodes}


def float_names(chosen: Iterable[Group]) -> list[str]:
    """The modules and functional ops of ``chosen`` groups, each once, in order: what the report says stays float."""
    return list(dict.fromkeys(name for group in chosen for name in group.names))


def train_float(network: nn.Module, chosen: Iterable[Group]) -> list[str]:
    """Switch off, in a QAT network, the fake-quants that the int8 conversion keeping ``chosen`` float drops.

    The weights' fake-quants of the groups' layers, and each activation fake-quant whose every call has only float
    nodes (or the network's output) on both sides; for groups of a layer alone (eager networks, dynamic
    activations), the layer's own output fake-quant if it has one.
    The QAT network then computes what that int8 network computes (an ONNX export of it keeps them float too).
    Returns the fake-quant modules switched off.
    """
    chosen = list(chosen)
    off: dict[str, ao.FakeQuantizeBase] = {}
    graph = _graph(network) if any(group.nodes for group in chosen) else None  # None: layers alone
    floating = float_nodes(chosen)
    layers = {group.layer for group in chosen} if not isinstance(network, ExportedQAT) else set()
    if graph is not None:
        gm, modules = graph
        off |= {target: modules[target] for target in dropped_quantizers(gm, floating)}  # type: ignore[misc]
        if layers:  # every layer of the groups: a float node converts to a float layer
            layers |= {str(n.target) for n in gm.graph.nodes if n.op == "call_module" and n.name in floating}
    for layer in layers:
        if (weight := ao.weight_fake_quant(network.get_submodule(layer))) is not None:
            off[f"{layer}.weight_fake_quant"] = weight
    if graph is None:
        outputs = output_quantizers(network)
        off |= {f"{g.layer}.activation_post_process": outputs[g.layer] for g in chosen if g.layer in outputs}
    for fake_quant in off.values():
        fake_quant.disable_fake_quant()
        fake_quant.disable_observer()
    return sorted(off)


def dropped_quantizers(graph_module: torch.fx.GraphModule, floating: Collection[str]) -> list[str]:
    """The fake-quant modules of a QAT graph that keeping its ``floating`` nodes float drops.

    Each activation fake-quant whose every call has only float nodes (or the network's output) on both sides, and in
    a captured (PT2E) graph the weight fake-quant of each float convolution / linear call.
    """
    modules = dict(graph_module.named_modules(remove_duplicate=False))
    inside: dict[str, bool] = {}
    weights: set[str] = set()
    for node in graph_module.graph.nodes:
        if _is_fake_quant(modules, node):
            ends = (*node.all_input_nodes, *node.users)
            here = all(n.name in floating or n.op == "output" for n in ends)
            inside[str(node.target)] = inside.get(str(node.target), True) and here
        elif node.name in floating and _is_layer_call(modules, node):
            weights.add(str(node.args[1].target))
    return sorted({target for target, dropped in inside.items() if dropped} | weights)
