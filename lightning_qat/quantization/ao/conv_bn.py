"""Fused Conv-BN QAT layers that divide nothing the size of an activation: the same function as torch's, cheaper.

torch's ``_ConvBnNd._forward_approximate`` convolves with the BatchNorm-scaled weight (fake-quantized), divides the
output by the scale, adds the conv bias and runs the BatchNorm.

- With running statistics (BatchNorm frozen, or in evaluation) the division and the BatchNorm cancel to a per-channel
  bias, ``beta + (bias - running_mean) * scale``: one convolution with a folded bias. The same function and the same
  gradients (the scale reaches ``bn.weight`` through the weight, as before; the division's share of its gradient is
  zero), and what the int8 layer computes after conversion folds BatchNorm the same way.
- With batch statistics (BatchNorm learning) the division stays, but on the weight: a convolution is linear in its
  weight, so ``conv(x, w) / scale == conv(x, w / scale)``, and the conv bias goes into the convolution. The same
  function and gradients up to float rounding, the BatchNorm's statistics of the same tensor; a weight-sized division
  instead of an output-sized one, forward and backward.

Leaving the divisions and the frozen BatchNorm out takes a third off mobilenet_v2's QAT step with BatchNorm frozen,
and (measured in docs/performance.md) a share while it learns. Set on each fused module at prepare (an instance
attribute: the class, and the modules torch converts to, are untouched).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from lightning_qat.quantization.ao.api import _ConvBnNd


def fold_frozen_batch_norm(network: nn.Module) -> int:
    """Give every fused Conv-BN QAT module of ``network`` the folded forward (see the module); returns how many."""
    fused = [m for m in network.modules() if isinstance(m, _ConvBnNd)]
    for module in fused:
        # a partial, not a closure: a deep copy (the CPU copy that converts) gets one bound to its own module
        module._forward_approximate = functools.partial(_forward, module)  # type: ignore[method-assign]
    return len(fused)


def unfold_batch_norm(network: nn.Module) -> int:
    """Take :func:`fold_frozen_batch_norm` back: torch's own forward again (a benchmark's before); returns how many."""
    folded = [m for m in network.modules() if "_forward_approximate" in m.__dict__]
    for module in folded:
        del module._forward_approximate
    return len(folded)


def _forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    bn = module.bn
    assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
    if bn.running_var is None or bn.running_mean is None or bn.weight is None or bn.bias is None:
        return type(module)._forward_approximate(module, x)  # type: ignore[attr-defined]  # torch's own, unpatched
    weight, bias, fake_quant = module.weight, module.bias, module.weight_fake_quant
    assert isinstance(weight, torch.Tensor)
    assert isinstance(fake_quant, nn.Module)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    per_channel = scale.reshape([-1] + [1] * (weight.dim() - 1))
    scaled = fake_quant(weight * per_channel)
    if bn.training:  # batch statistics: BatchNorm of the unscaled output, divided on the weight (see the module)
        return bn(module._conv_forward(x, scaled / per_channel, bias))  # type: ignore[operator]
    shift = -bn.running_mean if not isinstance(bias, torch.Tensor) else bias - bn.running_mean
    return module._conv_forward(x, scaled, bn.bias + shift * scale)  # type: ignore[operator]
