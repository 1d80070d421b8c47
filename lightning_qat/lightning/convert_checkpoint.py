"""Converting a QAT checkpoint to int8 in a new process: load it, then run the end-of-fit pipeline on it."""

from __future__ import annotations

import inspect
import os
from typing import Any

import lightning.pytorch as pl

from lightning_qat import files
from lightning_qat.lightning import checkpoint as checkpoint_io
from lightning_qat.lightning import preflight
from lightning_qat.lightning.callback import QATCallback
from lightning_qat.lightning.evaluate import EvalData
from lightning_qat.lightning.report import QATReport
from lightning_qat.lightning.run import QATRun
from lightning_qat.lightning.speed import Speed
from lightning_qat.quantization.convert import cpu_eval_copy

# QATCallback arguments that describe how the checkpoint's network was prepared or trained: the checkpoint decides.
_FROM_CHECKPOINT = {"module", "backend", "engine", "mode", "skip", "relu6_to_relu", "activations"}
_TRAINING_ONLY = {
    "freeze_bn_after",
    "freeze_observers_after",
    "interval",
    "sync_observers",
    "weights",
    "convert",
    "fallback_at",
}


def convert_checkpoint(
    model: pl.LightningModule,
    ckpt_path: str | os.PathLike,
    datamodule: pl.LightningDataModule | None = None,
    trainer: pl.Trainer | None = None,
    **qat_kwargs: Any,
) -> QATReport:
    """Convert a QAT checkpoint to int8 without training: the artifact and report the end of fit would write.

    ``model`` is a fresh (float) instance of the checkpoint's LightningModule class; ``datamodule`` gives the data
    of the final evaluation (default: ``model``'s own dataloader hooks). The settings come from ``qat_kwargs``
    (:class:`~lightning_qat.QATCallback` arguments), or from the ``QATCallback`` in ``trainer``'s callbacks (the
    CLI's ``convert``); ``trainer`` also gives the output directory (its ``log_dir``), the evaluation's batch limit,
    the progress bar and the loggers. The files go to ``save_dir``, else the logger's ``log_dir``, else a fresh
    ``default_root_dir/qat/version_N``.

    Example::

        report = convert_checkpoint(MyModule(), "checkpoints/best.ckpt", datamodule=MyData(), save_dir="int8")

    Raises:
        NotAQATCheckpointError: if the checkpoint holds a float network.
        ValueError: for a ``qat_kwargs`` argument that a conversion cannot honour (how the network was prepared and
            trained is the checkpoint's), for ``qat_kwargs`` next to a ``trainer``, or a ``trainer`` without a
            ``QATCallback``.
    """
    checkpoint = checkpoint_io.read_checkpoint(ckpt_path)
    state = checkpoint_io.require_qat_state(
        checkpoint,
        ckpt_path,
        f"there is no QAT model to convert; load it with {type(model).__name__}.load_from_checkpoint",
    )
    if trainer is None:
        _check_convert_kwargs(qat_kwargs)
        # the checkpoint's engine and backend: their artifact formats
        qat = QATCallback(backend=state.get("backend"), engine=state.get("mode") or "auto", **qat_kwargs)
        trainer = pl.Trainer(
            accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_model_summary=False
        )
    else:
        if qat_kwargs:
            raise ValueError(
                f"convert_checkpoint got a trainer and QATCallback arguments {sorted(qat_kwargs)}: give the "
                "arguments to the QATCallback in the trainer's callbacks, or drop the trainer."
            )
        qat = _callback_of(trainer)
    qat.check_preparation(state)
    float_network = cpu_eval_copy(model.get_submodule(state["module"]))
    float_state = state.get("float_state_dict")
    if float_state is not None:
        float_network.load_state_dict(float_state)
    prepared, example_inputs = checkpoint_io.load_into(model, checkpoint, state)
    model.eval()
    run = QATRun(
        pl_module=model,
        target=state["module"],
        prepared=prepared,
        float_network=float_network,
        example_inputs=example_inputs,
        mode=state["mode"],
        skip=list(state["skip"]),
        relu6_to_relu=state["relu6_to_relu"],
        loaded_from=str(ckpt_path),
        activations=state.get("activations", "static"),
        activation_ms=dict(state.get("activation_ms", {})),
        speed=Speed(**state.get("speed", {})),
        fallback=list(state.get("fallback", [])),  # kept float (and trained so) by a search during the fit
        fallback_met=state.get("fallback_met"),
        fallback_candidates=list(state.get("fallback_candidates", [])),
    )

    def calibration() -> Any:  # the PTQ baseline's training batches, the datamodule set up as a fit would
        if datamodule is None:
            return model.train_dataloader()
        datamodule.prepare_data()
        datamodule.setup("fit")
        return datamodule.train_dataloader()

    data = EvalData(datamodule=datamodule, limit=trainer.limit_val_batches, calibration=calibration)
    if qat.evaluate == "test":
        data.limit = trainer.limit_test_batches
    out_dir = preflight.output_dir(trainer, qat.save_dir, qat.overwrite)
    claimed = preflight.claim_output_dir(trainer, out_dir)
    try:
        qat.report = qat.pipeline(run, data, trainer).run(out_dir)
    finally:
        if claimed is not None:
            files.release(claimed)
    return qat.report


