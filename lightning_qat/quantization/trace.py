"""Tracing a network for FX quantization, and the rewrites of its graph that must come before torch's fusion.

FX traces a module it does not treat as a leaf into the functions its ``forward`` calls, with ``self.training`` read
once, at trace time. A dropout traced in training mode would drop activations in the int8 model; a BatchNorm subclass
that calls ``F.batch_norm`` itself (timm's ``BatchNormAct2d``, which then applies its activation) would normalize
with batch statistics in evaluation, forever, and torch's fuser, which matches module types, would not fold it into
the convolution before it. Each such call becomes a module call again: dropouts their ``nn.Dropout*`` module, a
``F.batch_norm`` on a BatchNorm's own buffers that BatchNorm as a plain ``nn.BatchNorm{1,2,3}d`` (same tensors, same
children), which then follows ``train()``/``eval()`` and fuses with its convolution.

The tracer also goes where torch.fx alone stops: a condition on input shapes is decided for the example input, a
``Sequential`` sliced on the fly is traced through, and a same-padding convolution pads statically for its input
size. Traced asserts and identities, which would keep the fuser from matching, are dropped, and ``torch.relu``
becomes the ``F.relu`` torch's fuser matches.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_qat.quantization import compat

# Modules whose forward passes `self.training` to a function: traced, FX would bake the flag in as a constant.
# Parameter-free modules of other packages that read `self.training` are found by :func:`train_eval_leaves`.
TRAIN_EVAL_LEAVES: tuple[type[nn.Module], ...] = (torchvision.ops.StochasticDepth,)

# Functionals whose behaviour depends on a training flag: (function, module class, argument names of the module).
_TRAIN_EVAL_FUNCTIONS: tuple[tuple[Any, type[nn.Module], tuple[str, ...]], ...] = (
    (F.dropout, nn.Dropout, ("p",)),
    (F.dropout1d, nn.Dropout1d, ("p",)),
    (F.dropout2d, nn.Dropout2d, ("p",)),
    (F.dropout3d, nn.Dropout3d, ("p",)),
    (F.alpha_dropout, nn.AlphaDropout, ("p",)),
    (F.feature_alpha_dropout, nn.FeatureAlphaDropout, ("p",)),
    (torchvision.ops.stochastic_depth, torchvision.ops.StochasticDepth, ("p", "mode")),
)

_PLAIN_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_BATCH_NORM_TENSORS = ("running_mean", "running_var", "weight", "bias")


@dataclass
class Traced:
    """A traced network after :func:`trace`: the graph module and what the rewrites changed."""

    module: torch.fx.GraphModule
    train_eval_calls: int = 0  # dropout-like calls that follow the mode again
    batch_norms: list[str] = field(default_factory=list)  # BatchNorm subclasses now called as plain BatchNorms
    same_padding: list[str] = field(default_factory=list)  # same-padding convolutions, now padded statically
    specialized: list[str] = field(default_factory=list)  # conditions on input shapes decided for the example input


def train_eval_leaves(network: nn.Module) -> list[type[nn.Module]]:
    """:data:`TRAIN_EVAL_LEAVES` and the parameter-free module classes of ``network`` whose forward reads the mode.

    timm's ``DropPath`` or a user's own stochastic layer: traced, their ``self.training`` would be baked in.
    """
    found = set(TRAIN_EVAL_LEAVES)
    for module in network.modules():
        kind = type(module)
        if kind in found or kind.__module__.startswith("torch.") or next(module.parameters(), None) is not None:
            continue
        try:
            source = inspect.getsource(kind.forward)
        except (OSError, TypeError):
            continue
        if "self.training" in source:
            found.add(kind)
    return sorted(found, key=lambda t: t.__qualname__)


def own_forward_convs(network: nn.Module) -> list[type[nn.Module]]:
    """The ``nn.Conv2d`` subclasses in ``network`` with a forward of their own (timm's ``Conv2dSame``).

    FX would trace into them, and a padding computed from the input's size at run time does not trace: they are
    leaves, turned into a static pad and a plain convolution where :func:`trace` can (else they stay float).
    """
    return sorted(
        {type(m) for m in network.modules() if isinstance(m, nn.Conv2d) and type(m).forward is not nn.Conv2d.forward},
        key=lambda t: t.__qualname__,
    )


_SHAPE_ATTRIBUTES = ("shape", "ndim")
_SHAPE_METHODS = ("size", "dim")


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer with extra leaf classes, and control flow on input shapes decided for the example inputs.

    A condition that reads only shapes (``if h % 32 != 0: raise ...``, segmentation_models_pytorch's input check)
    is evaluated on ``example_inputs`` and the branch taken is traced; one that reads tensor values still raises
    torch.fx's ``TraceError``. The conditions decided are in :attr:`specialized`.
    """

    def __init__(self, leaves: Sequence[type[nn.Module]], example_inputs: tuple[Any, ...] | None = None) -> None:
        super().__init__()
        self.leaves = tuple(leaves)
        self.example_inputs = example_inputs
        self.specialized: list[str] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, module_qualified_name)

    def path_of_module(self, mod: nn.Module) -> str:
        """Its qualified name; a ``Sequential`` made on the fly (``self.features[:2]``) is traced through, unnamed.

        Its children are registered modules, called under their own names.
        """
        try:
            return super().path_of_module(mod)
        except NameError:
            if type(mod) is not nn.Sequential:
                raise
            return "_sliced_sequential"

    def to_bool(self, obj: torch.fx.Proxy) -> bool:
        if self.example_inputs is None or not _reads_only_shapes(obj.node):
            return super().to_bool(obj)
        needed = _ancestors(obj.node)
        if any(n.op == "call_module" for n in needed):  # a module's output shape: running the module
            return super().to_bool(obj)  # inside the trace would record it; not decided (the eager fallback, as before)
        value = bool(_evaluate(self.root, self.graph, obj.node, needed, self.example_inputs))
        self.specialized.append(f"{_describe(obj.node)} -> {value}")
        return value


