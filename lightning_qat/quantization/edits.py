"""Edits of the float network before any engine prepares it, and the layers this CPU's int8 kernels keep float.

Each edit keeps the function the network computes (or says how it changes it), outside ``skip``: weight-norm folding,
ReLU6 -> ReLU, zero BatchNorm weights nudged, Hugging Face's ``Conv1D`` as ``nn.Linear``. :func:`kept_float` asks
:mod:`.ao`'s kernel probes which layers stay float because their int8 kernel is wrong or slow here;
:func:`shared_stateful_modules` finds modules called twice.
"""

from __future__ import annotations

import difflib
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from lightning_qat.quantization import ao, compat
from lightning_qat.quantization.backends import torch_engine
from lightning_qat.quantization.trace import run_once


def within(name: str, ancestor: str) -> bool:
    """Whether module ``name`` is ``ancestor`` or inside it."""
    return name == ancestor or name.startswith(f"{ancestor}.")


def check_skip(network: nn.Module, skip: Sequence[str]) -> None:
    """Raise ``ValueError`` for a ``skip`` entry that is not a submodule name, with the closest names."""
    names = [n for n, _ in network.named_modules() if n]
    for entry in skip:
        if entry not in names:
            close = difflib.get_close_matches(entry, names, n=5)
            hint = f"did you mean one of {close}?" if close else f"valid names include {names[:10]}"
            raise ValueError(f"skip entry {entry!r} is not a submodule of the quantized network; {hint}")


# An int8 layer this many times slower than its float form stays float: the measured kernels fall far on either side
# (docs/what-stays-float.md).
SLOW_INT8 = 8.0


def kept_float(network: nn.Module, backend: str, skip: Sequence[str] = ()) -> dict[str, str]:
    """Layers outside ``skip`` kept float because this torch's int8 kernel is wrong or slow on ``backend``: name -> why.

    ConvTranspose layers where :func:`ao.transposed_conv_int8_works` says no; depthwise convolutions of a shape whose
    :func:`ao.depthwise_slowdown` is above :data:`SLOW_INT8` (a fused BatchNorm stays float with its conv).
    """
    if torch_engine(backend) is None:  # ExecuTorch's backends (xnnpack): torch's int8 kernels are not what runs
        return {}
    layers = [(n, m) for n, m in network.named_modules() if n and not any(within(n, s) for s in skip)]
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


def fold_parametrizations(network: nn.Module, skip: Sequence[str] = ()) -> list[str]:
    """Fold every weight parametrization outside ``skip`` into a plain weight, in place; returns the layers' names.

    ``torch.nn.utils.parametrizations.weight_norm`` (and the older hook-based ``torch.nn.utils.weight_norm``) make a
    layer torch's QAT modules cannot take (``ParametrizedConv2d``). Folded, the layer computes the same function from
    its current weight, and QAT trains that weight directly; the int8 layer has no parametrization either way.
    """
    folded = []
    for name, module in list(network.named_modules()):
        if any(within(name, s) for s in skip):
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


def linears_from_conv1d(network: nn.Module, skip: Sequence[str] = ()) -> int:
    """Swap each Hugging Face ``Conv1D`` outside ``skip`` (GPT-2's attention and MLP) for ``nn.Linear``; how many.

    ``Conv1D`` is a Linear with its weight stored transposed, computed with ``addmm``, which no quantizer annotates:
    as it is, GPT-2 keeps every layer but its head float. The ``nn.Linear`` holds the transposed weight and computes
    the same function.
    """
    kept = {id(m) for name in skip for m in network.get_submodule(name).modules()}
    count = 0
    for parent in list(network.modules()):
        for name, child in list(parent.named_children()):
            if id(child) in kept or type(child).__name__ != "Conv1D" or not hasattr(child, "nf"):
                continue
            if not type(child).__module__.startswith("transformers."):
                continue
            weight: torch.Tensor = child.weight  # type: ignore[assignment]  # Conv1D's (in, out) parameter
            bias: torch.Tensor | None = child.bias  # type: ignore[assignment]
            linear = nn.Linear(weight.shape[0], weight.shape[1], bias=bias is not None)
            linear.to(device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(weight.t())
                if bias is not None:
                    linear.bias.copy_(bias)
            linear.train(child.training)
            setattr(parent, name, linear)
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
    return [name for name in shared if not any(within(name, other) and name != other for other in shared)]


def _has_state(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None or next(module.buffers(), None) is not None
