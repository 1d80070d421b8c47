"""The network's input: found in a batch, walked through nested tuples / lists / dicts, copied to the CPU."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch


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


def map_tensors(fn: Callable[[torch.Tensor], Any], value: Any) -> Any:
    """``value`` with ``fn`` applied to every tensor in it, through the containers torch's pytree knows.

    Containers keep their type: a Hugging Face ``ModelOutput`` (transformers registers it) stays one, so ``.logits``
    still works on it.
    """
    return torch.utils._pytree.tree_map_only(torch.Tensor, fn, value)


def tensors(value: Any) -> list[torch.Tensor]:
    """Every tensor in ``value`` (through tuples, lists and dicts), in order."""
    found: list[torch.Tensor] = []
    map_tensors(found.append, value)
    return found


def cpu_inputs(inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """``inputs`` with every tensor (also inside tuples, lists, dicts) detached and on the CPU; other values as is."""
    return tuple(map_tensors(lambda x: x.detach().cpu(), x) for x in inputs)


def batch_size(inputs: tuple[Any, ...]) -> int:
    """The leading dimension of the first tensor of the inputs (1 for a scalar or no tensor)."""
    first = next(iter(tensors(inputs)), None)
    return int(first.shape[0]) if first is not None and first.dim() > 0 else 1


def with_batch(inputs: tuple[Any, ...], size: int) -> tuple[Any, ...]:
    """``inputs`` with ``size`` rows: every tensor whose first dimension is the batch has its rows repeated or cut."""
    batch = batch_size(inputs)

    def rows(x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[0] != batch:
            return x
        return x[torch.arange(size, device=x.device) % batch]

    return tuple(map_tensors(rows, x) for x in inputs)


def shorter(inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """``inputs`` with every token sequence one position shorter: 2-D integer or boolean tensors' second dimension."""

    def cut(x: torch.Tensor) -> torch.Tensor:
        sequence = x.dim() == 2 and x.shape[1] > 2 and not (x.is_floating_point() or x.is_complex())
        return x[:, :-1] if sequence else x

    return tuple(map_tensors(cut, x) for x in inputs)


def plain(value: Any) -> Any:
    """``value`` in containers any process can rebuild: mappings as dicts, named tuples as tuples, tensors as they are.

    A Hugging Face ``ModelOutput`` becomes the dict of its fields: an artifact returning it would need transformers
    to be loaded (torch's pytree names its class).
    """
    if isinstance(value, Mapping):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return tuple(plain(item) for item in value)
    if isinstance(value, list):
        return [plain(item) for item in value]
    return value