def _reads_only_shapes(node: torch.fx.Node) -> bool:
    """Whether ``node`` depends on tensors through their shapes only (``x.shape``, ``x.size()``, ``x.dim()``)."""
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.op == "call_function" and current.target is getattr and current.args[1] in _SHAPE_ATTRIBUTES:
            continue
        if current.op == "call_method" and current.target in _SHAPE_METHODS:
            continue
        if current.op in ("placeholder", "get_attr", "call_module"):
            return False  # a tensor's values (or a module's output) reach the condition
        stack.extend(current.all_input_nodes)
    return True


def _evaluate(
    root: nn.Module,
    graph: torch.fx.Graph,
    node: torch.fx.Node,
    needed: set[torch.fx.Node],
    example_inputs: tuple[Any, ...],
) -> Any:
    """The value of ``node`` (of the graph being traced) on ``example_inputs``: its ancestors (``needed``) run."""
    partial = torch.fx.Graph()
    copies: dict[torch.fx.Node, torch.fx.Node] = {}
    for original in graph.nodes:
        if original.op == "placeholder" or original in needed:
            copies[original] = partial.node_copy(original, lambda n: copies[n])
    partial.output(copies[node])
    with torch.no_grad():  # forward, not __call__: the tracer in progress would record the call
        return torch.fx.GraphModule(root, partial).forward(*example_inputs)


def _ancestors(node: torch.fx.Node) -> set[torch.fx.Node]:
    found, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current not in found:
            found.add(current)
            stack.extend(current.all_input_nodes)
    return found


def _describe(node: torch.fx.Node) -> str:
    """A condition node as its graph line would read: ``mod(getitem, 32) != 0``, short."""
    args = ", ".join(a.name if isinstance(a, torch.fx.Node) else repr(a) for a in node.args)
    target = getattr(node.target, "__name__", str(node.target))
    return f"{target}({args})"


