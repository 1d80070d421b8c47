"""FX graph passes run on a prepared network.

Fake-quants on integer tensors are dropped, parameter views cloned, and the inputs of a ``torch.cat`` share one
quantizer (its int8 form takes the first input's scale).
"""

from __future__ import annotations

import copy
import operator
from typing import Any

import torch

from lightning_qat.quantization import ao


class _IntegerFakeQuantFinder(torch.fx.Interpreter):
    """Runs the graph, passing non-float values (integer tensors, shapes) through fake-quant modules, noting where."""

    def __init__(self, module: torch.fx.GraphModule) -> None:
        super().__init__(module)
        self.graph_module = module
        self.integer_nodes: list[str] = []

    def run_node(self, n: torch.fx.Node) -> Any:
        if _is_fake_quant_call(self.graph_module, n):
            value = self.env[n.args[0]] if isinstance(n.args[0], torch.fx.Node) else n.args[0]
            if not (isinstance(value, torch.Tensor) and value.is_floating_point()):  # ids, masks, shape tuples
                self.integer_nodes.append(n.name)
                return value
        return super().run_node(n)


def drop_fake_quant_of_integer_tensors(graph_module: torch.fx.GraphModule, example_inputs: tuple[Any, ...]) -> int:
    """Remove the fake-quant FX put on integer tensors and on values that are not tensors; returns how many.

    FX decides where to quantize from the ops alone, so an integer tensor computed in the graph (token ids, masks,
    ``.long()`` results) can get a float-only fake-quant (a dtype error on the first batch), and so can a ``mul`` of
    Python numbers (a window size times 2 in timm's Swin: a tuple). Found by running a copy once on
    ``example_inputs``.
    """
    probe = copy.deepcopy(graph_module).eval()  # eval: a batch of one through BatchNorm
    finder = _IntegerFakeQuantFinder(probe)
    with ao.quiet(), torch.no_grad():
        finder.run(*example_inputs)
    if not finder.integer_nodes:
        return 0
    nodes = {node.name: node for node in graph_module.graph.nodes}
    dropped = set()
    for name in finder.integer_nodes:
        node = nodes[name]
        dropped.add(str(node.target))
        node.replace_all_uses_with(node.args[0])
        graph_module.graph.erase_node(node)
    graph_module.graph.eliminate_dead_code()
    graph_module.delete_all_unused_submodules()
    _delete_uncalled(graph_module, dropped)
    return len(finder.integer_nodes)


# Ops an int8 tensor passes through with its scale (conversion drops the fake-quants FX puts after them).
_SHAPE_METHODS = {"reshape", "view", "view_as", "permute", "transpose", "flatten", "unflatten", "contiguous", "squeeze"}
_SHAPE_METHODS |= {"unsqueeze", "expand", "expand_as"}
_SHAPE_FUNCTIONS = (operator.getitem, torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze)
_CATS = (torch.cat, torch.concat, torch.concatenate)


def _is_fake_quant_call(graph_module: torch.fx.GraphModule, node: Any) -> bool:
    return (
        isinstance(node, torch.fx.Node)
        and node.op == "call_module"
        and ao.is_fake_quant(graph_module.get_submodule(str(node.target)))
    )


def _before_shape_ops(value: Any) -> Any:
    """What ``value`` is computed from through shape ops only (``expand``, ``reshape``, ``x[:, 0]``): itself if none."""
    while isinstance(value, torch.fx.Node) and (
        (value.op == "call_method" and value.target in _SHAPE_METHODS)
        or (value.op == "call_function" and value.target in _SHAPE_FUNCTIONS)
    ):
        value = value.args[0]
    return value


def _delete_uncalled(graph_module: torch.fx.GraphModule, targets: set[str]) -> None:
    """Delete the submodules among ``targets`` the graph no longer calls, and recompile."""
    called = {str(node.target) for node in graph_module.graph.nodes if node.op == "call_module"}
    for target in sorted(targets - called):  # delete_all_unused_submodules can leave them behind
        graph_module.delete_submodule(target)
    graph_module.recompile()


def copy_parameter_views(graph_module: torch.fx.GraphModule) -> int:
    """Feed each fake-quant that observes a view of a parameter (a class token ``expand``-ed to the batch) a copy.

    Under ``torch.no_grad`` such a view is a leaf that requires grad and has no grad function, and torch's module
    tracker (``FlopCounterMode``: Lightning's model summary with an ``example_input_array``) fails on any module it
    enters ("Expected gradient function to be set"). The float network passes it to a function, never to a module;
    the fake-quant FX puts on it is a module. A ``clone`` changes neither the values nor the gradients. Returns how
    many.
    """
    count = 0
    for node in list(graph_module.graph.nodes):
        if not _is_fake_quant_call(graph_module, node):
            continue
        source = _before_shape_ops(node.args[0])
        if source is not node.args[0] and isinstance(source, torch.fx.Node) and source.op == "get_attr":
            with graph_module.graph.inserting_before(node):
                copied = graph_module.graph.call_method("clone", (node.args[0],))
            node.replace_input_with(node.args[0], copied)
            count += 1
    if count:
        graph_module.recompile()
    return count


def share_cat_quantizers(graph_module: torch.fx.GraphModule) -> int:
    """Give the fake-quantized inputs of each ``torch.cat`` one quantizer; returns how many quantizers were merged.

    torch's int8 ``torch.cat`` takes the first input's scale for all of them: an input quantized with another scale
    (a ViT's class token next to its patch embeddings: 0.1011 against 0.1021) is rescaled wrongly and clipped, which
    the fake-quant network never did (torch warns "All inputs of this cat operator must share the same quantization
    parameters"). The scale an int8 input carries is the one of the fake-quant before its shape ops (``reshape``,
    ``permute``: int8 tensors pass through them, conversion drops the fake-quants FX puts after them), so those
    quantizers, and every one after their shape ops, become one module: the same scale in QAT and in int8.
    """

    def root(node: torch.fx.Node) -> torch.fx.Node:  # the fake-quant whose scale ``node``'s int8 value keeps
        source = _before_shape_ops(node.args[0])
        return root(source) if _is_fake_quant_call(graph_module, source) else node

    merged: dict[str, str] = {}

    def find(target: str) -> str:
        while merged.get(target, target) != target:
            target = merged[target]
        return target

    for node in graph_module.graph.nodes:
        if node.op == "call_function" and node.target in _CATS and isinstance(node.args[0], (list, tuple)):
            targets = [find(str(root(arg).target)) for arg in node.args[0] if _is_fake_quant_call(graph_module, arg)]
            for target in targets[1:]:
                if target != targets[0]:
                    merged[target] = targets[0]
    moved = set()
    for node in graph_module.graph.nodes:
        if (
            merged
            and _is_fake_quant_call(graph_module, node)
            and (target := find(str(root(node).target))) != node.target
        ):
            moved.add(str(node.target))
            node.target = target
    if moved:
        _delete_uncalled(graph_module, moved)
    return len(moved)
