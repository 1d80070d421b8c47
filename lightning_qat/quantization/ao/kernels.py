"""Probes of this torch's int8 kernels on this CPU: wrong transposed convolutions, slow or saturating depthwise."""

from __future__ import annotations

import functools
import time
from typing import Any

import torch
from torch import nn

from lightning_qat.quantization.ao.api import DeQuantStub, QuantStub, _eager_convert, _eager_prepare, _Int8Conv2d
from lightning_qat.quantization.ao.flow import set_qconfig
from lightning_qat.quantization.ao.qconfigs import per_tensor_weight_qconfig
from lightning_qat.quantization.ao.quiet import engine, quiet

TRANSPOSED_CONVS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@functools.cache
def transposed_conv_int8_works(backend: str) -> bool:
    """Whether this torch's int8 ConvTranspose2d computes what the float one does on ``backend`` (checked once).

    Some torch versions compute it wrong on some engines and CPUs (docs/what-stays-float.md has the measurements), so
    it is checked here rather than assumed.
    """
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(4, 16, 4, 4, generator=generator)
    conv = nn.ConvTranspose2d(16, 8, 2, stride=2)
    model = nn.Sequential(QuantStub(), conv, DeQuantStub()).eval()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.1)
        expected = model(x)
        set_qconfig(model, per_tensor_weight_qconfig(backend, qat=False))
        try:
            with engine(backend), quiet():
                prepared = _eager_prepare(model)
                prepared(x)
                actual = _eager_convert(prepared)(x)
        except Exception:  # noqa: BLE001 - an engine without the kernel: it does not work
            return False
    return bool((actual - expected).abs().mean() <= 0.05 * expected.abs().mean())


def transposed_conv_warning(backend: str) -> str:
    """What to tell the user when ConvTranspose layers stay float on ``backend``."""
    return (
        f"QAT: ConvTranspose layers stay float: torch {torch.__version__}'s int8 transposed convolution on the "
        f"{backend!r} engine does not compute what the float layer does on this CPU (checked at start). "
        "backend='qnnpack' quantizes them correctly."
    )


def is_depthwise(module: nn.Module) -> bool:
    """A 2-d convolution with one input channel per group (MobileNet, EfficientNet, SSDlite backbones)."""
    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels


@functools.cache
def depthwise_saturation(backend: str) -> int:
    """How many output steps this torch's int8 depthwise 3x3 convolution is off on ``backend`` (checked once).

    ``x86``/``fbgemm`` observe activations with a 7-bit scale so that a kernel multiplying uint8 activations by int8
    weights in int16 pairs cannot saturate; a value above the observed range still quantizes to 128-255, and some
    engines' depthwise kernels then saturate (docs/what-stays-float.md: which, and by how much). Returns 0 when the
    kernel is right (or missing: nothing to warn about).
    """
    generator = torch.Generator().manual_seed(0)
    channels = 16
    activations = torch.randint(128, 256, (1, channels, 6, 6), generator=generator) * 0.05
    sign = torch.where(torch.rand(channels, 1, 1, 1, generator=generator) > 0.5, 1.0, -1.0)
    weight = torch.randint(100, 128, (channels, 1, 3, 3), generator=generator) * sign * 0.01
    with engine(backend), quiet():
        try:
            conv, weight_q = _int8_depthwise(weight, padding=1)
            x = torch.quantize_per_tensor(activations, 0.05, 0, torch.quint8)
            reference = nn.functional.conv2d(x.dequantize(), weight_q.dequantize(), padding=1, groups=channels)
            scale = float(reference.abs().max()) / 120
            expected = torch.quantize_per_tensor(reference, scale, 128, torch.quint8).dequantize()
            conv.scale, conv.zero_point = scale, 128
            actual = conv(x).dequantize()
        except Exception:  # noqa: BLE001 - an engine without the kernel
            return 0
    return round(float((actual - expected).abs().max()) / scale)


DepthwiseShape = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]]