def trace(
    network: nn.Module, leaves: Sequence[type[nn.Module]] = (), example_inputs: tuple[Any, ...] | None = None
) -> Traced:
    """Symbolically trace ``network`` (``leaves`` not traced into) and rewrite its train/eval-dependent calls.

    With ``example_inputs``, same-padding convolutions (:func:`own_forward_convs`) pad statically for their size, and
    control flow on input shapes takes the branch the example inputs take.

    Raises:
        Exception: whatever torch.fx raises for a network it cannot trace.
    """
    own_forward = own_forward_convs(network)
    tracer = _Tracer((*train_eval_leaves(network), *leaves, *own_forward), example_inputs)
    graph = tracer.trace(network)
    module = torch.fx.GraphModule(tracer.root, graph, type(network).__name__)
    _drop_no_ops(module)
    batch_norms = _batch_norm_calls_to_modules(module, network)
    calls = _train_eval_calls_to_modules(module)
    same = _same_padding_to_static(module, _conv_inputs(network, own_forward, example_inputs)) if own_forward else []
    module.graph.lint()
    module.recompile()
    return Traced(module, calls, batch_norms, same, tracer.specialized)


def _conv_inputs(
    network: nn.Module, classes: Sequence[type[nn.Module]], example_inputs: tuple[Any, ...] | None
) -> dict[str, torch.Tensor]:
    """The input each convolution of ``classes`` gets in one eval forward pass on ``example_inputs``."""
    if example_inputs is None:
        return {}
    seen: dict[str, torch.Tensor] = {}
    wanted = tuple(classes)
    handles = [
        module.register_forward_pre_hook(lambda _m, args, name=name: seen.setdefault(name, args[0].detach()))
        for name, module in network.named_modules()
        if isinstance(module, wanted)
    ]
    run_once(network, example_inputs, handles)
    return seen


def run_once(network: nn.Module, example_inputs: tuple[Any, ...], handles: Sequence[RemovableHandle] = ()) -> None:
    """One forward pass of ``network`` in eval mode without gradients, then its mode back and ``handles`` removed."""
    was_training = network.training
    network.eval()
    try:
        with torch.no_grad():
            network(*example_inputs)
    finally:
        network.train(was_training)
        for handle in handles:
            handle.remove()


def _same_padding_to_static(graph_module: torch.fx.GraphModule, inputs: dict[str, torch.Tensor]) -> list[str]:
    """Each convolution that pads "same" at run time becomes a static pad and a plain convolution for its input size.

    TensorFlow's rule, for the size the convolution got in ``inputs``: a static ``nn.ZeroPad2d`` before a plain
    ``nn.Conv2d`` holding the same tensors, which quantizes and fuses with its BatchNorm. The pad itself runs in float
    (torch's FX lowering keeps only the ops it lists in int8). Checked against the convolution's own output; one
    that computes anything else stays a float leaf. Returns the convolutions' names.
    """
    graph = graph_module.graph
    rewritten = []
    for node in list(graph.nodes):
        x = inputs.get(str(node.target)) if node.op == "call_module" else None
        if x is None:
            continue
        name = str(node.target)
        conv = graph_module.get_submodule(name)
        assert isinstance(conv, nn.Conv2d)
        pad, plain = _static_same_padding(conv, x)
        if pad is None:
            continue
        pad_name = f"{name}_same_pad".replace(".", "_")
        graph_module.add_submodule(pad_name, pad)
        compat.set_submodule(graph_module, name, plain)
        with graph.inserting_before(node):
            padded = graph.call_module(pad_name, (node.args[0],))
        node.args = (padded, *node.args[1:])
        rewritten.append(name)
    return rewritten


