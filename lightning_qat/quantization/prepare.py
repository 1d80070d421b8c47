"""Preparing a float network for QAT: which module, FX graph mode or eager fallback, fusion, skip lists."""

from __future__ import annotations

import copy
import difflib
import operator
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

from lightning_qat.quantization import ao, compat, pt2e
from lightning_qat.quantization.attention import decompose_attention, restore
from lightning_qat.quantization.inputs import map_tensors
from lightning_qat.quantization.trace import conv_bn_pairs, own_forward_convs, run_once, trace, train_eval_leaves

Mode = Literal["auto", "fx", "eager", "pt2e"]

# Module type sequences eager fusion understands, longest first so Conv+BN+ReLU wins over Conv+BN.
_FUSION_PATTERNS: tuple[tuple[type[nn.Module], ...], ...] = (
    (nn.Conv1d, nn.BatchNorm1d, nn.ReLU),
    (nn.Conv2d, nn.BatchNorm2d, nn.ReLU),
    (nn.Conv3d, nn.BatchNorm3d, nn.ReLU),
    (nn.Conv1d, nn.BatchNorm1d),
    (nn.Conv2d, nn.BatchNorm2d),
    (nn.Conv3d, nn.BatchNorm3d),
    (nn.Conv1d, nn.ReLU),
    (nn.Conv2d, nn.ReLU),
    (nn.Conv3d, nn.ReLU),
    (nn.Linear, nn.BatchNorm1d),
    (nn.Linear, nn.ReLU),
)


@dataclass
class Prepared:
    """What :func:`prepare_model` did."""

    module: nn.Module
    mode: Literal["fx", "eager", "pt2e"]
    reason: str
    num_fused: int
    relu6_replaced: int = 0
    shared: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # for the user, said by the caller (the Lightning layer)
    folded: list[str] = field(default_factory=list)  # layers whose weight norm (or other parametrization) was folded
    conv_bn_pairs: int | None = None  # convolutions followed by a BatchNorm (FX mode; None: not counted)
    conv_bn_unfused: list[str] = field(default_factory=list)  # "conv -> bn: why", for the pairs left unfused
    kept_float: dict[str, str] = field(default_factory=dict)  # layers kept float by :func:`kept_float`: name -> why
    attention: int = 0  # nn.MultiheadAttention modules decomposed so their projections are quantized (FX)


class FloatIsland(nn.Module):
    """Keeps a skipped submodule in float inside an eager-mode quantized network (dequant -> module -> quant)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.dequant = ao.DeQuantStub()
        self.module = module
        self.quant = ao.QuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the float module on dequantized input and quantize its output again."""
        return self.quant(self.module(self.dequant(x)))


class QuantizedAfter(nn.Module):
    """A layer whose int8 form returns float (a weight-only quantized ``nn.Embedding``), then quantized for the rest.

    Eager mode: the next layers of the int8 network take quantized tensors.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.quant = ao.QuantStub()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The layer, its output quantized."""
        return self.quant(self.module(*args, **kwargs))


class Unfused(nn.Module):
    """Keeps a module out of FX fusion and quantization: FX does not trace into it, so it runs in float.

    For skipped modules (``skip=``) and for modules with weights that the forward calls at several places: FX would
    fuse the BatchNorm of one call site into the shared module and use that fused module at every call site.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Call the wrapped module."""
        return self.module(*args, **kwargs)


