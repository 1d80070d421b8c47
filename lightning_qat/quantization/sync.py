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
