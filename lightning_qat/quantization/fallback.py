"""Quantized layers kept float after QAT: what must go float together, in the int8 model and in the QAT network.

A layer of an FX network cannot go float alone when its output quantizer is what loses the accuracy: int8 keeps that
quantizer wherever one side of it is int8 (the layer's consumers quantize their input with it). So a layer's
:class:`Group` is the layer, every op that reads its output quantizer and every other op writing into that quantizer
(inputs of a ``torch.cat`` share one): with all of them float the quantizer disappears. A Conv-BN-ReLU is one fused
module, so one layer. Eager and dynamic networks have no graph: a group is the layer alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from lightning_qat.quantization import ao

_OPS = ("call_module", "call_function", "call_method")


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
    if not isinstance(network, torch.fx.GraphModule):
        return None
    return network, dict(network.named_modules(remove_duplicate=False))


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

    ``static=False``: for dynamic int8 activations, which have no quantizer to share: each layer alone.
    """
    graph = _graph(network)
    if graph is None or not static:
        return {name: Group(name, (), (name,)) for name in quantized_layers(network)}
    gm, modules = graph
    sites: dict[str, list[torch.fx.Node]] = {}  # fake-quant module -> the nodes calling it (a shared one: several)
    for node in gm.graph.nodes:
        if _is_fake_quant(modules, node):
            sites.setdefault(str(node.target), []).append(node)
    members: dict[str, dict[torch.fx.Node, None]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or ao.weight_fake_quant(modules[str(node.target)]) is None:
            continue
        group = members.setdefault(str(node.target), {})
        group[node] = None
        for quantizer in {str(u.target) for u in node.users if _is_fake_quant(modules, u)}:
            for site in sites[quantizer]:
                for other in (*site.all_input_nodes, *site.users):
                    if other.op in _OPS and not _is_fake_quant(modules, other):
                        group[other] = None
    return {
        layer: Group(
            layer,
            tuple(n.name for n in nodes),
            tuple(dict.fromkeys(str(n.target) if n.op == "call_module" else n.name for n in nodes)),
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
    layers = {group.layer for group in chosen}
    if graph is not None:  # every layer of the groups: a float node converts to a float layer
        layers |= {str(n.target) for n in graph[0].graph.nodes if n.op == "call_module" and n.name in floating}
    for layer in layers:
        if (weight := ao.weight_fake_quant(network.get_submodule(layer))) is not None:
            off[f"{layer}.weight_fake_quant"] = weight
    if graph is None:
        outputs = output_quantizers(network)
        off |= {f"{g.layer}.activation_post_process": outputs[g.layer] for g in chosen if g.layer in outputs}
    else:
        gm, modules = graph
        calls: dict[str, bool] = {}
        for node in gm.graph.nodes:
            if _is_fake_quant(modules, node):
                ends = (*node.all_input_nodes, *node.users)
                inside = all(n.name in floating or n.op == "output" for n in ends)
                calls[str(node.target)] = calls.get(str(node.target), True) and inside
        off |= {target: modules[target] for target, inside in calls.items() if inside}  # type: ignore[misc]
    for fake_quant in off.values():
        fake_quant.disable_fake_quant()
        fake_quant.disable_observer()
    return sorted(off)
