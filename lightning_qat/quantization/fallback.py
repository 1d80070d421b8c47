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


def module_name(node: torch.fx.Node) -> str:
    """The qualified name of the module whose forward made this call in a captured graph ("" at the top)."""
    stack = node.meta.get("nn_module_stack")
    return str(list(stack.values())[-1][0]) if stack else ""


def _name(node: torch.fx.Node) -> str | None:
    """What people call a group member: its module (FX modules; a captured op's module), else the op's node name."""
    if node.op == "call_module":
        return str(node.target)
    if _rewritten(node) or node.op == "get_attr":  # a constant goes with the op reading it
        return None
    return module_name(node) or node.name


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
            name = module_name(node) or node.name
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
    """The :class:`Group` of every quantized layer of a QAT network, in network order, then of its other quantizers.

    The other quantizers: each activation quantizer that is no layer's output (after a multiplication, a concatenation
    of differently-scaled branches...), keyed by its module name, with the ops on both sides of it: the damage can be
    an op's output, not a layer's.

    ``static=False``: for dynamic int8 activations, which have no quantizer to share: each layer alone (FX, eager).
    """
    graph = _graph(network)
    captured = isinstance(network, ExportedQAT)
    if graph is None or not (static or captured):
        return {name: Group(name, (), (name,)) for name in quantized_layers(network)}
    gm, modules = graph
    sites: dict[str, list[torch.fx.Node]] = {}  # fake-quant module -> the nodes calling it (a shared one: several)
    same = _shared(modules)
    for node in gm.graph.nodes:
        if _is_fake_quant(modules, node):
            sites.setdefault(same[str(node.target)], []).append(node)
    members: dict[str, dict[torch.fx.Node, None]] = {}
    outputs: set[str] = set()  # the layers' output quantizers: each in its layer's group
    for layer, node in _layer_nodes(gm, modules).items():
        group = members.setdefault(layer, {node: None})
        if captured:
            quantizers, between = _downstream(node, modules)
            group.update(dict.fromkeys(between))
        else:
            quantizers = [u for u in node.users if _is_fake_quant(modules, u)]
        for quantizer in {same[str(q.target)] for q in quantizers}:
            outputs.add(quantizer)
            group.update(dict.fromkeys(_sides(sites[quantizer], modules)))
    for quantizer, calls in sites.items():  # an activation quantizer after an op (a gain, a cat): its own group
        if quantizer in outputs or any(_weight(call, modules) for call in calls):
            continue
        nodes = dict.fromkeys(_sides(calls, modules))
        if quantizer in dropped_quantizers(gm, {n.name for n in nodes}):  # else keeping them float keeps it
            members[quantizer] = nodes
    for nodes in members.values():  # the constants a float op reads through a quantizer of their own go float too
        nodes.update(dict.fromkeys(_constants(nodes, modules)))
    return {
        layer: Group(
            layer,
            tuple(n.name for n in nodes),
            tuple(dict.fromkeys(name for n in nodes if (name := _name(n)) is not None)),
        )
        for layer, nodes in members.items()
    }


def _constants(nodes: Iterable[torch.fx.Node], modules: dict[str, nn.Module]) -> list[torch.fx.Node]:
    """The constants (buffers: a fixed gain) ``nodes`` read through a quantizer of the constant alone.

    Kept float with their readers, the quantizer goes (a buffer quantized with the range of its largest entry can
    round the others to 0); a layer's weight is its layer's (a QAT module's, or a captured call's argument 1).
    """
    found = []
    for node in nodes:
        for quantizer in node.all_input_nodes:
            if _is_fake_quant(modules, quantizer) and not any(_is_layer_call(modules, u) for u in quantizer.users):
                found += [n for n in quantizer.all_input_nodes if n.op == "get_attr"]
    return found


