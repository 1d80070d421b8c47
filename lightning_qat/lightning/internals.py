"""The one seam to Lightning's private attributes.

lightning-qat needs three things Lightning has no public API for. Each access lives here, is read without a
silent default, and has a test in ``tests/test_lightning_internals.py``: when Lightning renames one of them, that
test and every caller fail with :class:`LightningInternalsError` naming the attribute and the Lightning version,
instead of a feature quietly turning itself off.
"""

from __future__ import annotations

from typing import Any

import lightning
import lightning.pytorch as pl

from lightning_qat.exceptions import LightningInternalsError


def _read(owner: Any, path: str) -> Any:
    value = owner
    for name in path.split("."):
        try:
            value = getattr(value, name)
        except AttributeError as err:
            raise LightningInternalsError(
                f"lightning-qat reads Lightning's private `{type(owner).__name__}.{path}`, which Lightning "
                f"{lightning.__version__} does not have. Please report this with your Lightning version; the supported "
                "range is in lightning-qat's README."
            ) from err
    return value


def loaded_checkpoint(trainer: pl.Trainer) -> dict[str, Any]:
    """The checkpoint Lightning is restoring (``{}`` outside a restore), read before it loads the model weights."""
    return _read(trainer, "_checkpoint_connector._loaded_checkpoint")


def fit_train_dataloader(trainer: pl.Trainer) -> Any:
    """The training dataloader(s) of the running ``fit``, wherever they come from.

    Works in ``setup``, before Lightning builds ``trainer.train_dataloader``: calls the datamodule's or the module's
    ``train_dataloader`` hook, or returns the loaders passed to ``fit``.
    """
    return _read(trainer, "fit_loop._data_source").dataloader()


def eval_data_source(trainer: pl.Trainer, stage: str) -> Any:
    """Where the ``"val"`` or ``"test"`` dataloaders of ``trainer`` come from.

    A LightningModule or LightningDataModule (whose hook builds them), the dataloaders given to ``fit``/``test``,
    or ``None``.
    """
    loop = "fit_loop.epoch_loop.val_loop" if stage == "val" else "test_loop"
    return _read(trainer, f"{loop}._data_source.instance")


def forget_metric_attributes(pl_module: pl.LightningModule) -> None:
    """Drop the LightningModule's ``id(metric) -> attribute`` cache, stale in a deep copy (new metric ids)."""
    _read(pl_module, "_metric_attributes")
    pl_module._metric_attributes = None