def _static_same_padding(conv: nn.Conv2d, x: torch.Tensor) -> tuple[nn.ZeroPad2d | None, nn.Conv2d]:
    """The static zero pad and plain convolution that compute what ``conv`` computes on inputs of ``x``'s size."""
    pads = []
    for size, k, s, d in zip(x.shape[-2:], conv.kernel_size, conv.stride, conv.dilation, strict=True):
        total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        pads.append((total // 2, total - total // 2))
    (top, bottom), (left, right) = pads
    pad = nn.ZeroPad2d((left, right, top, bottom))
    kernel, stride, dilation = conv.kernel_size, conv.stride, conv.dilation  # pairs, as a Conv2d stores them
    plain = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        (kernel[0], kernel[1]),
        (stride[0], stride[1]),
        0,
        (dilation[0], dilation[1]),
        conv.groups,
        bias=conv.bias is not None,
    )
    plain.weight, plain.bias = conv.weight, conv.bias
    plain.train(conv.training)
    with torch.no_grad():
        expected, actual = conv(x), plain(pad(x))
    same = expected.shape == actual.shape and bool(torch.allclose(actual, expected, rtol=1e-4, atol=1e-5))
    return (pad if same else None), plain


# Spellings of a function that torch's FX quantization knows only as another: (that function, in place).
_TORCH_FUSES_AS: dict[Any, tuple[Any, bool]] = {
    torch.relu: (F.relu, False),
    torch.relu_: (F.relu, True),
    F.relu_: (F.relu, True),
}


def _drop_no_ops(graph_module: torch.fx.GraphModule) -> None:
    """Remove traced calls that compute nothing, and name ReLUs as torch's fuser knows them.

    Dropped: ``torch._assert`` checks (timm's ``x.ndim == 4``) and ``nn.Identity``. The ``ndim`` an assert reads is a
    second use of a convolution's output, and an identity between a BatchNorm and its ReLU (timm's ``drop``) breaks
    the Conv-BN-ReLU chain: either keeps torch's fuser from folding them. ``torch.relu(x)`` becomes ``F.relu(x)``:
    torch neither fuses nor quantizes the former (it ran in float between a dequantize and a quantize).
    """
    graph = graph_module.graph
    modules = dict(graph_module.named_modules())
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch._assert:
            graph.erase_node(node)
        elif node.op == "call_function" and node.target in _TORCH_FUSES_AS:
            node.target, inplace = _TORCH_FUSES_AS[node.target]
            if inplace:
                node.kwargs = {**node.kwargs, "inplace": True}
        elif node.op == "call_module" and type(modules.get(node.target)) is nn.Identity and len(node.args) == 1:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    graph.eliminate_dead_code()


def _train_eval_calls_to_modules(graph_module: torch.fx.GraphModule) -> int:
    """Replace each traced dropout-like function call by its module, so ``eval()`` turns it off again.

    A call traced with ``training=False`` stays as it is (it does nothing in either mode). Returns how many calls were
    replaced.
    """
    replaced = 0
    graph = graph_module.graph
    for node in list(graph.nodes):
        match = next((m for m in _TRAIN_EVAL_FUNCTIONS if node.op == "call_function" and node.target is m[0]), None)
        if match is None:
            continue
        function, module_class, names = match
        bound = inspect.signature(function).bind(*node.args, **node.kwargs)
        bound.apply_defaults()
        if bound.arguments.get("training") is False:
            continue
        name = f"qat_{module_class.__name__.lower()}_{replaced}"
        graph_module.add_submodule(name, module_class(*(bound.arguments[n] for n in names)))
        with graph.inserting_before(node):
            call = graph.call_module(name, (bound.arguments["input"],))
        node.replace_all_uses_with(call)
        graph.erase_node(node)
        replaced += 1
    return replaced


def _batch_norm_calls_to_modules(graph_module: torch.fx.GraphModule, network: nn.Module) -> list[str]:
    """Replace each ``F.batch_norm`` on a BatchNorm module's own tensors by a call of that BatchNorm, made plain.

    ``network`` is the module that was traced: the graph module holds only the tensors it reads, not their module.
    Returns the BatchNorms' qualified names.
    """
    graph = graph_module.graph
    replaced = []
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not F.batch_norm:
            continue
        bound = inspect.signature(F.batch_norm).bind(*node.args, **node.kwargs)
        owner = _owner(bound.arguments, network)
        if owner is None:
            continue
        name, module = owner
        compat.set_submodule(graph_module, name, _plain_batch_norm(module))
        _hoist_children(graph_module, name, module)
        with graph.inserting_before(node):
            call = graph.call_module(name, (bound.arguments["input"],))
        node.replace_all_uses_with(call)
        graph.erase_node(node)
        replaced.append(name)
    for node in list(graph.nodes):  # the BatchNorm counts its batches itself now: drop the traced `add_(1)`
        if node.op == "call_method" and node.target == "add_" and _counter_of(node.args[0], replaced):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    graph.eliminate_dead_code()
    return replaced


def _owner(arguments: dict[str, Any], network: nn.Module) -> tuple[str, nn.modules.batchnorm._BatchNorm] | None:
    """The BatchNorm whose running statistics (and affine parameters) a traced ``F.batch_norm`` call reads."""
    targets = []
    for key in _BATCH_NORM_TENSORS:
        value = arguments.get(key)
        if value is None:
            continue
        if not isinstance(value, torch.fx.Node) or value.op != "get_attr":
            return None
        targets.append(str(value.target))
    prefixes = {target.rpartition(".")[0] for target in targets}
    if len(targets) < 2 or len(prefixes) != 1:  # running statistics at least, all of one module
        return None
    (prefix,) = prefixes
    try:
        module = network.get_submodule(prefix)
    except AttributeError:
        return None
    if not isinstance(module, _PLAIN_BATCH_NORMS) or not module.track_running_stats:
        return None
    return prefix, module


def _counter_of(node: Any, names: list[str]) -> bool:
    return (
        isinstance(node, torch.fx.Node)
        and node.op == "get_attr"
        and node.target in {f"{name}.num_batches_tracked" for name in names}
    )


def _plain_batch_norm(module: nn.modules.batchnorm._BatchNorm) -> nn.modules.batchnorm._BatchNorm:
    """Torch's own BatchNorm class for ``module`` (a subclass of it), holding the same tensors and children."""
    plain_class = next(c for c in type(module).__mro__ if c in _PLAIN_BATCH_NORMS)
    plain = plain_class(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
    plain.weight, plain.bias = module.weight, module.bias
    plain.running_mean, plain.running_var = module.running_mean, module.running_var
    plain.num_batches_tracked = module.num_batches_tracked
    plain.train(module.training)
    return plain


def _hoist_children(graph_module: torch.fx.GraphModule, name: str, module: nn.Module) -> None:
    """Move the children of the BatchNorm ``name`` (timm's ``act`` and ``drop``) beside it: ``bn2.act`` -> ``bn2_act``.

    The graph calls them after the norm. Left inside it, they would be lost wherever torch swaps the BatchNorm for
    another module: a BatchNorm no convolution precedes (after a mixed-kernel convolution's ``cat``) becomes a
    quantized BatchNorm at conversion, without children, and the graph would call a module that no longer exists.
    """
    parent_name, _, leaf = name.rpartition(".")
    parent = graph_module.get_submodule(parent_name)
    moved = {}
    for child_name, child in module.named_children():
        hoisted = f"{leaf}_{child_name}"
        while hasattr(parent, hoisted):
            hoisted += "_"
        parent.add_module(hoisted, child)
        moved[f"{name}.{child_name}"] = f"{parent_name}.{hoisted}" if parent_name else hoisted
    for node in graph_module.graph.nodes:
        if node.op not in ("call_module", "get_attr"):
            continue
        for old, new in moved.items():
            if node.target == old or str(node.target).startswith(f"{old}."):
                node.target = new + str(node.target)[len(old) :]


def conv_bn_pairs(graph_module: torch.fx.GraphModule) -> list[tuple[str, str, str]]:
    """Every convolution whose output a BatchNorm normalizes, before fusion: (conv, BatchNorm, why it cannot fuse).

    The reason is ``""`` when torch's fuser can fold the pair: the BatchNorm is the convolution's only user.
    """
    modules = dict(graph_module.named_modules())
    pairs = []
    for node in graph_module.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.modules.batchnorm._BatchNorm):
            continue
        conv = node.args[0] if node.args else None
        if not isinstance(conv, torch.fx.Node) or conv.op != "call_module":
            continue
        if not isinstance(modules.get(conv.target), nn.modules.conv._ConvNd):
            continue
        why = "" if len(conv.users) == 1 else "the convolution's output is also used elsewhere"
        pairs.append((str(conv.target), str(node.target), why))
    return pairs