def depthwise_shape(module: nn.Module) -> DepthwiseShape | None:
    """(kernel, stride, padding, dilation) of a depthwise convolution; ``None`` for any other module."""
    if not is_depthwise(module):
        return None
    conv = module
    assert isinstance(conv, nn.Conv2d)
    padding = conv.padding if isinstance(conv.padding, tuple) else (0, 0)  # "same"/"valid" strings: as torch's own
    return tuple(conv.kernel_size), tuple(conv.stride), tuple(padding), tuple(conv.dilation)


@functools.cache
def depthwise_slowdown(backend: str, shape: DepthwiseShape) -> float:
    """How many times slower this torch's int8 depthwise convolution of ``shape`` is than float (measured once).

    ``x86`` and ``fbgemm`` have fast depthwise kernels only for some shapes (the usual padded 3x3 and 5x5); the others
    (strided without padding, dilated) take a generic path many times slower than float, and one such layer can make
    a whole int8 network slower than float. docs/what-stays-float.md has the measurements.
    """
    kernel, stride, padding, dilation = shape
    channels = 128
    size = [24 + (k - 1) * d for k, d in zip(kernel, dilation, strict=True)]  # small maps hide the gap
    conv = nn.Conv2d(channels, channels, kernel, stride, padding, dilation, groups=channels).eval()  # type: ignore[arg-type]
    x = torch.rand(1, channels, *size)
    try:
        with engine(backend), quiet(), torch.no_grad():
            int8, _ = _int8_depthwise(conv.weight, stride=stride, padding=padding, dilation=dilation)
            x_q = torch.quantize_per_tensor(x, 1 / 255, 0, torch.quint8)
            int8_time, float_time = fastest((int8, x_q), (conv, x))
            return int8_time / float_time
    except Exception:  # noqa: BLE001 - an engine without the kernel: nothing to keep float for speed
        return 1.0


def _int8_depthwise(weight: torch.Tensor, **conv: Any) -> tuple[_Int8Conv2d, torch.Tensor]:
    """An int8 depthwise ``Conv2d`` (``conv``: its stride, padding, dilation) of ``weight`` at scale 0.01 per channel.

    Returns the layer and its quantized weight.
    """
    channels = weight.shape[0]
    weight_q = torch.quantize_per_channel(
        weight, torch.full((channels,), 0.01), torch.zeros(channels, dtype=torch.long), 0, torch.qint8
    )
    layer = _Int8Conv2d(channels, channels, tuple(weight.shape[2:]), groups=channels, **conv)
    layer.set_weight_bias(weight_q, None)
    return layer, weight_q


def describe_depthwise(shape: DepthwiseShape) -> str:
    """``5x5, stride 2, padding 0`` (and the dilation when there is one)."""
    kernel, stride, padding, dilation = shape
    text = f"{'x'.join(map(str, kernel))}, stride {'x'.join(map(str, set(stride)))}, padding "
    text += "x".join(map(str, set(padding)))
    return text + (f", dilation {'x'.join(map(str, set(dilation)))}" if any(d > 1 for d in dilation) else "")


def fastest(*calls: tuple[nn.Module, torch.Tensor], repeats: int = 10) -> list[float]:
    """The fastest of ``repeats`` runs of each ``(layer, input)``, run in turns so a busy moment hits all of them."""
    times: list[list[float]] = [[] for _ in calls]
    for round_ in range(3 + repeats):  # 3 warm-up rounds
        for i, (layer, x) in enumerate(calls):
            start = time.perf_counter()
            layer(x)
            if round_ >= 3:
                times[i].append(time.perf_counter() - start)
    return [min(t) for t in times]


def depthwise_warning(backend: str, count: int) -> str:
    """What to tell the user when ``backend``'s depthwise kernel saturates and the network has ``count`` of them."""
    return (
        f"QAT: backend {backend!r}: torch {torch.__version__}'s int8 depthwise convolution saturates on this CPU when "
        f"an activation exceeds its observed range (checked at start: {depthwise_saturation(backend)} quantization "
        f"steps off), so the int8 model can compute other values than QAT in depthwise convolutions ({count} here). "
        "backend='x86' (the default) computes them exactly on this CPU."
    )