class EagerQATWrapper(nn.Module):
    """Quantizes the inputs and dequantizes the outputs of a network prepared in eager mode.

    Every floating-point tensor of the inputs (positional, or inside tuples, lists and dicts) gets a QuantStub of its
    own, from the example inputs (the first one is ``quant``); integer tensors (ids, masks) pass through as they are.
    Every tensor of the output (alone, or in a tuple, list or dict) is dequantized.
    """

    def __init__(self, module: nn.Module, example_inputs: tuple[Any, ...] = ()) -> None:
        super().__init__()
        paths = _float_tensor_paths(example_inputs) if example_inputs else ["0"]  # integer ids only: no stub
        self._quant_of = {path: "quant" if i == 0 else f"quant_{path}" for i, path in enumerate(paths)}
        for name in self._quant_of.values():
            self.add_module(name, ao.QuantStub())
        self.module = module
        self.dequant = ao.DeQuantStub()

    def forward(self, *inputs: Any) -> Any:
        """Quantize the inputs, run the network, dequantize the outputs."""
        quantized = [self._quantize(x, str(i)) for i, x in enumerate(inputs)]
        return self._dequantize(self.module(*quantized))

    def _quantize(self, value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            name = self._quant_of.get(path)
            return getattr(self, name)(value) if name is not None and value.is_floating_point() else value
        if isinstance(value, dict):
            return {k: self._quantize(v, f"{path}_{k}") for k, v in value.items()}
        if isinstance(value, (tuple, list)):
            return type(value)(self._quantize(v, f"{path}_{i}") for i, v in enumerate(value))
        return value

    def _dequantize(self, value: Any) -> Any:
        return map_tensors(lambda x: self.dequant(x) if x.is_quantized or x.is_floating_point() else x, value)


def _float_tensor_paths(value: Any, path: str = "") -> list[str]:
    """Where the floating-point tensors of a (nested) input structure are: "0", "1", "0_image", ..."""
    if isinstance(value, torch.Tensor):
        return [path] if value.is_floating_point() else []
    if isinstance(value, dict):
        items = [(str(k), v) for k, v in value.items()]
    elif isinstance(value, (tuple, list)):
        items = [(str(i), v) for i, v in enumerate(value)]
    else:
        return []
    return [p for key, v in items for p in _float_tensor_paths(v, f"{path}_{key}" if path else key)]


def check_skip(network: nn.Module, skip: Sequence[str]) -> None:
    """Raise ``ValueError`` for a ``skip`` entry that is not a submodule name, with the closest names."""
    names = [n for n, _ in network.named_modules() if n]
    for entry in skip:
        if entry not in names:
            close = difflib.get_close_matches(entry, names, n=5)
            hint = f"did you mean one of {close}?" if close else f"valid names include {names[:10]}"
            raise ValueError(f"skip entry {entry!r} is not a submodule of the quantized network; {hint}")


def _record_leaf_calls(network: nn.Module, example_inputs: tuple[Any, ...]) -> list[tuple[str, int, int]]:
    """Run ``network`` once and record (name, input id, output id) for every leaf module call, in order."""
    calls: list[tuple[str, int, int]] = []
    handles = []
    for name, sub in network.named_modules():
        if name and not list(sub.children()):

            def hook(_m: nn.Module, args: tuple[Any, ...], out: Any, name: str = name) -> None:
                first = args[0] if args else None
                calls.append((name, id(first), id(out)))

            handles.append(sub.register_forward_hook(hook))
    run_once(network, example_inputs, handles)
    return calls


def find_fusion_groups(network: nn.Module, example_inputs: tuple[Any, ...]) -> list[list[str]]:
    """Fusable Conv+BN(+ReLU) / Linear(+ReLU) groups of ``network``, checked against a real forward pass.

    A group is fused only when its modules ran once each, back to back, each fed the previous one's output, so a
    ReLU module shared between two places (torchvision's BasicBlock) is never fused away.
    """
    modules = dict(network.named_modules())
    calls = _record_leaf_calls(network, example_inputs)
    counts: dict[str, int] = {}
    for name, _, _ in calls:
        counts[name] = counts.get(name, 0) + 1
    groups: list[list[str]] = []
    i = 0
    while i < len(calls):
        for pattern in _FUSION_PATTERNS:
            window = calls[i : i + len(pattern)]
            if len(window) < len(pattern):
                continue
            types_match = all(type(modules[n]) is t for (n, _, _), t in zip(window, pattern, strict=True))
            chained = all(window[k + 1][1] == window[k][2] for k in range(len(window) - 1))
            once = all(counts[n] == 1 for n, _, _ in window)
            if types_match and chained and once:
                groups.append([n for n, _, _ in window])
                i += len(pattern) - 1
                break
        i += 1
    return groups


def _count_fused(network: nn.Module) -> int:
    return sum(ao.is_fused_module(m) for m in network.modules())


SLOW_INT8 = 8.0  # an int8 layer this many times slower than its float form stays float (measured: 0.6-0.9x or 13x+)


def kept_float(network: nn.Module, backend: str, skip: Sequence[str] = ()) -> dict[str, str]:
    """Layers outside ``skip`` kept float because this torch's int8 kernel is wrong or slow on ``backend``: name -> why.

    ConvTranspose layers where :func:`ao.transposed_conv_int8_works` says no; depthwise convolutions of a shape whose
    :func:`ao.depthwise_slowdown` is above :data:`SLOW_INT8` (a fused BatchNorm stays float with its conv).
    """
    layers = [(n, m) for n, m in network.named_modules() if n and not any(_within(n, s) for s in skip)]
    kept: dict[str, str] = {}
    transposed = [n for n, m in layers if isinstance(m, ao.TRANSPOSED_CONVS)]
    if transposed and not ao.transposed_conv_int8_works(backend):
        kept |= dict.fromkeys(transposed, f"int8 transposed convolution is wrong on {backend!r} here")
    for name, module in layers:
        shape = ao.depthwise_shape(module)
        if shape is not None and (slowdown := ao.depthwise_slowdown(backend, shape)) > SLOW_INT8:
            kept[name] = (
                f"int8 depthwise convolution ({ao.describe_depthwise(shape)}) is {slowdown:.0f}x slower on {backend!r}"
            )
    return kept


def kept_float_warning(kept: dict[str, str], backend: str) -> list[str]:
    """What to tell the user about :func:`kept_float`'s layers, one line per reason."""
    said = []
    if any("transposed" in why for why in kept.values()):
        said.append(ao.transposed_conv_warning(backend))
    slow = [n for n, why in kept.items() if "depthwise" in why]
    if slow:
        shown = ", ".join(f"{n} ({kept[n].split('(')[1].split(')')[0]})" for n in slow[:3])
        said.append(
            f"QAT: {len(slow)} depthwise convolutions stay float, with their BatchNorm ({shown}"
            f"{', ...' if len(slow) > 3 else ''}): torch {torch.__version__}'s int8 kernel for their shape on "
            f"{backend!r} is more than {SLOW_INT8:.0f}x slower than float on this CPU (measured at start), enough to "
            "make the whole int8 network slower than float."
        )
    return said


def _prepare_eager(
    network: nn.Module,
    backend: str,
    skip: Sequence[str],
    example_inputs: tuple[Any, ...],
    qat: bool,
    kept: dict[str, str],
) -> nn.Module:
    # A network with its own QuantStub (torchvision's quantizable models) places its own quant/dequant.
    has_stubs = any(isinstance(m, ao.QuantStub) for m in network.modules())
    fuse_model = getattr(network, "fuse_model", None)
    if callable(fuse_model):
        try:
            fuse_model(is_qat=qat)
        except TypeError:
            fuse_model()
    else:
        groups = [g for g in find_fusion_groups(network, example_inputs) if not any(n in skip for n in g)]
        if groups:
            ao.fuse_modules(network, groups, qat=qat)
    islands = list(skip) + list(kept)  # float layers in the int8 region: a dequantize before, a quantize after
    for name in islands:
        island = FloatIsland(network.get_submodule(name))
        ao.set_qconfig(island.module, None)
        compat.set_submodule(network, name, island)
    for name, embedding in list(network.named_modules()):  # weight-only int8, integer ids in, float out
        if isinstance(embedding, nn.Embedding) and not any(_within(name, s) for s in islands):
            ao.set_qconfig(embedding, ao.embedding_qconfig(qat))
            compat.set_submodule(network, name, QuantizedAfter(embedding))
    wrapped = network if has_stubs else EagerQATWrapper(network, example_inputs)
    ao.set_qconfig(wrapped, ao.qconfig(backend, qat=qat))
    for module in network.modules():  # per-channel weights are not supported for transposed convolutions
        if isinstance(module, ao.TRANSPOSED_CONVS) and getattr(module, "qconfig", True) is not None:
            ao.set_qconfig(module, ao.per_tensor_weight_qconfig(backend, qat=qat))
    wrapped.train(qat)
    return ao.prepare_eager(wrapped, qat=qat)


def fold_parametrizations(network: nn.Module, skip: Sequence[str] = ()) -> list[str]:
    """Fold every weight parametrization outside ``skip`` into a plain weight, in place; returns the layers' names.

    ``torch.nn.utils.parametrizations.weight_norm`` (and the older hook-based ``torch.nn.utils.weight_norm``) make a
    layer torch's QAT modules cannot take (``ParametrizedConv2d``). Folded, the layer computes the same function from
    its current weight, and QAT trains that weight directly; the int8 layer has no parametrization either way.
    """
    folded = []
    for name, module in list(network.named_modules()):
        if any(_within(name, s) for s in skip):
            continue
        if parametrize.is_parametrized(module) and name:
            compat.set_submodule(network, name, _unparametrized(module))
            folded.append(name)
        hooks = [h for h in module._forward_pre_hooks.values() if type(h).__name__ == "WeightNorm"]
        for hook in hooks:
            torch.nn.utils.remove_weight_norm(module, hook.name)
            folded.append(name)
    return folded


def _unparametrized(module: nn.Module) -> nn.Module:
    """A new module of ``module``'s own class holding the same tensors, each parametrized one as its computed value.

    Not ``torch.nn.utils.parametrize.remove_parametrizations``: it deletes the property from the class that torch
    injected, which every deep copy of the module shares, and breaks those copies (the float baseline, say).
    """
    parametrizations = module.parametrizations
    assert isinstance(parametrizations, nn.ModuleDict)
    values = {n: getattr(module, n).detach().clone() for n in parametrizations}
    plain_class: type[nn.Module] = type(module).__bases__[0]  # parametrize injects `Parametrized<Class>(<Class>)`
    plain = plain_class.__new__(plain_class)
    plain.__dict__.update(module.__dict__)
    for registry in ("_parameters", "_buffers", "_modules"):
        plain.__dict__[registry] = dict(module.__dict__[registry])
    del plain._modules["parametrizations"]
    for n, value in values.items():
        plain._parameters[n] = nn.Parameter(value)
    return plain


ZERO_BN_WEIGHT = 1e-4


def nudge_zero_batch_norm_weights(network: nn.Module, skip: Sequence[str] = ()) -> int:
    """Set BatchNorm weights that are exactly zero (outside ``skip``) to :data:`ZERO_BN_WEIGHT`; returns how many.

    ``zero_init_residual`` (torchvision) and ``zero_init_last`` (timm) start the last BatchNorm of each residual block
    at zero. torch's fused Conv-BN QAT module scales the convolution's weight by the BN weight before quantizing it and
    divides by it afterwards: 0 / 0, NaN from the first step. A weight of 1e-4 keeps that channel's folded weights
    above the weight quantizer's smallest scale, so the channel trains, and changes its output by 1e-4 of the
    normalized activation.
    """
    kept = {id(m) for name in skip for m in network.get_submodule(name).modules()}
    count = 0
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and id(module) not in kept:
                weight = module.weight
                if isinstance(weight, torch.Tensor):
                    zeros = weight == 0
                    count += int(zeros.sum())
                    weight[zeros] = ZERO_BN_WEIGHT
    return count


def replace_relu6(network: nn.Module, skip: Sequence[str] = ()) -> int:
    """Swap every ``nn.ReLU6`` submodule of ``network`` outside ``skip`` for ``nn.ReLU``, in place; returns how many.

    torchvision's quantizable MobileNets do the same: Conv-BN-ReLU fuses into one int8 op, Conv-BN-ReLU6 does not
    (a separate clamp and one more fake-quant per layer, in training and in the int8 model). It changes the network
    where activations exceed 6; QAT fine-tuning adapts to that, and the report's float row is the original network.
    """
    kept = {id(m) for name in skip for m in network.get_submodule(name).modules()}
    count = 0
    for parent in list(network.modules()):
        if id(parent) in kept:
            continue
        for name, child in list(parent.named_children()):
            if type(child) is nn.ReLU6 and id(child) not in kept:
                setattr(parent, name, nn.ReLU(inplace=child.inplace))
                count += 1
    return count


def shared_stateful_modules(network: nn.Module, example_inputs: tuple[Any, ...]) -> list[str]:
    """The topmost modules with parameters or buffers that one forward pass of ``network`` calls more than once.

    Counted over every module, containers included, so a shared Conv-BN-ReLU block is one entry (kept float whole),
    not its members one by one (FX would fuse them apart). Found by running ``network`` once in eval mode.
    """
    counts: Counter[str] = Counter()
    handles = [
        module.register_forward_pre_hook(lambda _m, _args, name=name: counts.update([name]))
        for name, module in network.named_modules()
        if name
    ]
    run_once(network, example_inputs, handles)
    shared = sorted(name for name, count in counts.items() if count > 1 and _has_state(network.get_submodule(name)))
    return [name for name in shared if not any(_within(name, other) and name != other for other in shared)]


def _has_state(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None or next(module.buffers(), None) is not None


def float_islands(network: nn.Module) -> list[str]:
    """Names of the submodules kept in float in a prepared or converted network (skipped or shared)."""
    prefix = "module." if isinstance(network, EagerQATWrapper) else ""
    return [
        name.removeprefix(prefix)
        for name, module in network.named_modules()
        if isinstance(module, (Unfused, FloatIsland))
    ]


def _prepare_fx(
    network: nn.Module,
    backend: str,
    skip: Sequence[str],
    example_inputs: tuple[Any, ...],
    qat: bool,
    kept: dict[str, str],
) -> Prepared:
    """FX preparation, skipped and shared stateful modules wrapped in :class:`Unfused`, attention decomposed.

    On a failure the wrappers and the attention rewrites are removed again, for the eager fallback.
    """
    decomposed, attention_float = decompose_attention(network, skip)
    shared = [
        name for name in shared_stateful_modules(network, example_inputs) if not any(_within(name, s) for s in skip)
    ]
    islands = sorted(set(skip) | set(shared))
    originals = {name: network.get_submodule(name) for name in islands}
    for name in islands:
        compat.set_submodule(network, name, Unfused(originals[name]))
    try:
        traced = trace(network, (Unfused,), example_inputs)
        pairs = conv_bn_pairs(traced.module)
        mapping = ao.qconfig_mapping(backend, [n for n in kept if not any(_within(n, i) for i in islands)], qat)
        leaves = (*train_eval_leaves(network), Unfused, *own_forward_convs(traced.module))  # the ones not made static
        prepared = ao.prepare_fx(traced.module, mapping, example_inputs, qat, leaf_classes=leaves)
    except Exception:
        for name in reversed(islands):
            compat.set_submodule(network, name, originals[name])
        restore(network, decomposed)
        raise
    drop_fake_quant_of_integer_tensors(prepared, example_inputs)
    copy_parameter_views(prepared)
    share_cat_quantizers(prepared)
    for name, value in vars(network).items():  # plain attributes (`self.net.num_classes`) keep working
        if not name.startswith("_") and name != "training" and not hasattr(prepared, name):
            setattr(prepared, name, value)
    still_called = {str(node.target) for node in prepared.graph.nodes if node.op == "call_module"}
    unfused = [f"{conv} -> {bn}: {why or 'not fused by torch'}" for conv, bn, why in pairs if bn in still_called]
    said = []
    size = "x".join(str(n) for n in _spatial_size(example_inputs))
    if traced.same_padding:
        said.append(
            f"QAT: {len(traced.same_padding)} same-padding convolutions (timm's Conv2dSame) pad statically for the "
            f"example input ({size}): the QAT and int8 networks expect inputs of that size."
        )
    if traced.specialized:
        said.append(
            f"QAT: {len(traced.specialized)} conditions on input shapes were decided for the example input ({size}) "
            f"when tracing ({'; '.join(traced.specialized[:3])}): the QAT and int8 networks take those branches."
        )
    return Prepared(
        prepared,
        "fx",
        "",
        _count_fused(prepared),
        shared=shared,
        warnings=said,
        conv_bn_pairs=len(pairs),
        conv_bn_unfused=unfused,
        kept_float=attention_float,
        attention=len([m for m in decomposed.values() if isinstance(m, nn.MultiheadAttention)]),
    )


def _spatial_size(example_inputs: tuple[Any, ...]) -> tuple[int, ...]:
    first = next((x for x in example_inputs if isinstance(x, torch.Tensor) and x.dim() >= 3), None)
    return tuple(first.shape[2:]) if first is not None else ()


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


def freeze_batch_norm(network: nn.Module) -> None:
    """Freeze the BatchNorm statistics of a QAT network of any engine (see :func:`ao.freeze_bn_stats`)."""
    if pt2e.is_exported(network):
        network.freeze_bn()
    else:
        ao.freeze_bn_stats(network)


def _within(name: str, ancestor: str) -> bool:
    return name == ancestor or name.startswith(f"{ancestor}.")


def prepare_model(
    network: nn.Module,
    backend: str,
    mode: Mode,
    skip: Sequence[str],
    example_inputs: tuple[Any, ...],
    qat: bool = True,
    relu6_to_relu: bool = False,
) -> Prepared:
    """Fuse and insert fake-quant into ``network`` for ``backend``; FX graph mode first unless ``mode="eager"``.

    With ``qat=False`` the network is prepared for post-training quantization instead (observers, eval mode):
    the PTQ baseline of the report. ``relu6_to_relu`` first applies :func:`replace_relu6` (outside ``skip``).

    ``mode="pt2e"`` captures it with ``torch.export`` and prepares it with torchao (:mod:`.pt2e`).

    Raises:
        RuntimeError: when ``mode="fx"`` and the network cannot be symbolically traced, or ``mode="pt2e"`` and
            ``torch.export`` cannot capture it.
    """
    check_skip(network, skip)
    folded = fold_parametrizations(network, skip)
    replaced = replace_relu6(network, skip) if relu6_to_relu else 0
    kept = kept_float(network, backend, skip)  # before fusion: found by the layers' own types
    said = kept_float_warning(kept, backend)
    depthwise = sum(
        ao.is_depthwise(m) for n, m in network.named_modules() if not any(_within(n, s) for s in [*skip, *kept])
    )
    if depthwise and ao.depthwise_saturation(backend):
        said.append(ao.depthwise_warning(backend, depthwise))
    zeros = nudge_zero_batch_norm_weights(network, skip) if qat else 0
    if zeros:
        said.append(
            f"QAT: {zeros} BatchNorm weights were exactly 0 (zero_init_residual / zero_init_last) and are now "
            f"{ZERO_BN_WEIGHT}: torch's fused Conv-BN QAT divides by them (NaN otherwise)."
        )
    network.train(qat)
    if mode == "pt2e":
        shared = [n for n in shared_stateful_modules(network, example_inputs) if not any(_within(n, s) for s in skip)]
        if shared:  # measured: a Conv-BN-ReLU block called twice converts to 186% relative error, even when skipped
            raise RuntimeError(
                f"mode='pt2e' but {shared} are called at several places in one forward pass: torchao's Conv-BN "
                "rewrite and its conversion treat each call as its own layer and the int8 network computes something "
                "else. Use mode='auto' (FX keeps shared modules float), or call a copy of the module at each place."
            )
        try:
            exported = pt2e.prepare(network, example_inputs, backend, skip, qat)
        except RuntimeError as err:
            raise RuntimeError(f"mode='pt2e' but {err}. Use mode='auto' (FX, or eager) for this network.") from err
        fused = pt2e.conv_bn_count(exported)
        return Prepared(
            exported, "pt2e", "requested", fused, replaced, warnings=said, folded=folded, conv_bn_pairs=fused
        )
    with ao.engine(backend):
        if mode in ("auto", "fx"):
            try:
                fx = _prepare_fx(network, backend, skip, example_inputs, qat, kept)
            except Exception as err:  # noqa: BLE001 - any tracing failure means "not traceable"
                if mode == "fx":
                    raise RuntimeError(
                        f"mode='fx' but {type(network).__name__} cannot be symbolically traced: {err}. "
                        "Use mode='auto' or mode='eager'."
                    ) from err
                reason = f"FX tracing failed ({type(err).__name__}: {str(err).splitlines()[0][:160]})"
            else:
                fx.reason = "requested" if mode == "fx" else "the network is symbolically traceable"
                fx.relu6_replaced, fx.warnings, fx.folded = replaced, said + fx.warnings, folded
                fx.kept_float = kept | fx.kept_float
                return fx
        else:
            reason = "requested"
        prepared = _prepare_eager(network, backend, skip, example_inputs, qat, kept)
    return Prepared(
        prepared, "eager", reason, _count_fused(prepared), replaced, warnings=said, folded=folded, kept_float=kept
    )
