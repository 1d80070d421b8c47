"""Keeping observer statistics identical on every DDP rank (torchvision's recipe keeps rank 0's only)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from lightning_qat.quantization import ao


@torch.no_grad()
def all_reduce_observers(network: nn.Module) -> int:
    """All-reduce min (MIN) and max (MAX) of every enabled observer, then refresh scale / zero_point.

    Two collectives per call, whatever the number of observers. Returns the number of observers synchronized;
    0 without an initialized process group.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return 0
    observing = [(fq, found) for _, fq in ao.fake_quant_modules(network) if (found := ao.observer_range(fq))]
    if not observing:
        return 0
    mins = torch.cat([low.reshape(-1) for _, (low, _) in observing])
    maxs = torch.cat([high.reshape(-1) for _, (_, high) in observing])
    dist.all_reduce(mins, op=dist.ReduceOp.MIN)
    dist.all_reduce(maxs, op=dist.ReduceOp.MAX)
    offset = 0
    for fq, (low, _) in observing:
        n = low.numel()
        ao.set_observer_range(fq, mins[offset : offset + n], maxs[offset : offset + n])
        offset += n
    return len(observing)


@torch.no_grad()
def all_reduce_batch_norm(network: nn.Module) -> int:
    """Pool every BatchNorm's running statistics over the DDP ranks (before they freeze); returns how many BatchNorms.

    With ``broadcast_buffers=False`` each rank's statistics follow its own shard: frozen as they are, the ranks would
    train different functions and rank 0's alone would convert. The pooled mean is the ranks' mean; the pooled
    variance the mean of the variances plus the variance of the means. One collective; 0 without a process group.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return 0
    norms = [
        m
        for m in network.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None and m.running_var is not None
    ]
    if not norms:
        return 0
    means = torch.cat([m.running_mean.reshape(-1) for m in norms])  # type: ignore[union-attr]
    squares = torch.cat([(m.running_var + m.running_mean**2).reshape(-1) for m in norms])  # type: ignore[operator]
    pooled = torch.stack([means, squares])
    dist.all_reduce(pooled)
    pooled /= dist.get_world_size()
    offset = 0
    for m in norms:
        n = m.running_mean.numel()  # type: ignore[union-attr]
        mean, square = pooled[0, offset : offset + n], pooled[1, offset : offset + n]
        m.running_mean.copy_(mean)  # type: ignore[union-attr]
        m.running_var.copy_((square - mean**2).clamp_min(0))  # type: ignore[union-attr]
        offset += n
    return len(norms)
