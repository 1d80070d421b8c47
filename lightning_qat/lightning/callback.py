"""QATCallback: quantization-aware training as a Lightning callback: hooks, argument checks, resumable state.

The work lives below it: preparing and converting in :mod:`lightning_qat.quantization`, the end of fit in
:mod:`lightning_qat.lightning.finish`, the set-up checks in :mod:`lightning_qat.lightning.preflight`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, fields
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_qat import files
from lightning_qat.choices import check_choice, check_count, check_flag
from lightning_qat.exceptions import CheckpointError
from lightning_qat.lightning import activations as activation_choice
from lightning_qat.lightning import checkpoint as checkpoint_io
from lightning_qat.lightning import example_input, internals, preflight
from lightning_qat.lightning.activations import Activations
from lightning_qat.lightning.evaluate import EvalData, Stage, eval_data
from lightning_qat.lightning.finish import (
    ConvertFrom,
    ExportFormat,
    FinishPipeline,
    FinishSettings,
    OnDrop,
    QATRun,
    check_engine,
    check_export,
    check_fallback_at,
    check_guard,
)
from lightning_qat.lightning.install import install
from lightning_qat.lightning.report import MonitorMode, QATReport
from lightning_qat.lightning.target import find_target
from lightning_qat.quantization import ao, compat, engines
from lightning_qat.quantization.backends import Backend, resolve_backend
from lightning_qat.quantization.convert import cpu_eval_copy
from lightning_qat.quantization.engines import Mode, Prepared
from lightning_qat.quantization.fallback import keep_float
from lightning_qat.quantization.prepare import freeze_batch_norm
from lightning_qat.quantization.schedule import FreezeSchedule, Interval, build_schedule, check_after, resolve_after
from lightning_qat.quantization.sync import all_reduce_observers

_STATE_VERSION = 1


class QATCallback(Callback):
    r"""Quantization-aware training for any LightningModule, ending in a real int8 CPU model.

    In ``setup("fit")`` (before optimizers exist and before DDP wraps the model) the network is fused
    (Conv+BN(+ReLU), Linear(+ReLU)) and fake-quantized: FX graph mode when it is traceable, eager mode otherwise.
    During training BatchNorm statistics and then observers are frozen on a schedule; observers never move during
    validation. When the fit ends normally, a CPU copy is converted to int8, evaluated with your own
    ``validation_step`` metrics next to the float and QAT networks, reported, and saved as a TorchScript artifact
    that :func:`lightning_qat.load_quantized` reloads without your code.

    Args:
        module: attribute of the LightningModule holding the network to quantize (dotted paths allowed);
            ``None`` picks the single top-level child that is not a metric or loss.
        backend: ``"x86"``, ``"fbgemm"`` or ``"qnnpack"``; ``None`` picks ``x86`` on x86-64, ``qnnpack`` on ARM.
        mode: ``"auto"`` (FX, falling back to eager when the network cannot be traced), ``"fx"``, ``"eager"`` or
            ``"pt2e"`` (``torch.export`` + torchao's PT2E flow, shipping an AOTInductor package; needs
            ``pip install 'lightning-qat[pt2e]'``, x86/fbgemm backends; see the manual's "PT2E engine" page).
        skip: qualified submodule names (inside ``module``) kept in float, also in the int8 model.
        relu6_to_relu: replace ``nn.ReLU6`` by ``nn.ReLU`` before fusing, as torchvision's quantizable MobileNets do,
            so Conv-BN-ReLU6 blocks fuse into one int8 op (faster int8 model and QAT steps; changes the function
            where activations exceed 6, which QAT fine-tuning adapts to).
        freeze_bn_after: freeze BatchNorm statistics from this epoch/step on; an int (absolute) or a float in
            (0, 1) (fraction of ``max_epochs``/``max_steps``); ``None`` never.
        freeze_observers_after: the same for observers (quantization parameters stop moving).
        interval: ``"epoch"`` or ``"step"`` (optimizer steps), the unit of the two schedules.
        evaluate: evaluate float / QAT / int8 at the end with ``validation_step`` (``"val"``), ``test_step``
            (``"test"``) or not at all (``None``).
        monitor: metric the accuracy guard compares between float and int8 (e.g. ``"val_acc"``).
        monitor_mode: ``"max"`` if higher is better for ``monitor``, ``"min"`` otherwise.
        max_metric_drop: the largest tolerated drop of ``monitor`` from float to int8.
        on_drop: ``"warn"`` or ``"raise"`` when the drop is larger; ``"fallback"`` keeps float the fewest layers that
            meet the budget: ranked by their SQNR (the report's per-layer table), searched with int8 models of the
            trained weights evaluated by your ``validation_step``/``test_step`` (a binary search over the ranking,
            then each layer put back into int8 if the budget allows). Searched at ``fallback_at`` (the rest of QAT
            then trains with those layers float) and, if the end of fit still misses the budget, once more there.
            When no set meets it, the best is kept and the guard warns. FX mode or dynamic activations only.
        fallback_at: when ``on_drop="fallback"`` searches during training: ``"bn"`` (when BatchNorm statistics
            freeze; at the end of fit only if they never do), an epoch/step index (int >= 1) or fraction (as
            ``freeze_bn_after``), or ``"end"`` (at the end of fit only: QAT will have trained around the damaged
            layers, which keeping them float then does not undo).
        save_dir: where ``model_int8.pt`` and the report go; default ``trainer.log_dir``.
        save_artifact: write the int8 artifacts (``False``: convert, evaluate and report only).
        export: the artifact formats: ``"torchscript"`` (``model_int8.pt``, :func:`~lightning_qat.load_quantized`)
            and ``"onnx"`` (``model_int8.onnx``, a QDQ graph for ONNX Runtime / OpenVINO; needs
            ``pip install 'lightning-qat[onnx]'``); with ``mode="pt2e"``, ``"pt2"`` only (``model_int8.pt2``, an
            AOTInductor package for the example input's shapes). ``None``: the engine's own (``"torchscript"``, or
            ``"pt2"``). Each one is evaluated and timed in the report as it will be loaded.
        ptq_baseline: also calibrate, convert and evaluate a post-training-quantized copy of the float network.
        ptq_batches: training batches used to calibrate the PTQ baseline.
        sync_observers: under DDP, all-reduce observer min/max each step so every rank has the same qparams.
        latency_repeats: timed forward passes per network for the latency columns of the report.
        convert: which weights become the int8 model: ``"last"`` (the end of fit) or ``"best"`` (the best checkpoint
            of the trainer's ``ModelCheckpoint``; the last weights when it has none).
        untrained_float: the network QAT starts from is untrained (random weights): the report marks its float row
            so, and the accuracy guard does not compare against it.
        overwrite: let a run write into a ``save_dir`` that already holds an earlier run's artifact or report
            (refused by default, before training). With no logger and no ``save_dir``, every run gets a fresh
            ``default_root_dir/qat/version_N``.
        activations: how the int8 artifact quantizes activations: ``"static"`` (scales calibrated by QAT, every
            layer int8), ``"dynamic"`` (Linears in int8 with activations quantized per batch at run time, the other
            layers float; QAT then trains the weights' quantization only) or ``"auto"`` (static, unless the network
            is Linear-heavy, a transformer, and dynamic is faster on the example input: both are timed in
            ``setup``, before training, and the report says which won and by how much).

    Raises:
        ValueError: for any argument outside the values listed above.
        OnnxExtraMissing: for ``export=[..., "onnx"]`` without ``pip install 'lightning-qat[onnx]'``.
        PT2EUnavailable: for ``mode="pt2e"`` without torchao (or with a torch older than it needs).

    At fit end, on global rank 0, the :class:`~lightning_qat.lightning.finish.FinishPipeline` that :meth:`pipeline`
    returns runs its steps ``convert_network``, ``write_artifact``, ``evaluate_networks``, ``analyze_layers``,
    ``fall_back``, ``measure_networks``, ``write_report`` and ``check_metric_drop``, in that order: the artifact is on
    disk before anything that can fail.
    To change one step, subclass the pipeline and set it as :attr:`pipeline_class` of a subclass of this callback.

    Example::

        import lightning.pytorch as pl
        from lightning_qat import QATCallback
        from lightning_qat.app.data import DigitsDataModule
        from lightning_qat.app.models import ImageClassifier

        qat = QATCallback(freeze_bn_after=1, freeze_observers_after=2, monitor="val_acc")
        trainer = pl.Trainer(max_epochs=3, callbacks=[qat])
        trainer.fit(ImageClassifier("resnet18"), datamodule=DigitsDataModule(image_size=32, channels=3))
        print(qat.report.metrics["int8"]["val_acc"], qat.quantized_model)
    """

    pipeline_class: type[FinishPipeline] = FinishPipeline  # a subclass changes steps of the end of fit

    def __init__(
        self,
        module: str | None = None,
        backend: Backend | None = None,
        mode: Mode = "auto",
        skip: Sequence[str] = (),
        relu6_to_relu: bool = False,
        freeze_bn_after: int | float | None = 0.5,
        freeze_observers_after: int | float | None = 0.75,
        interval: Interval = "epoch",
        evaluate: Stage | None = "val",
        monitor: str | None = None,
        monitor_mode: MonitorMode = "max",
        max_metric_drop: float | None = None,
        on_drop: OnDrop = "warn",
        save_dir: str | None = None,
        save_artifact: bool = True,
        export: Sequence[ExportFormat] | None = None,
        ptq_baseline: bool = False,
        ptq_batches: int = 8,
        sync_observers: bool = True,
        latency_repeats: int = 20,
        convert: ConvertFrom = "last",
        untrained_float: bool = False,
        overwrite: bool = False,
        activations: Activations = "auto",
        fallback_at: int | float | Literal["bn", "end"] = "bn",
    ) -> None:
        super().__init__()
        self.backend = resolve_backend(backend)
        check_choice("mode", mode, Mode)
        check_choice("interval", interval, Interval)
        check_choice("evaluate", evaluate, Stage | None)
        check_choice("monitor_mode", monitor_mode, MonitorMode)
        check_choice("on_drop", on_drop, OnDrop)
        check_choice("convert", convert, ConvertFrom)
        check_choice("activations", activations, Activations)
        if isinstance(skip, str) or not all(isinstance(s, str) for s in skip):
            raise ValueError(f"skip={skip!r} must be a list of submodule names, e.g. ['classifier', 'features.0'].")
        check_after("freeze_bn_after", freeze_bn_after)
        check_after("freeze_observers_after", freeze_observers_after)
        check_guard(monitor, max_metric_drop, evaluate)
        if on_drop == "fallback" and max_metric_drop is None:
            raise ValueError(f"on_drop='fallback' needs max_metric_drop (the budget to meet) and monitor={monitor!r}.")
        check_fallback_at(fallback_at)
        for name, flag in (
            ("relu6_to_relu", relu6_to_relu),
            ("save_artifact", save_artifact),
            ("ptq_baseline", ptq_baseline),
            ("sync_observers", sync_observers),
            ("untrained_float", untrained_float),
            ("overwrite", overwrite),
        ):
            check_flag(name, flag)
        check_count("ptq_batches", ptq_batches)
        export = export if export is not None else [engines.get(mode).formats[0]]  # type: ignore[list-item]
        check_export(export, mode)
        check_engine(mode, self.backend, on_drop, activations)
        check_count("latency_repeats", latency_repeats)
        self.module = module
        self.mode = mode
        self.skip = list(skip)
        self.relu6_to_relu = relu6_to_relu
        self.freeze_bn_after = freeze_bn_after
        self.freeze_observers_after = freeze_observers_after
        self.interval = interval
        self.evaluate = evaluate
        self.monitor = monitor
        self.monitor_mode = monitor_mode
        self.max_metric_drop = max_metric_drop
        self.on_drop = on_drop
        self.save_dir = save_dir
        self.save_artifact = save_artifact
        self.export = list(export)
        self.ptq_baseline = ptq_baseline
        self.ptq_batches = ptq_batches
        self.sync_observers = sync_observers
        self.latency_repeats = latency_repeats
        self.convert = convert
        self.untrained_float = untrained_float
        self.overwrite = overwrite
        self.activations = activations
        self.fallback_at = fallback_at

        self.target: str | None = None
        self.prepared: Prepared | None = None
        self.chosen_activations: Literal["static", "dynamic"] = "static"  # decided in setup("fit"), or restored
        self._activation_ms: dict[str, float] = {}
        self.fallback: list[str] = []  # layers the fallback search during the fit kept float (then trained so)
        self.fallback_searched = False  # the search during the fit ran (a resumed run does not run it again)
        self._fallback_met: bool | None = None
        self._fallback_candidates: list[dict[str, Any]] = []
        self._search_at: int | None = None
        self.report: QATReport | None = None
        self.finished: FinishPipeline | None = None  # the last end-of-fit pipeline run, with its results
        self.bn_frozen = False
        self.observers_frozen = False
        self._schedule: FreezeSchedule | None = None
        self._float_network: nn.Module | None = None
        self._example_inputs: tuple[Any, ...] = ()
        self._paused_observers: list[dict[str, torch.Tensor]] | None = None
        self._preparation_check: RemovableHandle | None = None
        self._said_float = False
        self._loaded_from: str | None = None
        self._out_dir: Path | None = None
        self._claim: Path | None = None

    @property
    @override
    def state_key(self) -> str:
        """``"QATCallback"`` for subclasses too, so every QAT checkpoint keeps its state under one key."""
        return checkpoint_io.STATE_KEY

    @property
    def quantized_model(self) -> nn.Module | None:
        """The int8 network of the last conversion (``None`` before the end of fit)."""
        return self.finished.quantized_model if self.finished else None

    @property
    def artifact_path(self) -> Path | None:
        """The TorchScript artifact written at the end of fit (``None`` if none was)."""
        return self.finished.artifact_path if self.finished else None

    @property
    def onnx_path(self) -> Path | None:
        """The ONNX artifact written at the end of fit (``None`` if none was)."""
        return self.finished.onnx_path if self.finished else None

    # ------------------------------------------------------------------ set-up
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        target = find_target(pl_module, self.module)
        network = pl_module.get_submodule(target)
        if self.prepared is not None and network is self.prepared.module:
            return  # the network this callback prepared, e.g. `trainer.test` after `trainer.fit`
        notice = ao.first_notice()
        if notice:
            rank_zero_info(notice)
        self.target = target
        if stage == "fit":
            self._prepare_for_fit(trainer, pl_module, network)
        elif ao.fake_quant_modules(network):  # e.g. from load_qat_checkpoint
            self.prepared = Prepared(network, engines.of_network(network), "already QAT-prepared", 0)
        else:  # validate / test / predict: float, unless a QAT checkpoint's weights arrive (_before_weights_load)
            self.prepared = None
        self._preparation_check = compat.register_load_state_dict_pre_hook(
            pl_module, partial(self._before_weights_load, trainer)
        )

    def _prepare_for_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule, network: nn.Module) -> None:
        assert self.target is not None
        network = preflight.check_fit(trainer, pl_module, self.target, network, self.evaluate)
        self._loaded_from = None
        self._example_inputs = example_input.example_inputs(trainer, pl_module)
        # the checked copy is the float baseline (an eval forward pass leaves a float network as it was)
        self._float_network = preflight.check_example(network, self._example_inputs, self.target)
        prepared = self._install(pl_module, network, self.mode)
        probe, quantized = preflight.run_preflight(
            pl_module,
            self.target,
            prepared,
            self._float_network,
            self._example_inputs,
            self.backend,
            self.evaluate,
            eval_data(trainer, self.evaluate),
            onnx="onnx" in self.export and self.save_artifact,
            torchscript="torchscript" in self.export and self.save_artifact,
            monitor=self.monitor,
        )
        self._choose_activations(trainer, prepared, probe, quantized)
        if not trainer.fast_dev_run:  # type: ignore[attr-defined]  # set by Lightning's debugging connector
            self._out_dir = preflight.output_dir(trainer, self.save_dir, self.overwrite)
            self._claim = preflight.claim_output_dir(trainer, self._out_dir)  # last: nothing after it can fail

    def _choose_activations(
        self, trainer: pl.Trainer, prepared: Prepared, probe: nn.Module, quantized: nn.Module
    ) -> None:
        """Static or dynamic int8 activations for the artifact (rank 0's timing for every rank), trained for now.

        ``probe`` and ``quantized``: the preflight's calibrated copy of the prepared network and its int8 conversion.
        An engine without dynamic activations (PT2E) quantizes them statically.
        """
        if not prepared.engine.dynamic:
            self.chosen_activations, self._activation_ms = "static", {}
            return
        choice = activation_choice.choose(
            probe, quantized, self.backend, self._example_inputs, self.activations, self.latency_repeats
        )
        if trainer.world_size > 1:
            choice = trainer.strategy.broadcast(choice, src=0)
        self.chosen_activations, self._activation_ms = choice
        if self.chosen_activations == "dynamic" or self._activation_ms:
            rank_zero_info(activation_choice.describe(*choice))
        ao.set_activation_fake_quant(prepared.module, self.chosen_activations == "static")

    def _prepare_like_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, state: dict[str, Any]
    ) -> None:
        """Validate / test / predict of a QAT checkpoint: prepare the float network as the checkpoint's was."""
        assert self.target is not None
        self.check_preparation(state)
        self._loaded_from = str(trainer.ckpt_path)
        self._example_inputs = example_input.stored(state) or example_input.module_example_inputs(pl_module)
        network = pl_module.get_submodule(self.target)
        self._float_network = cpu_eval_copy(network)
        self._install(pl_module, network, state["mode"])

    def _install(self, pl_module: pl.LightningModule, network: nn.Module, mode: Mode) -> Prepared:
        assert self.target is not None
        self.prepared = install(
            pl_module, self.target, network, self.backend, mode, self.skip, self._example_inputs, self.relu6_to_relu
        )
        self.bn_frozen = self.observers_frozen = False
        return self.prepared

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_preparation_check()  # checkpoints are restored by now

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_preparation_check()
        self._release_output_dir()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._release_output_dir()  # Lightning calls no teardown hook after an exception

    def _release_output_dir(self) -> None:
        if self._claim is not None:
            files.release(self._claim)
            self._claim = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._schedule, notes, warnings = build_schedule(
            self.interval,
            self.freeze_bn_after,
            self.freeze_observers_after,
            trainer.max_epochs,
            trainer.max_steps,
            trainer.estimated_stepping_batches,
        )
        for note in notes:
            rank_zero_info(note)
        for warning in warnings:
            rank_zero_warn(warning)
        self._search_at = None
        if self.on_drop == "fallback" and self.fallback_at != "end":
            at = self._schedule.bn_at if self.fallback_at == "bn" else self.fallback_at
            total = trainer.max_epochs if self._schedule.interval == "epoch" else trainer.estimated_stepping_batches
            length = int(total) if total is not None and 0 <= total < math.inf else None
            at = resolve_after("fallback_at", at, length, self._schedule.interval)
            self._search_at = None if at is None else max(1, at)  # observers must have seen data (freeze_bn_after=0)

    # ------------------------------------------------------------------ training
    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._schedule is not None and self._schedule.interval == "epoch":
            self._apply_schedule(trainer, pl_module, trainer.current_epoch)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._schedule is not None and self._schedule.interval == "step":
            self._apply_schedule(trainer, pl_module, trainer.global_step)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.sync_observers and not self.observers_frozen and trainer.world_size > 1:
            all_reduce_observers(self.network(pl_module))
        pl_module.log("qat/bn_frozen", float(self.bn_frozen), on_step=True, on_epoch=False)
        pl_module.log("qat/observers_frozen", float(self.observers_frozen), on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ evaluation loops during QAT
    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pause_observers(pl_module)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._resume_observers(pl_module)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pause_observers(pl_module)

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._resume_observers(pl_module)

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pause_observers(pl_module)

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._resume_observers(pl_module)

    # ------------------------------------------------------------------ end of fit
    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.prepared is None or trainer.interrupted:
            return
        failure: Exception | None = None
        report: QATReport | None = None
        out_dir = self._out_dir or Path(trainer.default_root_dir)  # resolved (and checked) in setup, on every rank
        if trainer.is_global_zero:
            try:
                pipeline = self.pipeline(self._run(trainer, pl_module), eval_data(trainer, self.evaluate), trainer)
                self.finished = pipeline
                fast_dev_run = trainer.fast_dev_run  # type: ignore[attr-defined]  # set by Lightning's init
                report = pipeline.run(out_dir, write=not fast_dev_run)
            except Exception as err:  # noqa: BLE001 - re-raised below, after the other ranks were told
                failure = err
        if trainer.world_size > 1:
            message, data = trainer.strategy.broadcast(
                (str(failure) if failure else None, report.to_dict() if report else None), src=0
            )
            if message is not None and failure is None:
                raise RuntimeError(f"QAT finish failed on global rank 0: {message}")
            report = QATReport.from_dict(data) if data else None
        if failure is not None:
            raise failure
        self.report = report

    def pipeline(self, run: QATRun, data: EvalData, trainer: pl.Trainer) -> FinishPipeline:
        """The end-of-fit pipeline (a :attr:`pipeline_class`) for ``run`` with this callback's settings.

        Used at the end of fit and by :func:`~lightning_qat.convert_checkpoint`.
        """
        settings = FinishSettings(**{f.name: getattr(self, f.name) for f in fields(FinishSettings)})  # same names
        progress = trainer.progress_bar_callback is not None
        return self.pipeline_class(
            settings, run, data, trainer.loggers, trainer.global_step, progress, str(trainer.default_root_dir)
        )

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> QATRun:
        assert self.target is not None
        assert self.prepared is not None
        assert self._float_network is not None
        best = getattr(trainer.checkpoint_callback, "best_model_path", "")  # a ModelCheckpoint's; "" without one
        return QATRun(
            pl_module=pl_module,
            target=self.target,
            prepared=self.prepared,
            float_network=self._float_network,
            example_inputs=self._example_inputs,
            mode=self.mode,
            skip=list(self.skip),
            relu6_to_relu=self.relu6_to_relu,
            best_checkpoint=best or "",
            loaded_from=self._loaded_from,
            activations=self.chosen_activations,
            activation_ms=dict(self._activation_ms),
            fallback=list(self.fallback),
            fallback_met=self._fallback_met,
            fallback_candidates=list(self._fallback_candidates),
        )

    # ------------------------------------------------------------------ resume
    @override
    def state_dict(self) -> dict[str, Any]:
        # The freeze flags are not state: the schedule derives them from the trainer's restored counters.
        # The float weights QAT started from keep the report's float row right after a resume or a convert.
        return {
            "version": _STATE_VERSION,
            "backend": self.backend,
            "mode": self.prepared.mode if self.prepared else None,
            "module": self.target,
            "skip": list(self.skip),
            "relu6_to_relu": self.relu6_to_relu,
            "float_state_dict": self._float_network.state_dict() if self._float_network is not None else None,
            "example_inputs": example_input.storable(self._example_inputs),
            "activations": self.chosen_activations,
            "activation_ms": dict(self._activation_ms),
            "fallback": list(self.fallback),
            "fallback_searched": self.fallback_searched,
            "fallback_met": self._fallback_met,
            "fallback_candidates": list(self._fallback_candidates),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version = state_dict.get("version", _STATE_VERSION)
        if version > _STATE_VERSION:
            raise CheckpointError(
                f"This checkpoint's QATCallback state has version {version}, newer than this lightning-qat "
                f"understands ({_STATE_VERSION}); upgrade lightning-qat to resume from it."
            )
        self.check_preparation(state_dict)
        # what QAT trained for (the activation fake-quant switches are buffers: they come back with the weights)
        saved = state_dict.get("activations", "static")
        if saved != self.chosen_activations and self.prepared is not None:
            rank_zero_info(f"QAT: the checkpoint's run trained for {saved} int8 activations: the artifact keeps them.")
        self.chosen_activations = saved
        self._activation_ms = dict(state_dict.get("activation_ms", {}))
        # the layers kept float: their fake-quant switches are buffers too; the names are what the conversion needs
        self.fallback = list(state_dict.get("fallback", []))
        self.fallback_searched = bool(state_dict.get("fallback_searched", False))
        self._fallback_met = state_dict.get("fallback_met")
        self._fallback_candidates = list(state_dict.get("fallback_candidates", []))
        float_state = state_dict.get("float_state_dict")
        if float_state is not None and self._float_network is not None:
            self._float_network.load_state_dict(float_state)

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.prepared is not None:
            checkpoint["state_dict"] = checkpoint_io.mark(checkpoint["state_dict"])

    def check_preparation(self, saved_state: dict[str, Any]) -> None:
        """Raise ``CheckpointError`` naming the first setting that prepared the checkpoint's network differently."""
        current = {"backend": self.backend, "skip": list(self.skip), "relu6_to_relu": self.relu6_to_relu}
        current["module"] = self.target if self.target is not None else self.module  # None: found in setup
        current["mode"] = (  # "auto" matches whichever engine the checkpoint's run took
            self.prepared.mode if self.prepared is not None else self.mode if self.mode in engines.ENGINES else None
        )
        checkpoint_io.check_same_preparation(saved_state, current)

    def _before_weights_load(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, state_dict: dict[str, Any], *_: Any
    ) -> None:
        """Runs when Lightning loads a checkpoint into the LightningModule, before any weight is copied.

        Drops the QAT checkpoint marker. In validate / test / predict, prepares the float network as the checkpoint's
        was, so the keys match. On resume, compares the QAT configuration: a different skip list or mode would change
        the keys, and the user gets the setting that differs instead of Lightning's missing/unexpected-keys error.
        """
        checkpoint_io.unmark(state_dict)
        saved = checkpoint_io.qat_state(internals.loaded_checkpoint(trainer))
        if saved is None:
            return
        if self.prepared is None:
            self._prepare_like_checkpoint(trainer, pl_module, saved)
        self.load_state_dict(saved)

    def _remove_preparation_check(self) -> None:
        if self._preparation_check is not None:
            self._preparation_check.remove()
            self._preparation_check = None

    # ------------------------------------------------------------------ helpers
    def network(self, pl_module: pl.LightningModule) -> nn.Module:
        """The (prepared) network inside ``pl_module``."""
        assert self.target is not None
        return pl_module.get_submodule(self.target)

    def _apply_schedule(self, trainer: pl.Trainer, pl_module: pl.LightningModule, counter: int) -> None:
        if self._schedule is None:
            return
        freeze_bn, freeze_observers = self._schedule.due(counter)
        network = self.network(pl_module)
        if freeze_bn and not self.bn_frozen:
            freeze_batch_norm(network)
            self.bn_frozen = True
            rank_zero_info(f"QAT: BatchNorm statistics frozen at {self._schedule.interval} {counter}.")
        if freeze_observers and not self.observers_frozen:
            ao.set_observers(network, False)
            self.observers_frozen = True
            rank_zero_info(
                f"QAT: observers frozen at {self._schedule.interval} {counter}; quantization parameters fixed."
            )
        if self._search_at is not None and counter >= self._search_at and not self.fallback_searched:
            self._search_fallback(trainer, pl_module, f"{self._schedule.interval} {counter}")

    def _search_fallback(self, trainer: pl.Trainer, pl_module: pl.LightningModule, when: str) -> None:
        """The accuracy-budget search during the fit, on global rank 0; every rank keeps the result float."""
        self.fallback_searched = True
        found: tuple[list[str], bool | None, list[dict[str, Any]]] | None = None
        if trainer.is_global_zero:
            pipeline = self.pipeline(self._run(trainer, pl_module), eval_data(trainer, self.evaluate), trainer)
            try:
                result = pipeline.search_during_fit(when)
            except Exception as err:  # noqa: BLE001 - training goes on as it was; the end of fit searches again
                rank_zero_warn(f"QAT fallback ({when}) failed, training goes on unchanged: {type(err).__name__}: {err}")
                result = None
            if result is not None:
                candidates = [asdict(candidate) for candidate in result.candidates]
                found = ([group.layer for group in pipeline.float_groups], result.chosen is not None, candidates)
        if trainer.world_size > 1:
            found = trainer.strategy.broadcast(found, src=0)
        if found is None:
            return
        self.fallback, self._fallback_met, self._fallback_candidates = found
        network = self.network(pl_module)
        keep_float(network, FinishPipeline.resolve_groups(network, self.fallback, self.chosen_activations == "static"))
        rank_zero_info(f"QAT: training goes on with {', '.join(self.fallback) or 'no layer'} kept float.")

    def _pause_observers(self, pl_module: pl.LightningModule) -> None:
        """Observers off for an evaluation loop, which then leaves no trace in the quantization state."""
        if self.prepared is None:
            if not self._said_float:
                self._said_float = True
                rank_zero_info("QAT: the network and checkpoint hold no QAT state: they are evaluated as float.")
            return
        if self._paused_observers is None:
            self._paused_observers = ao.pause_observers(self.network(pl_module))

    def _resume_observers(self, pl_module: pl.LightningModule) -> None:
        if self._paused_observers is not None:
            ao.restore_observers(self.network(pl_module), self._paused_observers)
            self._paused_observers = None
