"""QAT checkpoints: finding the callback's state in a Lightning checkpoint and loading it into a fresh module.

A checkpoint written during a QAT fit holds the *prepared* network's weights (fused modules, fake-quant state) and the
QATCallback's state (backend, mode, skip list, the float weights QAT started from, a small example input). A fresh
LightningModule holds the float network, so its keys differ: the network must be prepared the same way first.
:class:`~lightning_qat.QATCallback` does that in every stage with ``ckpt_path``; :func:`load_qat_checkpoint` does it
without a Trainer. The checkpoint's ``state_dict`` also carries :data:`MARKER`, a key that only lightning-qat removes,
so loading a QAT checkpoint without lightning-qat fails with a message that says how to load it.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_qat import ao, compat
from lightning_qat.prepare import Prepared, prepare_model
from lightning_qat.report import QATReport

MARKER = (
    "lightning_qat: this is a QAT checkpoint; load it with lightning_qat.load_qat_checkpoint(YourModule, path), "
    "or give a Trainer with QATCallback() the ckpt_path"
)
_STATE_KEYS = {"backend", "mode", "module", "skip", "relu6_to_relu"}


class NotAQATCheckpointError(ValueError):
    """The checkpoint holds no QATCallback state: its network is float."""


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a Lightning checkpoint on the CPU with ``weights_only=True`` (no code from the file runs).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint file {str(path)!r} does not exist.")
    with ao.quiet():
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def qat_state(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The QATCallback state stored in ``checkpoint``, or ``None`` for a float checkpoint."""
    for state in checkpoint.get("callbacks", {}).values():
        if isinstance(state, dict) and state.keys() >= _STATE_KEYS:
            return state
    return None


def mark(state_dict: dict[str, Any]) -> OrderedDict[str, Any]:
    """``state_dict`` with :data:`MARKER` first, so a plain ``load_state_dict`` names lightning-qat in its error."""
    return OrderedDict([(MARKER, torch.zeros(())), *state_dict.items()])


def unmark(state_dict: dict[str, Any]) -> None:
    """Remove :data:`MARKER` from ``state_dict`` in place (a no-op for unmarked state dicts)."""
    state_dict.pop(MARKER, None)


def network_state(state_dict: dict[str, Any], target: str) -> dict[str, Any]:
    """The entries of a LightningModule ``state_dict`` below the submodule ``target``, with that prefix removed."""
    prefix = f"{target}."
    return {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}


def example_inputs_of(state: dict[str, Any]) -> tuple[Any, ...] | None:
    """The example input a QAT checkpoint stores (two rows of the input the network was prepared with)."""
    stored = state.get("example_inputs")
    return tuple(stored) if stored else None


def prepare_like(network: nn.Module, state: dict[str, Any], example_inputs: tuple[Any, ...]) -> Prepared:
    """Prepare a float ``network`` exactly as the checkpoint's network was (backend, mode, skip, ReLU6 swap)."""
    return prepare_model(
        network,
        state["backend"],
        state["mode"],
        state["skip"],
        example_inputs,
        relu6_to_relu=state["relu6_to_relu"],
    )


def load_qat_checkpoint(
    module_class: type[pl.LightningModule], path: str | os.PathLike, **init_kwargs: Any
) -> pl.LightningModule:
    """A QAT checkpoint loaded into a fresh ``module_class``: the network prepared as in the run, then its weights.

    The result is ready for ``trainer.test`` / ``validate`` / ``predict`` (with a ``QATCallback`` in the Trainer,
    which keeps observers still in evaluation loops), for more QAT training, or for :func:`~lightning_qat.convert`.

    Example::

        model = load_qat_checkpoint(MyModule, "checkpoints/best.ckpt")

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        NotAQATCheckpointError: if the checkpoint holds no QAT state (use ``module_class.load_from_checkpoint``).
    """
    checkpoint = read_checkpoint(path)
    state = qat_state(checkpoint)
    if state is None:
        raise NotAQATCheckpointError(
            f"{str(path)!r} holds no QATCallback state, so its network is float: load it with "
            f"{module_class.__name__}.load_from_checkpoint({str(path)!r})."
        )
    with warnings.catch_warnings():  # the float module does not have the QAT keys yet: loaded strictly below
        warnings.filterwarnings("ignore", message=r".*(keys|Found keys).*")
        model = module_class.load_from_checkpoint(path, map_location="cpu", strict=False, **init_kwargs)
    network = model.get_submodule(state["module"])
    inputs = example_inputs_of(state) or module_example_inputs(model)
    prepared = prepare_like(network, state, inputs)
    compat.set_submodule(model, state["module"], prepared.module)
    weights = dict(checkpoint["state_dict"])
    unmark(weights)
    model.load_state_dict(weights, strict=True)
    return model.eval()


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


def convert_checkpoint(
    model: pl.LightningModule,
    ckpt_path: str | os.PathLike,
    datamodule: pl.LightningDataModule | None = None,
    trainer: pl.Trainer | None = None,
    **qat_kwargs: Any,
) -> QATReport:
    """Convert a QAT checkpoint to int8 without training: the artifact and report the end of fit would write.

    ``model`` is a fresh (float) instance of the checkpoint's LightningModule class; ``datamodule`` gives the data
    of the final evaluation. ``trainer`` (default: a CPU Trainer with ``QATCallback(**qat_kwargs)``, no logger)
    must hold a ``QATCallback``; the files go to its ``save_dir``, else ``trainer.log_dir``.

    Example::

        report = convert_checkpoint(MyModule(), "checkpoints/best.ckpt", datamodule=MyData(), save_dir="int8")

    Raises:
        NotAQATCheckpointError: if the checkpoint holds a float network.
    """
    from lightning_qat.callbacks.qat import QATCallback

    if trainer is None:
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            callbacks=[QATCallback(**qat_kwargs)],
        )
    qat = next((cb for cb in trainer.callbacks if isinstance(cb, QATCallback)), None)
    if qat is None:
        raise ValueError("convert_checkpoint needs a Trainer with a QATCallback in its callbacks.")
    limit = trainer.limit_val_batches
    trainer.limit_val_batches = 0  # only set-up and the checkpoint restore: the evaluation comes in `finish`
    try:
        trainer.validate(model, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)
    finally:
        trainer.limit_val_batches = limit
    if qat.prepared is None:
        raise NotAQATCheckpointError(
            f"{str(ckpt_path)!r} holds no QATCallback state, so its network is float: there is no QAT model to convert."
        )
    out_dir = qat.output_dir(trainer)
    qat.report = qat.finish(trainer, model, out_dir)
    return qat.report
