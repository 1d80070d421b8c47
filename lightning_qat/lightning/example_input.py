"""The network's example input: from the LightningModule or the first training batch, and as a checkpoint keeps it."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from lightning_qat.lightning import internals
from lightning_qat.quantization.inputs import batch_input, cpu_inputs, map_tensors


def example_inputs(trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[Any, ...]:
    """CPU example inputs of the network: ``example_input_array``, else the input of the first training batch."""
    example = pl_module.example_input_array
    if example is None:
        datamodule = trainer.datamodule  # type: ignore[attr-defined]  # set by Lightning's data connector
        loader = datamodule.train_dataloader() if datamodule is not None else internals.fit_train_dataloader(trainer)
        example = batch_input(next(iter(loader)))
    inputs = example if isinstance(example, tuple) else (example,)
    return map_tensors(torch.clone, cpu_inputs(inputs))


def module_example_inputs(model: pl.LightningModule) -> tuple[Any, ...]:
    """``model.example_input_array`` as a tuple, for a checkpoint that stores no example input.

    Raises:
        ValueError: if the module has none, naming the fix.
    """
    example = model.example_input_array
    if example is None:
        raise ValueError(
            "This QAT checkpoint was written by an older lightning-qat and stores no example input; set "
            f"`example_input_array` on {type(model).__name__} so its network can be prepared."
        )
    return example if isinstance(example, tuple) else (example,)


def storable(inputs: tuple[Any, ...]) -> list[Any] | None:
    """Two rows of the example input, for a checkpoint (``None`` unless it is made of tensors, tuples, lists, dicts)."""
    if not inputs or not all(_only_tensors(x) for x in inputs):
        return None
    return [map_tensors(lambda t: t[:2].clone() if t.dim() else t.clone(), x) for x in inputs]


def stored(state: dict[str, Any]) -> tuple[Any, ...] | None:
    """The example input a QAT checkpoint's callback state stores (what :func:`storable` made), or ``None``."""
    inputs = state.get("example_inputs")
    return tuple(inputs) if inputs else None


def _only_tensors(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, dict):
        return all(_only_tensors(v) for v in value.values())
    if isinstance(value, (tuple, list)):
        return all(_only_tensors(v) for v in value)
    return False
