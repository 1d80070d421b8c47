"""The PT2E-prepared graph as a module Lightning can train: :class:`ExportedQAT` (torch only, no torchao).

An exported module refuses ``train()``/``eval()``; torchao's own switch rewrites every BatchNorm with the default
``eps``/``momentum`` and every dropout with ``p=0.5`` (pytorch/ao#2980). :class:`ExportedQAT` flips only the
``training`` argument of the graph's batch-norm and dropout calls, and what the capture took from ``self.training``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

BATCH_NORM = "aten.batch_norm.default"
LAYER_CALLS = ("aten.conv1d.default", "aten.conv2d.default", "aten.conv3d.default", "aten.linear.default")
_DROPOUTS = (  # in place too: torchvision's classifiers use nn.Dropout(inplace=True)
    "aten.dropout.default",
    "aten.dropout_.default",
    "aten.feature_dropout.default",
    "aten.feature_dropout_.default",
    "aten.alpha_dropout.default",
    "aten.alpha_dropout_.default",
)


class ExportedQAT(nn.Module):
    """A captured, PT2E-prepared network that Lightning can switch between ``train()`` and ``eval()``.

    ``exported`` is the ``torch.fx.GraphModule`` torchao prepared, for ``backend``'s quantizer. Switching flips the
    ``training`` argument of its batch-norm calls (never once :meth:`freeze_bn` ran) and of its dropout calls, and the
    ``+= 1`` of each ``num_batches_tracked`` (``+= 0`` in eval): ``eps``, ``momentum`` and ``p`` stay the network's
    own.

    Decisions the network made in Python from ``self.training`` were captured as their training branch (the capture
    runs in training mode); the two kinds in timm's and torchvision's code are rewritten to follow the mode too: the
    keep probability of a stochastic-depth mask (``bernoulli_(keep)`` and the ``div_(keep)`` after it: 1.0 in eval,
    all kept) and an attention's ``dropout_p`` (``F.scaled_dot_product_attention(..., dropout_p=p if self.training
    else 0.0)``: 0.0 in eval).
    """

    def __init__(self, exported: torch.fx.GraphModule, backend: str = "x86") -> None:
        super().__init__()
        self.exported = exported
        self.backend = backend  # whose quantizer annotated it: the engine that owns it (x86's or XNNPACK's)
        self.bn_frozen = False
        # (node name, argument, its value in training): names, not nodes, so that a deep copy does not walk the graph
        self._captured = [(node.name, at, value) for node, at, value in _train_only(exported.graph)]
        self._switch(True)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The captured network's forward."""
        return self.exported(*args, **kwargs)

    def train(self, mode: bool = True) -> ExportedQAT:
        """Switch batch norm and dropout; every submodule's ``training`` flag follows (torch's ``train`` raises)."""
        for module in self.modules():
            module.training = mode
        self._switch(mode)
        return self

    def freeze_bn(self) -> None:
        """BatchNorm normalizes with its running statistics and stops updating them, in training too."""
        self.bn_frozen = True
        self._switch(self.training)

    def _switch(self, mode: bool) -> None:
        changed = False
        for node in self.exported.graph.nodes:
            where = _switched_arg(node)
            if where is None:
                continue
            index, batch_norm = where
            value: bool | int = mode and not (batch_norm and self.bn_frozen)
            if batch_norm and index == 1:  # num_batches_tracked += 1 while statistics update, += 0 otherwise
                value = int(value)
            if node.args[index] != value or type(node.args[index]) is not type(value):
                node.update_arg(index, value)
                changed = True
        nodes = {node.name: node for node in self.exported.graph.nodes} if self._captured else {}
        for name, at, trained in self._captured:
            node, kept = nodes[name], trained if mode else _EVAL_VALUE[str(nodes[name].target)]
            if isinstance(at, str) and node.kwargs.get(at) != kept:
                node.update_kwarg(at, kept)
                changed = True
            elif isinstance(at, int) and node.args[at] != kept:
                node.update_arg(at, kept)
                changed = True
        if changed:
            self.exported.recompile()


_BERNOULLI = "aten.bernoulli_.float"
_ATTENTION = "aten.scaled_dot_product_attention.default"
# What a decision on `self.training` gives in eval: the mask keeps everything (and divides by 1), no attention dropout.
_EVAL_VALUE = {_BERNOULLI: 1.0, "aten.div_.Tensor": 1.0, "aten.div.Tensor": 1.0, _ATTENTION: 0.0}


def _train_only(graph: torch.fx.Graph) -> list[tuple[torch.fx.Node, int | str, float]]:
    """The arguments a capture in training mode took from ``self.training``: ``(node, index or keyword, value)``."""
    found: list[tuple[torch.fx.Node, int | str, float]] = []
    for node in graph.nodes:
        target = str(node.target)
        if target == _BERNOULLI and len(node.args) == 1 and not node.kwargs:  # export drops p's default, 0.5
            node.args = (node.args[0], 0.5)
        if target == _BERNOULLI and len(node.args) > 1 and isinstance(node.args[1], float) and node.args[1] < 1.0:
            keep = node.args[1]
            found.append((node, 1, keep))
            found += [
                (user, 1, keep)
                for user in node.users
                if str(user.target) in _EVAL_VALUE and user.args[0] is node and user.args[1:2] == (keep,)
            ]
        elif target == _ATTENTION:
            at: int | str = 4 if len(node.args) > 4 else "dropout_p"
            p = node.args[4] if at == 4 else node.kwargs.get("dropout_p", 0.0)
            if isinstance(p, float) and p > 0.0:
                found.append((node, at, p))
    return found


def _switched_arg(node: torch.fx.Node) -> tuple[int, bool] | None:
    """Which argument of ``node`` follows train/eval: ``(index, of a batch norm)``, or ``None``."""
    if node.op != "call_function":
        return None
    target = str(node.target)
    if target == BATCH_NORM:
        return 5, True
    if target in _DROPOUTS:
        return 2, False
    first = node.args[0] if node.args else None
    counter = (
        isinstance(first, torch.fx.Node) and first.op == "get_attr" and str(first.target).endswith("batches_tracked")
    )
    return (1, True) if target == "aten.add_.Tensor" and counter else None


def inference_only(graph_module: torch.fx.GraphModule) -> int:
    """Take out of an int8 graph in eval what does nothing at inference; returns how many calls.

    The ``num_batches_tracked`` updates (``+= 0`` in eval) and the dropouts switched off: a program that mutates a
    buffer keeps the update out of ExecuTorch's XNNPACK delegate (an ``add`` in the portable kernels on every call),
    and ExecuTorch's decompositions turn a dropout into a random mask whatever its ``train`` argument says.
    """
    dropped = 0
    for node in list(graph_module.graph.nodes):
        switched = _switched_arg(node)
        if switched is None or str(node.target) == BATCH_NORM or node.args[switched[0]] not in (0, False):
            continue  # not a dropout or a counter, or one in training
        if str(node.target) in _DROPOUTS:
            node.replace_all_uses_with(node.args[0])
        if not node.users:
            graph_module.graph.erase_node(node)
            dropped += 1
    graph_module.graph.eliminate_dead_code()
    graph_module.recompile()
    return dropped
