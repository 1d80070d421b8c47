"""Fake-quants whose int8 conversion computes what QAT trained (torch's clamp and scale differ from it)."""

from __future__ import annotations

from typing import Any

import torch

from lightning_qat.quantization.ao.api import FusedMovingAvgObsFakeQuantize, QConfig
from lightning_qat.quantization.symmetric import SymmetricWeights


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


class WeightFakeQuantize(SymmetricWeights, FusedMovingAvgObsFakeQuantize):
    """torch's fused weight fake-quant, symmetric in every channel, converted to int8 with the scale QAT trained with.

    Two faults of torch's fused kernel mended (:mod:`lightning_qat.quantization.symmetric`): a channel of one sign got
    an affine grid (zero point -128 or 127), and the conversion read a finer scale (``max|w| / 127.5``) than the
    forward trained with (``max|w| / 127``).
    """


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