def analyze_checkpoint(
    model: pl.LightningModule,
    ckpt_path: str | os.PathLike,
    datamodule: pl.LightningDataModule | None = None,
    trainer: pl.Trainer | None = None,
    **qat_kwargs: Any,
) -> QATReport:
    """The report of a QAT checkpoint without writing its artifact: metrics, per-layer SQNR, ``qat_layers.png``.

    :func:`convert_checkpoint` with ``export=[]``, same arguments. With ``on_drop="fallback"``,
    ``monitor`` and ``max_metric_drop``, a missed budget is searched as at the end of fit: the report lists every
    candidate and the layers to keep float (``convert_checkpoint`` with the same settings writes that model).

    Example::

        report = analyze_checkpoint(MyModule(), "last.ckpt", datamodule=MyData(), monitor="val_acc")
        print(sorted(report.layer_sqnr.items(), key=lambda item: item[1])[:5])  # the five worst layers
    """
    if trainer is None:
        return convert_checkpoint(model, ckpt_path, datamodule, **{"export": [], **qat_kwargs})
    qat = _callback_of(trainer)
    saved, qat.export = qat.export, []
    try:
        return convert_checkpoint(model, ckpt_path, datamodule, trainer, **qat_kwargs)
    finally:
        qat.export = saved


def _check_convert_kwargs(qat_kwargs: dict[str, Any]) -> None:
    """Refuse every ``QATCallback`` argument a conversion would ignore, naming why."""
    valid = set(inspect.signature(QATCallback.__init__).parameters) - {"self"}
    for name in sorted(qat_kwargs):
        if name in _FROM_CHECKPOINT:
            raise ValueError(
                f"convert_checkpoint: {name}={qat_kwargs[name]!r} cannot be honoured: the checkpoint's network was "
                f"prepared with its own {name}, which the conversion reuses. Drop {name}."
            )
        if name in _TRAINING_ONLY:
            raise ValueError(
                f"convert_checkpoint: {name}={qat_kwargs[name]!r} acts during training (or picks a fit's weights); "
                "a conversion converts the checkpoint's weights as they are. Drop it."
            )
        if name not in valid:
            raise ValueError(
                f"convert_checkpoint: {name!r} is not a QATCallback argument; valid ones here: "
                f"{sorted(valid - _FROM_CHECKPOINT - _TRAINING_ONLY)}."
            )


def _callback_of(trainer: pl.Trainer) -> QATCallback:
    qat = next((cb for cb in trainer.callbacks if isinstance(cb, QATCallback)), None)  # type: ignore[attr-defined]
    if qat is None:
        raise ValueError("convert_checkpoint needs a Trainer with a QATCallback in its callbacks.")
    return qat
