"""CPU copies of a network in eval mode, for conversion and evaluation, with DDP's SyncBatchNorm reverted."""

from __future__ import annotations

import copy

import torch
from torch import nn

from lightning_qat.quantization import ao


class _BatchNormXd(nn.modules.batchnorm._BatchNorm):
    """A BatchNorm of any input rank: what a reverted ``SyncBatchNorm`` becomes (it does not record its rank)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        return None


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every ``nn.SyncBatchNorm`` (``Trainer(sync_batchnorm=True)``) back to a plain BatchNorm.

    The statistics and affine parameters are the same tensors; SyncBatchNorm runs only on GPUs in a process group.
    """
    if isinstance(module, nn.SyncBatchNorm):
        plain = _BatchNormXd(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        plain.weight, plain.bias = module.weight, module.bias
        plain.running_mean, plain.running_var = module.running_mean, module.running_var
        plain.num_batches_tracked = module.num_batches_tracked
        if hasattr(module, "qconfig"):
            ao.set_qconfig(plain, ao.qconfig_of(module))
        plain.train(module.training)
        for name, child in module.named_children():
            plain.add_module(name, child)
        module = plain
    for name, child in list(module.named_children()):
        setattr(module, name, revert_sync_batchnorm(child))
    return module


def cpu_eval_copy(network: nn.Module) -> nn.Module:
    """A deep copy of ``network`` on the CPU in eval mode, SyncBatchNorm reverted; ``network`` itself is not touched."""
    return revert_sync_batchnorm(copy.deepcopy(network)).cpu().eval()
