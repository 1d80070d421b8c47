"""The network's input: found in a batch or on the LightningModule, copied to the CPU, its batch size."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from lightning_qat import lightning_internals


def batch_input(batch: Any) -> tuple[Any, ...]:
    """The network input of a training batch.

    The batch itself if a tensor, else its first element or the value of its first key. Set
    ``example_input_array`` on the LightningModule when that guess is wrong.
    """
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (list, tuple)) and batch:
        return (batch[0],)
    if isinstance(batch, dict) and batch:
        return (next(iter(batch.values())),)
    raise ValueError(
        f"Cannot tell the network input in a batch of type {type(batch).__name__}; set `example_input_array` on "
        "your LightningModule."
    )


def cpu_inputs(inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """``inputs`` with every tensor detached and on the CPU; other values as they are."""
    return tuple(x.detach().cpu() if isinstance(x, torch.Tensor) else x for x in inputs)


def batch_size(inputs: tuple[Any, ...]) -> int:
    """The leading dimension of the first input (1 for a scalar or a non-tensor)."""
    first = inputs[0] if inputs else None
    return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() > 0 else 1


def example_inputs(trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[Any, ...]:
    """CPU example inputs of the network: ``example_input_array``, else the input of the first training batch."""
    example = pl_module.example_input_array
    if example is None:
        if trainer.datamodule is not None:
            loader = trainer.datamodule.train_dataloader()
        else:
            loader = lightning_internals.fit_train_dataloader(trainer)
        example = batch_input(next(iter(loader)))
    inputs = example if isinstance(example, tuple) else (example,)
    return tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in cpu_inputs(inputs))
