"""Fake-quants whose int8 conversion computes what QAT trained (torch's clamp and scale differ from it)."""

from __future__ import annotations

from typing import Any

import torch

from lightning_qat.quantization.ao.api import FusedMovingAvgObsFakeQuantize, QConfig


class Int8RangeFakeQuantize(FusedMovingAvgObsFakeQuantize):
    """An activation fake-quant with a reduced-range (7-bit) scale that clamps where the int8 model does: 8 bits.

    x86 and fbgemm observe activations with ``reduce_range=True``: the scale maps the observed range onto [0, 127],
    so the int8 kernels' products cannot saturate on CPUs without VNNI. torch's fake-quant then also clamps at 127,
    but the converted int8 model quantizes into quint8's full [0, 255] with that scale (and so does an ONNX
    QuantizeLinear): a value above the observed range is clamped in QAT and kept in int8. This fake-quant observes
    and picks its scale exactly as torch's does (same observer, same buffers, same checkpoints) and clamps to the
    dtype's full range, so the QAT network computes the function its artifacts compute.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # the clamp; the observer keeps its reduced range, from which the scale is computed
        self.quant_min, self.quant_max = _FULL_RANGE[self.dtype]

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        """Observe (the 7-bit scale), then fake-quantize over the full 8-bit range.

        torch's ``FakeQuantize.forward`` would clamp to the observer's reduced range, its fused kernel too.
        """
        if bool(self.observer_enabled[0]):
            self.activation_post_process(X.detach())
            scale, zero_point = self.calculate_qparams()
            self.scale.resize_(scale.shape).copy_(scale)
            self.zero_point.resize_(zero_point.shape).copy_(zero_point)
        if bool(self.fake_quant_enabled[0]):
            X = torch.fake_quantize_per_tensor_affine(X, self.scale, self.zero_point, self.quant_min, self.quant_max)
        return X


_FULL_RANGE = {torch.quint8: (0, 255), torch.qint8: (-128, 127)}


class WeightFakeQuantize(FusedMovingAvgObsFakeQuantize):
    """torch's fused weight fake-quant, symmetric in every channel, converted to int8 with the scale QAT trained with.

    Two faults of torch's, mended here:

    - Its fused kernel keeps a per-channel *symmetric* scale symmetric only for a channel with weights of both signs.
      A channel of one sign (one in a few hundred 3x3 depthwise kernels; a pruned, all-zero one) gets an affine grid
      with zero point -128 or 127: QAT trains on it, and the ONNX QDQ graph carries it. ONNX Runtime then takes its
      slow depthwise path and OpenVINO runs such a convolution in float (mobilenet_v2: 9 of its 17 depthwise
      convolutions; ONNX Runtime at 1.4x the float time, docs/performance.md). Such a channel is given the scale a
      two-signed one gets from the same range, with zero point 0, before the weights are fake-quantized.
    - Its fused kernel picks a symmetric scale as ``max|w| / 127`` (torch's C++ qparams, which preserve sparsity),
      while the observer's ``calculate_qparams``, which torch's int8 conversion reads, gives ``max|w| / 127.5``. So
      torch would convert every weight onto a slightly finer grid than the one QAT trained on, up to a step off per
      weight, which the layers after compound (docs/what-stays-float.md has what it cost in the zoo). Here
      ``calculate_qparams`` returns the scale and zero point the forward uses (and checkpoints hold), once the
      observer has seen weights.
    """

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        """Observe (the fused kernel's moving range), pick symmetric qparams, fake-quantize with them.

        The fused kernel computes its qparams again from the range whenever it fake-quantizes, observer on or off, so
        it only observes here.
        """
        observing = bool(self.observer_enabled[0])
        if not self.is_symmetric_quant or not (observing or self._observed()):  # nothing stored: torch's own
            return super().forward(X)
        observer = self.activation_post_process
        if observing:
            torch.fused_moving_avg_obs_fake_quant(
                X.detach(), self.observer_enabled, torch.zeros_like(self.fake_quant_enabled), observer.min_val,
                observer.max_val, self.scale, self.zero_point, observer.averaging_constant, observer.quant_min,
                observer.quant_max, self.ch_axis, self.is_per_channel, self.is_symmetric_quant,
            )  # fmt: skip
            scale = symmetric_scale(observer.min_val, observer.max_val, self.quant_max - self.quant_min)
            self.scale.resize_(scale.shape).copy_(scale)
            self.zero_point.resize_(scale.shape).zero_()
        if not bool(self.fake_quant_enabled[0]):
            return X
        if self.is_per_channel:
            return torch.fake_quantize_per_channel_affine(
                X, self.scale, self.zero_point, self.ch_axis, self.quant_min, self.quant_max
            )
        return torch.fake_quantize_per_tensor_affine(X, self.scale, self.zero_point, self.quant_min, self.quant_max)

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        """The scale and zero point of the last forward pass: what QAT trained with."""
        if not self._observed():  # torch's own
            return super().calculate_qparams()
        return self.scale.clone(), self.zero_point.clone()

    def _observed(self) -> bool:
        """Whether the observer has seen weights (and the scale and zero point are theirs)."""
        low = self.activation_post_process.min_val
        assert isinstance(low, torch.Tensor)
        return low.numel() > 0 and bool(torch.isfinite(low).all())


def symmetric_scale(low: torch.Tensor, high: torch.Tensor, levels: int) -> torch.Tensor:
    """The scale torch's fused kernel gives a range holding 0 on its symmetric grid ``[-(half + 1), half]``.

    ``half = levels // 2`` (qint8: 255 levels, [-128, 127]): ``max(-low / (half + 1), high / half)``, computed in
    float64 as the kernel does, and never 0 (an all-zero channel: any scale quantizes it exactly).
    """
    half = levels // 2
    scale = torch.maximum(-low.double().clamp(max=0) / (half + 1), high.double().clamp(min=0) / half).float()
    return scale.clamp(min=torch.finfo(torch.float32).eps)


def _int8_range(config: QConfig | None) -> QConfig | None:
    """``config`` with the fake-quants whose int8 conversion computes what QAT trained.

    A reduced-range activation fake-quant becomes :class:`Int8RangeFakeQuantize`, torch's fused weight fake-quant
    :class:`WeightFakeQuantize` (same arguments, observers, buffers and checkpoint keys).
    """
    if config is None:
        return config
    activation, weight = config.activation, config.weight
    partial = getattr(activation, "p", None)  # torch's `with_args` wrapper
    if partial is not None and partial.func is FusedMovingAvgObsFakeQuantize and partial.keywords.get("reduce_range"):
        activation = Int8RangeFakeQuantize.with_args(**partial.keywords)
    partial = getattr(weight, "p", None)
    if partial is not None and partial.func is FusedMovingAvgObsFakeQuantize:
        weight = WeightFakeQuantize.with_args(**partial.keywords)
    return QConfig(activation=activation, weight=weight)
