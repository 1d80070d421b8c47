"""Symmetric int8 weights in every channel, trained and converted on one grid: torch's and torchao's fused fake-quant.

torch's fused kernel (``torch.fused_moving_avg_obs_fake_quant``, which torch.ao's and torchao's
``FusedMovingAvgObsFakeQuantize`` call) has two faults under a symmetric weight scheme, mended by
:class:`SymmetricWeights` for both (``ao.WeightFakeQuantize``, the PT2E engine's weight fake-quant):

- It keeps a channel symmetric only if its weights have both signs. A channel of one sign (one in a few hundred 3x3
  depthwise kernels; a pruned, all-zero one) gets an affine grid with zero point -128 or 127 and half the scale: QAT
  trains on it, the ONNX QDQ graph carries it (ONNX Runtime then takes its slow depthwise path, OpenVINO runs the
  convolution in float: mobilenet_v2, docs/performance.md), and PT2E's conversion ships the symmetric grid instead.
- It picks the scale as ``max|w| / 127`` (torch's C++ qparams, which preserve sparsity), while the observer's
  ``calculate_qparams``, which the int8 conversions read, gives ``max|w| / 127.5``: every weight converted onto a
  slightly finer grid than QAT trained on, up to a step off per weight (docs/what-stays-float.md has the cost).

Such a channel gets the scale a two-signed channel of the same range gets, with zero point 0; two-signed channels
keep the kernel's scale bit for bit; ``calculate_qparams`` returns what the forward used.
"""

from __future__ import annotations

from typing import Any

import torch

SMALL_SCALE = 6.1e-5  # torch's kernel raises a smaller scale to this (its C++ SMALL_SCALE_THRESHOLD, float16's range)


class SymmetricWeights:
    """The forward and ``calculate_qparams`` of a fused weight fake-quant.

    A mixin before torch.ao's or torchao's ``FusedMovingAvgObsFakeQuantize``, whose buffers, observer and checkpoint
    keys it keeps.
    """

    activation_post_process: Any  # the moving-average min/max observer
    observer_enabled: torch.Tensor
    fake_quant_enabled: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    quant_min: int
    quant_max: int
    ch_axis: int
    is_per_channel: bool
    is_symmetric_quant: bool

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        """Observe (the fused kernel's moving range), pick symmetric qparams, fake-quantize with them.

        The fused kernel computes its qparams again from the range whenever it fake-quantizes, observer on or off, so
        it only observes here.
        """
        observing = bool(self.observer_enabled[0])
        if not self.is_symmetric_quant or not (observing or self._observed()):  # nothing stored: the kernel's own
            return super().forward(X)  # type: ignore[misc]
        observer = self.activation_post_process
        if observing:  # the fused kernel, not the observer module: the same range bit for bit, 3.5x faster (measured)
            torch.fused_moving_avg_obs_fake_quant(
                X.detach(), self.observer_enabled, torch.zeros_like(self.fake_quant_enabled), observer.min_val,
                observer.max_val, self.scale, self.zero_point, observer.averaging_constant, observer.quant_min,
                observer.quant_max, self.ch_axis, self.is_per_channel, self.is_symmetric_quant,
            )  # fmt: skip
            scale = symmetric_scale(
                observer.min_val, observer.max_val, observer.quant_min, observer.quant_max, float(observer.eps)
            )
            self.scale.resize_(scale.shape).copy_(scale)
            self.zero_point.resize_(scale.shape).zero_()
        if not bool(self.fake_quant_enabled[0]):
            return X
        if self.is_per_channel:
            return torch.fake_quantize_per_channel_affine(
                X, self.scale, self.zero_point, self.ch_axis, self.quant_min, self.quant_max
            )
        return torch.fake_quantize_per_tensor_affine(X, self.scale, self.zero_point, self.quant_min, self.quant_max)

    def calculate_qparams(self, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The scale and zero point of the last forward pass: what QAT trained with."""
        if not self._observed():  # the observer's own
            return super().calculate_qparams(**kwargs)  # type: ignore[misc]
        return self.scale.clone(), self.zero_point.clone()

    def _observed(self) -> bool:
        """Whether the observer has seen weights (and the scale and zero point are theirs)."""
        low = self.activation_post_process.min_val
        assert isinstance(low, torch.Tensor)
        return low.numel() > 0 and bool(torch.isfinite(low).all())


def symmetric_scale(
    low: torch.Tensor, high: torch.Tensor, quant_min: int, quant_max: int, eps: float = torch.finfo(torch.float32).eps
) -> torch.Tensor:
    """The scale torch's fused kernel gives a range holding 0 on a symmetric grid of ``[quant_min, quant_max]``.

    As its C++ qparams (computed in float64): with ``half = (quant_max - quant_min) // 2``, the range widens to
    ``[-(half + 1), half]`` steps of ``max(-low / (half + 1), high / half)``, spread over the grid's
    ``quant_max - quant_min`` steps (qint8's [-128, 127]: that step; XNNPACK's [-127, 127]: 255/254 of it). At least
    :data:`SMALL_SCALE`, as the kernel makes it, and the observer's ``eps``, as its conversion would (torchao's x86
    weights take 2^-12, which keeps an int32 bias on the grid of input x weight scale from overflowing): never 0 (an
    all-zero channel: any scale quantizes it exactly).
    """
    levels = quant_max - quant_min
    half = levels // 2
    step = torch.maximum(-low.double().clamp(max=0) / (half + 1), high.double().clamp(min=0) / half)
    # the widened range's ends are floats there, their difference over the levels a double
    top, bottom = (step * half).float().double(), (step * -(half + 1)).float().double()
    return ((top - bottom) / levels).float().clamp(min=max(SMALL_SCALE, eps))
