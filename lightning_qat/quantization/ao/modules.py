"""Reading and switching QAT modules: fake-quants, observers, BatchNorm freezing, type predicates, int8 builders."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, TypeGuard

import torch
from torch import nn

from lightning_qat.quantization import pt2e
from lightning_qat.quantization.ao.api import (
    FakeQuantizeBase,
    _ConvBnNd,
    _DynamicLinear,
    _DynamicLinearReLU,
    _Int8Embedding,
    _QATEmbedding,
    _QATLinear,
    _QATLinearReLU,
)
from lightning_qat.quantization.ao.quiet import quiet


def fake_quant_modules(module: nn.Module) -> list[tuple[str, FakeQuantizeBase]]:
    """All fake-quantize modules with their qualified names (torch.ao's, and torchao's in a PT2E network)."""
    return [(name, m) for name, m in module.named_modules() if is_fake_quant(m)]


def is_fake_quant(module: nn.Module) -> TypeGuard[FakeQuantizeBase]:
    """Whether ``module`` is a fake-quantize module: torch.ao's, or torchao's (the same interface, PT2E's copy)."""
    torchao_base = pt2e.fake_quant_base()
    return isinstance(module, FakeQuantizeBase) or (torchao_base is not None and isinstance(module, torchao_base))


def uncalibrated(module: nn.Module) -> list[str]:
    """Names of the fake-quant modules of ``module`` whose observer never saw data (scale still the initial 1.0).

    A fake-quant switched off altogether (fake quantization and observer: kept float by the accuracy-budget fallback
    from the fit's start) is not one: the int8 model keeps it float too.
    """
    names = []
    for name, fq in fake_quant_modules(module):
        if not (bool(fq.fake_quant_enabled[0]) or bool(fq.observer_enabled[0])):
            continue
        observer = getattr(fq, "activation_post_process", None)
        if isinstance(observer, nn.Module) and hasattr(observer, "min_val"):
            low = _tensor(observer, "min_val")
            if low.numel() == 0 or not bool(torch.isfinite(low).all()):
                names.append(name)
    return names


def set_observers(module: nn.Module, enabled: bool) -> None:
    """Enable or disable every observer of ``module`` (fake quantization itself stays on)."""
    for _, fq in fake_quant_modules(module):
        fq.enable_observer(enabled)


def set_activation_fake_quant(module: nn.Module, enabled: bool) -> None:
    """Switch the fake quantization of every activation of ``module`` on or off (weights' stays, observers observe)."""
    for name, fq in fake_quant_modules(module):
        if not name.endswith("weight_fake_quant"):
            fq.enable_fake_quant(enabled)


def pause_observers(module: nn.Module) -> list[dict[str, Any]]:
    """Switch the observers of ``module`` off and return what :func:`restore_observers` needs to undo it exactly.

    An observer that never saw data stays on: its fake quantization cannot run before the observer has given the
    scales their shape (a per-row embedding weight before the first training step, in Lightning's sanity check).
    :func:`restore_observers` puts its state back too, so the evaluation leaves no trace either way.
    """
    fake_quants = fake_quant_modules(module)
    saved = [copy.deepcopy(fq.state_dict()) for _, fq in fake_quants]
    never = set(uncalibrated(module))
    for name, fq in fake_quants:
        if name not in never:
            fq.disable_observer()
    return saved


def restore_observers(module: nn.Module, saved: list[dict[str, Any]]) -> None:
    """Put back the fake-quant state :func:`pause_observers` saved (observer flags and statistics alike)."""
    for (_, fq), state in zip(fake_quant_modules(module), saved, strict=True):
        fq.load_state_dict(state)


def freeze_bn_stats(module: nn.Module) -> list[nn.Module]:
    """Freeze the statistics of every BatchNorm in ``module``: they stop moving and normalize from now on.

    Fused Conv-BN(-ReLU) and Linear-BN QAT modules switch to their running statistics (torch's ``freeze_bn_stats``,
    which ``train()`` does not undo). Standalone BatchNorm layers are put in eval mode and returned: ``train()``
    (Lightning calls it after every validation) puts them back in training mode, so the caller holds them in eval
    mode while it trains (:func:`hold_eval`) and nothing is left on the modules afterwards.
    """
    fused = [m for m in module.modules() if _is_fused_bn(m)]
    with quiet():
        for m in fused:
            m.freeze_bn_stats()  # type: ignore[operator]  # _is_fused_bn checked it is callable
    inside_fused = {id(fused_batch_norm(m)) for m in fused}
    standalone: list[nn.Module] = [
        m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in inside_fused
    ]
    hold_eval(standalone)
    return standalone


def hold_eval(modules: list[nn.Module]) -> None:
    """Put ``modules`` (frozen BatchNorms) in eval mode again, whatever ``train()`` set since."""
    for m in modules:
        m.training = False


def _is_fused_bn(module: nn.Module) -> bool:
    """A fused Conv-BN or Linear-BN QAT module (it has a ``bn`` and can freeze it)."""
    return callable(getattr(module, "freeze_bn_stats", None)) and isinstance(getattr(module, "bn", None), nn.Module)


def is_conv_bn_qat(module: nn.Module) -> bool:
    """Whether ``module`` is a fused Conv-BN(-ReLU) QAT module (the ones whose BN can be frozen)."""
    return isinstance(module, _ConvBnNd)


def is_quantized_module(module: nn.Module) -> bool:
    """Whether ``module`` is a converted (int8) module of torch's quantized namespaces."""
    return type(module).__module__.startswith(("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized"))


def is_fused_module(module: nn.Module) -> bool:
    """Whether ``module`` is one of torch's fused modules (Conv-BN(-ReLU), Linear-ReLU, ...), float, QAT or int8."""
    return type(module).__module__.startswith("torch.ao.nn.intrinsic")


def weight_fake_quant(module: nn.Module) -> FakeQuantizeBase | None:
    """The weight fake-quant of a QAT Conv / Linear / Embedding module, ``None`` for other modules."""
    fake_quant = getattr(module, "weight_fake_quant", None)
    return fake_quant if isinstance(fake_quant, FakeQuantizeBase) else None


def output_fake_quant(module: nn.Module) -> FakeQuantizeBase | None:
    """The output fake-quant an eager-mode QAT layer carries as its child (called by a forward hook), else ``None``."""
    fake_quant = getattr(module, "activation_post_process", None)
    return fake_quant if isinstance(fake_quant, FakeQuantizeBase) else None


def int8_weight(module: nn.Module) -> torch.Tensor | None:
    """The dequantized weight of a converted (int8) layer, else ``None``."""
    weight_of = getattr(module, "weight", None)
    if not is_quantized_module(module) or not callable(weight_of):
        return None
    weight = weight_of()
    return weight.dequantize() if isinstance(weight, torch.Tensor) and weight.is_quantized else None


def fused_batch_norm(module: nn.Module) -> nn.modules.batchnorm._BatchNorm | None:
    """The BatchNorm a fused Conv-BN / Linear-BN QAT module holds (to fold or freeze), else ``None``."""
    bn = getattr(module, "bn", None)
    return bn if isinstance(bn, nn.modules.batchnorm._BatchNorm) else None


def has_fused_relu(module: nn.Module) -> bool:
    """Whether a fused QAT module applies a ReLU after its conv / linear (ConvReLU2d, ConvBnReLU2d, LinearReLU)."""
    return is_fused_module(module) and "ReLU" in type(module).__name__


@dataclass(frozen=True)
class QuantGrid:
    """The grid a fake-quant module rounds to: its current scale and zero point, range, and channel axis."""

    scale: torch.Tensor
    zero_point: torch.Tensor
    quant_min: int
    quant_max: int
    axis: int | None  # the channel axis of a per-channel quantizer; None for per-tensor
    float_qparams: bool  # per-row float scale and offset (embedding weights): no integer zero point


def quant_grid(fake_quant: FakeQuantizeBase) -> QuantGrid | None:
    """The :class:`QuantGrid` of ``fake_quant``; ``None`` when its fake quantization is switched off."""
    if not bool(fake_quant.fake_quant_enabled[0]):
        return None
    qscheme = getattr(fake_quant, "qscheme")  # noqa: B009 - plain attributes of torch's FakeQuantize
    per_channel = qscheme in (
        torch.per_channel_affine,
        torch.per_channel_symmetric,
        torch.per_channel_affine_float_qparams,
    )
    return QuantGrid(
        scale=_tensor(fake_quant, "scale"),
        zero_point=_tensor(fake_quant, "zero_point"),
        quant_min=int(getattr(fake_quant, "quant_min")),  # noqa: B009
        quant_max=int(getattr(fake_quant, "quant_max")),  # noqa: B009
        axis=int(getattr(fake_quant, "ch_axis")) if per_channel else None,  # noqa: B009
        float_qparams=qscheme == torch.per_channel_affine_float_qparams,
    )


def _tensor(module: nn.Module, name: str) -> torch.Tensor:
    """The tensor attribute (buffer or parameter) ``name`` of ``module``."""
    value = getattr(module, name)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{type(module).__name__}.{name} is a {type(value).__name__}, not a tensor.")
    return value


def observer_range(fake_quant: FakeQuantizeBase) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The running (min, max) of ``fake_quant``'s observer while it observes and has seen data, else ``None``."""
    observer = getattr(fake_quant, "activation_post_process", None)
    if not isinstance(observer, nn.Module) or not hasattr(observer, "min_val"):
        return None
    low, high = _tensor(observer, "min_val"), _tensor(observer, "max_val")
    if not bool(fake_quant.observer_enabled[0]) or low.numel() == 0:
        return None
    return low, high


@torch.no_grad()
def set_observer_range(fake_quant: FakeQuantizeBase, low: torch.Tensor, high: torch.Tensor) -> None:
    """Set the observer's running (min, max) and recompute ``fake_quant``'s scale and zero point from them."""
    observer = fake_quant.activation_post_process
    assert isinstance(observer, nn.Module)
    for name, value in (("min_val", low), ("max_val", high)):
        current = _tensor(observer, name)
        current.copy_(value.view_as(current))
    with quiet():  # from the new range (a WeightFakeQuantize's own would return its current scale)
        scale, zero_point = observer.calculate_qparams()  # type: ignore[operator]
    _tensor(fake_quant, "scale").resize_(scale.shape).copy_(scale)
    _tensor(fake_quant, "zero_point").resize_(zero_point.shape).copy_(zero_point)


def is_qat_module(module: nn.Module) -> bool:
    """Whether ``module`` is one of torch's QAT modules (a layer with its weight fake-quant: Linear, Conv-BN...)."""
    return type(module).__module__.startswith(("torch.ao.nn.qat", "torch.ao.nn.intrinsic.qat"))


def to_float(module: nn.Module) -> nn.Module:
    """The float module a QAT module stands for (BatchNorm folded into the conv / linear), with its trained weights."""
    with quiet():
        return module.to_float()  # type: ignore[operator]  # every torch QAT module has it


def dynamic_linear_type(module: nn.Module) -> bool:
    """Whether :func:`dynamic_linear` takes ``module`` (a QAT ``Linear`` or ``LinearReLU``)."""
    return type(module) in (_QATLinear, _QATLinearReLU)


@torch.no_grad()
def dynamic_linear(module: nn.Module) -> nn.Module | None:
    """A QAT ``Linear`` / ``LinearReLU`` as torch's dynamic int8 Linear, ``None`` for other modules.

    Its weights are quantized on the grid its weight fake-quant trained with (its ``calculate_qparams``, which
    :class:`WeightFakeQuantize` keeps equal to the forward's); activations are quantized per batch at run time.
    """
    if not dynamic_linear_type(module):
        return None
    fake_quant = weight_fake_quant(module)
    assert fake_quant is not None
    weight = _tensor(module, "weight").detach().float()
    bias = _tensor(module, "bias").detach().float() if getattr(module, "bias", None) is not None else None
    with quiet():
        scale, zero_point = fake_quant.calculate_qparams()
    axis = getattr(fake_quant, "ch_axis", 0) if scale.numel() > 1 else None
    if axis is None:
        int8 = torch.quantize_per_tensor(weight, float(scale), int(zero_point), torch.qint8)
    else:
        int8 = torch.quantize_per_channel(weight, scale.double(), zero_point.long(), int(axis), torch.qint8)
    cls = _DynamicLinearReLU if type(module) is _QATLinearReLU else _DynamicLinear
    with quiet():
        dynamic = cls(weight.shape[1], weight.shape[0], bias is not None, dtype=torch.qint8)  # `bias_` / `bias`
        dynamic.set_weight_bias(int8, bias)
    return dynamic


def int8_embedding(module: nn.Module) -> nn.Module | None:
    """A QAT ``Embedding`` as torch's weight-only int8 Embedding (float out), ``None`` for other modules.

    Eager mode leaves ``nn.Embedding`` itself with its weight-only ``qconfig`` (torch's static convert observes the
    weight then): its grid is computed the same way here.
    """
    if type(module) is _QATEmbedding:
        fake_quant = weight_fake_quant(module)
        assert fake_quant is not None
    elif type(module) is nn.Embedding and getattr(module, "qconfig", None) is not None:
        qconfig: Any = module.qconfig
        fake_quant = qconfig.weight()
        fake_quant(module.weight.detach())
    else:
        return None
    with quiet(), torch.no_grad():  # not from_float: torch 2.4's wants an activation observer on the QAT module
        scale, offset = fake_quant.calculate_qparams()
        weight = torch.quantize_per_channel(  # float zero points: per-row scale and offset
            _tensor(module, "weight").detach().float(), scale.float(), offset.float(), 0, torch.quint8
        )
        int8 = _Int8Embedding(weight.shape[0], weight.shape[1], padding_idx=getattr(module, "padding_idx", None))
        int8.set_weight(weight)
    return int8