def _weight(call: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A quantizer call on a weight (a captured layer's, rescaled by torchao's Conv-BN rewrite) or on a constant."""
    constant = all(n.op == "get_attr" for n in call.all_input_nodes)
    return constant or any(_is_layer_call(modules, user) and user.args[1] is call for user in call.users)


def _sides(calls: Iterable[torch.fx.Node], modules: dict[str, nn.Module]) -> list[torch.fx.Node]:
    """The ops on both sides of a quantizer's ``calls``: what goes float for it to disappear."""
    return [
        other
        for call in calls
        for other in (*call.all_input_nodes, *call.users)
        if other.op in _OPS and not _is_fake_quant(modules, other)
    ]


def activation_quantizers(network: nn.Module) -> dict[str, Group]:
    """The groups of :func:`groups` that are an activation quantizer of their own (no layer's output), by its name."""
    graph = _graph(network)
    if graph is None:
        return {}
    modules = graph[1]
    return {key: group for key, group in groups(network).items() if key in modules and ao.is_fake_quant(modules[key])}


def measured_quantizers(network: nn.Module) -> dict[str, list[str]]:
    """For each of :func:`activation_quantizers`, the fake-quant modules whose error is its error.

    Itself, and the quantizers of the constants its group keeps float: a fixed gain quantized with the range of its
    largest entry rounds the others to 0 before the op's output quantizer sees anything.
    """
    graph = _graph(network)
    if graph is None:
        return {}
    gm, modules = graph
    nodes = {node.name: node for node in gm.graph.nodes}
    found = {}
    for key, group in activation_quantizers(network).items():
        constants = [nodes[name] for name in group.nodes if nodes[name].op == "get_attr"]
        found[key] = [key, *(str(u.target) for c in constants for u in c.users if _is_fake_quant(modules, u))]
    return found


def all_float(network: nn.Module) -> nn.Module:
    """Switch every fake-quant of the QAT ``network`` off: its weights in float, what no set kept float beats."""
    _off(fake_quant for _, fake_quant in ao.fake_quant_modules(network))
    return network


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
    off = _dropped(network, chosen)
    _off(off.values())
    return sorted(off)


def _off(fake_quants: Iterable[ao.FakeQuantizeBase]) -> None:
    """Switch fake quantization and observing off: float, and the scales as they are."""
    for fake_quant in fake_quants:
        fake_quant.disable_fake_quant()
        fake_quant.disable_observer()


def alone(network: nn.Module, group: Group) -> nn.Module:
    """Switch off every fake-quant of the QAT ``network`` but those keeping ``group`` float drops (observers too).

    The network then loses only what that group's quantizers lose: the candidates of the accuracy-budget search are
    ranked by it (the AIMET / NNCF way: what the user's metric loses when that one alone is quantized).
    """
    kept = {id(fake_quant) for fake_quant in _dropped(network, [group]).values()}
    for _, fake_quant in ao.fake_quant_modules(network):
        if id(fake_quant) not in kept:
            fake_quant.disable_fake_quant()
        fake_quant.disable_observer()
    return network


def _dropped(network: nn.Module, chosen: Iterable[Group]) -> dict[str, ao.FakeQuantizeBase]:
    """The fake-quants (by name) the int8 conversion keeping ``chosen`` float drops (see :func:`train_float`)."""
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
    return off


def dropped_quantizers(graph_module: torch.fx.GraphModule, floating: Collection[str]) -> list[str]:
    """The fake-quant modules of a QAT graph that keeping its ``floating`` nodes float drops.

    Each activation fake-quant whose every call has only float nodes (or the network's output) on both sides, and in
    a captured (PT2E) graph the weight fake-quant of each float convolution / linear call.
    """
    modules = dict(graph_module.named_modules(remove_duplicate=False))
    same = _shared(modules)
    inside: dict[str, bool] = {}  # by the first name of each module: one called under several names is one
    weights: set[str] = set()
    for node in graph_module.graph.nodes:
        if _is_fake_quant(modules, node):
            ends = (*node.all_input_nodes, *node.users)
            here = all(n.name in floating or n.op == "output" for n in ends)
            key = same[str(node.target)]
            inside[key] = inside.get(key, True) and here
        elif node.name in floating and _is_layer_call(modules, node):
            weights.add(str(node.args[1].target))
    dropped = {target for target, key in same.items() if inside.get(key, False)}
    return sorted(dropped | weights)


def _shared(modules: dict[str, nn.Module]) -> dict[str, str]:
    """Each fake-quant module's name -> the first name of the same module.

    FX gives a pooling's or a flatten's output the module of its input (one scale): switched off, it is off at every
    call, so it goes only when all of them go.
    """
    first: dict[int, str] = {}
    return {name: first.setdefault(id(module), name) for name, module in modules.items() if ao.is_fake_quant(module)}
