"""Keeping observer statistics identical on every DDP rank (torchvision's recipe keeps rank 0's only)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from lightning_qat import ao


def _observing(network: nn.Module) -> list[ao.FakeQuantizeBase]:
    """Enabled fake-quant modules whose observer holds running min/max statistics."""
    found = []
    for _, fq in ao.fake_quant_modules(network):
        observer = getattr(fq, "activation_post_process", None)
        if bool(fq.observer_enabled[0]) and hasattr(observer, "min_val") and observer.min_val.numel() > 0:
            found.append(fq)
    return found


@torch.no_grad()
def all_reduce_observers(network: nn.Module) -> int:
    """All-reduce min (MIN) and max (MAX) of every enabled observer, then refresh scale / zero_point.

    Two collectives per call, whatever the number of observers. Returns the number of observers synchronized;
    0 without an initialized process group.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return 0
    fake_quants = _observing(network)
    if not fake_quants:
        return 0
    observers = [fq.activation_post_process for fq in fake_quants]
    mins = torch.cat([o.min_val.reshape(-1) for o in observers])
    maxs = torch.cat([o.max_val.reshape(-1) for o in observers])
    dist.all_reduce(mins, op=dist.ReduceOp.MIN)
    dist.all_reduce(maxs, op=dist.ReduceOp.MAX)
    offset = 0
    for fq, observer in zip(fake_quants, observers, strict=True):
        n = observer.min_val.numel()
        observer.min_val.copy_(mins[offset : offset + n].view_as(observer.min_val))
        observer.max_val.copy_(maxs[offset : offset + n].view_as(observer.max_val))
        offset += n
        with ao.quiet():
            scale, zero_point = fq.calculate_qparams()
        fq.scale.resize_(scale.shape).copy_(scale)
        fq.zero_point.resize_(zero_point.shape).copy_(zero_point)
    return len(fake_quants)
