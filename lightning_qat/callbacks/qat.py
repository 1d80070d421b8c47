"""QATCallback: quantization-aware training as a Lightning callback. Hooks only; the work lives in the modules."""

from __future__ import annotations

import contextlib
import copy
import signal
import threading
import time
from collections.abc import Iterator, Sequence
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

from lightning_qat import ao, compat, files, lightning_internals, preflight
from lightning_qat import checkpoint as checkpoint_io
from lightning_qat.backends import Backend, resolve_backend
from lightning_qat.choices import check_choice, check_count, check_flag, choices_of
from lightning_qat.convert import (
    cpu_eval_copy,
    freeze_for_inference,
    load_quantized,
    save_torchscript,
    to_int8,
    to_torchscript,
)
from lightning_qat.evaluate import (
    Stage,
    count_quantized_layers,
    float_parameters,
    measure_latency,
    module_with_network,
    run_evaluation,
    serialized_size,
)
from lightning_qat.inputs import batch_input, batch_size, cpu_inputs, example_inputs, map_tensors
from lightning_qat.onnx_export import OnnxRuntimeNetwork, check_onnx_available, export_onnx, onnxruntime_version
from lightning_qat.prepare import Mode, Prepared, find_target, float_islands, prepare_model
from lightning_qat.report import MonitorMode, QATReport
from lightning_qat.schedule import FreezeSchedule, Interval, build_schedule, check_after
from lightning_qat.sync import all_reduce_observers

OnDrop = Literal["warn", "raise"]
ExportFormat = Literal["torchscript", "onnx"]
ConvertFrom = Literal["last", "best"]
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
        mode: ``"auto"`` (FX, falling back to eager when the network cannot be traced), ``"fx"`` or ``"eager"``.
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
        on_drop: ``"warn"`` or ``"raise"`` when the drop is larger.
        save_dir: where ``model_int8.pt`` and the report go; default ``trainer.log_dir``.
        save_artifact: write the int8 artifacts (``False``: convert, evaluate and report only).
        export: the artifact formats: ``"torchscript"`` (``model_int8.pt``, :func:`~lightning_qat.load_quantized`)
            and ``"onnx"`` (``model_int8.onnx``, a QDQ graph for ONNX Runtime / OpenVINO; needs
            ``pip install 'lightning-qat[onnx]'``). Each one is evaluated and timed in the report as it will be loaded.
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

    Raises:
        ValueError: for any argument outside the values listed above.

    At fit end :meth:`finish` runs, on global rank 0, the steps :meth:`convert_network`, :meth:`write_artifact`,
    :meth:`evaluate_networks`, :meth:`measure_networks`, :meth:`write_report` and :meth:`check_metric_drop`, in
    that order: the artifact is on disk before anything that can fail. Override one step to change it.

    Example::

        import lightning.pytorch as pl
        from lightning_qat import QATCallback
        from lightning_qat.data import DigitsDataModule
        from lightning_qat.models import ImageClassifier

        qat = QATCallback(freeze_bn_after=1, freeze_observers_after=2, monitor="val_acc")
        trainer = pl.Trainer(max_epochs=3, callbacks=[qat])
        trainer.fit(ImageClassifier("resnet18"), datamodule=DigitsDataModule(image_size=32, channels=3))
        print(qat.report.metrics["int8"]["val_acc"], qat.quantized_model)
    """

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
        export: Sequence[ExportFormat] = ("torchscript",),
        ptq_baseline: bool = False,
        ptq_batches: int = 8,
        sync_observers: bool = True,
        latency_repeats: int = 20,
        convert: ConvertFrom = "last",
        untrained_float: bool = False,
        overwrite: bool = False,
    ) -> None:
        super().__init__()
        self.backend = resolve_backend(backend)
        check_choice("mode", mode, Mode)
        check_choice("interval", interval, Interval)
        check_choice("evaluate", evaluate, Stage | None)
        check_choice("monitor_mode", monitor_mode, MonitorMode)
        check_choice("on_drop", on_drop, OnDrop)
        check_choice("convert", convert, ConvertFrom)
        if isinstance(skip, str) or not all(isinstance(s, str) for s in skip):
            raise ValueError(f"skip={skip!r} must be a list of submodule names, e.g. ['classifier', 'features.0'].")
        check_after("freeze_bn_after", freeze_bn_after)
        check_after("freeze_observers_after", freeze_observers_after)
        if max_metric_drop is not None and (monitor is None or max_metric_drop < 0):
            raise ValueError(
                f"max_metric_drop={max_metric_drop!r} needs a `monitor` metric name and a value >= 0 "
                f"(monitor={monitor!r})."
            )
        if monitor is not None and evaluate is None:
            raise ValueError(f"monitor={monitor!r} needs evaluate='val' or 'test', not None.")
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
        if isinstance(export, str) or not export or len(set(export)) != len(export):
            raise ValueError(
                f"export={export!r} must be a non-empty list of distinct formats from {choices_of(ExportFormat)}."
            )
        for fmt in export:
            check_choice("export", fmt, ExportFormat)
        if "onnx" in export:
            check_onnx_available()
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

        self.target: str | None = None
        self.prepared: Prepared | None = None
        self.quantized_model: nn.Module | None = None
        self.report: QATReport | None = None
        self.artifact_path: Path | None = None
        self.onnx_path: Path | None = None
        self._onnx_session: OnnxRuntimeNetwork | None = None
        self.bn_frozen = False
        self.observers_frozen = False
        self._schedule: FreezeSchedule | None = None
        self._float_network: nn.Module | None = None
        self._example_inputs: tuple[Any, ...] = ()
        self._paused_observers: list[dict[str, torch.Tensor]] | None = None
        self._preparation_check: RemovableHandle | None = None
        self._said_float = False
        self._trained_network: nn.Module | None = None
        self._loaded_from: str | None = None
        self._out_dir: Path | None = None

    # ------------------------------------------------------------------ set-up
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        target = find_target(pl_module, self.module)
        network = pl_module.get_submodule(target)
        if self.prepared is not None and network is self.prepared.module:
            return  # the network this callback prepared, e.g. `trainer.test` after `trainer.fit`
        self.target = target
        if stage == "fit":
            self._prepare_for_fit(trainer, pl_module, network)
        elif ao.fake_quant_modules(network):  # e.g. from load_qat_checkpoint
            mode = "fx" if isinstance(network, torch.fx.GraphModule) else "eager"
            self.prepared = Prepared(network, mode, "already QAT-prepared", 0)
        else:  # validate / test / predict: float, unless a QAT checkpoint's weights arrive (_before_weights_load)
            self.prepared = None
        self._preparation_check = compat.register_load_state_dict_pre_hook(
            pl_module, partial(self._before_weights_load, trainer)
        )

    def _prepare_for_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule, network: nn.Module) -> None:
        if ao.fake_quant_modules(network):
            raise ValueError(
                f"`{self.target}` is already QAT-prepared (it has fake-quant modules); preparing it again would "
                "quantize it twice. To continue a QAT run, give `trainer.fit` a float model and the checkpoint: "
                "`trainer.fit(MyModule(), ckpt_path=...)`."
            )
        preflight.check_precision(trainer)
        preflight.check_evaluation(trainer, pl_module, self.evaluate)
        network = preflight.unwrap_compiled(network, self.target)
        preflight.check_network_calls(pl_module, str(self.target), network)
        self._loaded_from = None
        self._example_inputs = example_inputs(trainer, pl_module)
        # the checked copy is the float baseline (an eval forward pass leaves a float network as it was)
        self._float_network = preflight.check_example(network, self._example_inputs, str(self.target))
        self._install(pl_module, network, self.mode)
        self.run_preflight(trainer, pl_module)

    def run_preflight(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """What would fail at the end of fit, checked now: conversion, artifact tracing, output dir, evaluation.

        Every rank runs it (the same checks on the same network), so a failure stops every rank in `setup`.
        """
        assert self.prepared is not None
        assert self._float_network is not None
        start = time.perf_counter()
        preflight.check_eval_is_deterministic(
            self._float_network, self.prepared.module, self._example_inputs, str(self.target)
        )
        probe = preflight.check_example(self.prepared.module, self._example_inputs, str(self.target), prepared=True)
        quantized = preflight.check_conversion(
            probe, self.prepared.mode, self.backend, self._example_inputs, str(self.target)
        )
        if "onnx" in self.export and self.save_artifact:
            preflight.check_onnx_export(probe, self._example_inputs, str(self.target))
        if not trainer.fast_dev_run:
            self._out_dir = self.output_dir(trainer)
        if self.evaluate is not None:
            clone = module_with_network(pl_module, str(self.target), quantized)
            try:
                run_evaluation(trainer, clone, self.evaluate, self.backend, progress=False, limit=1)
            except Exception as err:
                step = "validation_step" if self.evaluate == "val" else "test_step"
                raise preflight.PreflightError(
                    f"Your `{step}` fails on the int8 network, as the final evaluation would run it: "
                    f"{type(err).__name__}: {err}. Reach the network only through its forward (e.g. `self(x)`), or "
                    "pass evaluate=None."
                ) from err
        rank_zero_info(
            f"QAT: preflight passed in {time.perf_counter() - start:.2f} s (int8 conversion and evaluation)."
        )

    def output_dir(self, trainer: pl.Trainer) -> Path:
        """Where the artifact and report go, checked writable and free of an earlier run's files; same on all ranks."""
        if self.save_dir is not None:
            out_dir, what = Path(self.save_dir), "save_dir"
        elif trainer.logger is not None:
            out_dir, what = Path(trainer.log_dir or trainer.default_root_dir), "the logger's log_dir"
        else:  # no logger: a fresh versioned directory, as Lightning's loggers make
            fresh = files.next_version_dir(Path(trainer.default_root_dir) / "qat") if trainer.is_global_zero else None
            out_dir, what = Path(trainer.strategy.broadcast(fresh, src=0)), "default_root_dir"
        files.check_writable(out_dir, what)
        earlier = [
            name for name in ("model_int8.pt", "model_int8.onnx", "qat_report.json") if (out_dir / name).exists()
        ]
        if earlier and not self.overwrite:
            raise preflight.PreflightError(
                f"{out_dir} already holds an earlier run's {earlier}: pass another save_dir, or overwrite=True."
            )
        return out_dir

    def _prepare_like_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, state: dict[str, Any]
    ) -> None:
        """Validate / test / predict of a QAT checkpoint: prepare the float network as the checkpoint's was."""
        self._refuse_different_preparation(state)
        self._loaded_from = str(trainer.ckpt_path)
        self._example_inputs = checkpoint_io.example_inputs_of(state) or checkpoint_io.module_example_inputs(pl_module)
        network = pl_module.get_submodule(self.target)
        self._float_network = cpu_eval_copy(network)
        self._install(pl_module, network, state["mode"])

    def _install(self, pl_module: pl.LightningModule, network: nn.Module, mode: Mode) -> None:
        self.prepared = prepare_model(
            network, self.backend, mode, self.skip, self._example_inputs, relu6_to_relu=self.relu6_to_relu
        )
        compat.set_submodule(pl_module, self.target, self.prepared.module)
        self.bn_frozen = self.observers_frozen = False
        if self.prepared.shared:
            rank_zero_info(
                f"QAT: {self.prepared.shared} are called at several places in `{self.target}`'s forward; they stay "
                "float and unfused (fusing one call site's BatchNorm into them would change the others)."
            )
        if not any(hasattr(m, "weight_fake_quant") for m in self.prepared.module.modules()):
            rank_zero_warn(
                f"QAT: nothing in `{self.target}` is quantizable (no Conv, Linear or Embedding outside `skip`): its "
                "int8 model would be no smaller and no faster than the float one."
            )
        rank_zero_info(
            f"QAT: prepared `{self.target}` in {self.prepared.mode} mode ({self.prepared.reason}); "
            f"{self.prepared.num_fused} fused modules, backend {self.backend!r}, skipped {self.skip or 'nothing'}"
            + (f", {self.prepared.relu6_replaced} ReLU6 replaced by ReLU." if self.relu6_to_relu else ".")
        )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_preparation_check()  # checkpoints are restored by now

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_preparation_check()

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

    # ------------------------------------------------------------------ training
    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._schedule is not None and self._schedule.interval == "epoch":
            self._apply_schedule(pl_module, trainer.current_epoch)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._schedule is not None and self._schedule.interval == "step":
            self._apply_schedule(pl_module, trainer.global_step)

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
                report = self.finish(trainer, pl_module, out_dir)
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

    def finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, out_dir: Path) -> QATReport:
        """The end of fit on global rank 0 (no collectives here): each step below is a method to override."""
        start = time.perf_counter()
        report = self.convert_network(trainer, pl_module)
        if trainer.fast_dev_run:
            rank_zero_info("QAT: fast_dev_run: the int8 conversion works; no artifact or report is written.")
            return report
        self.write_artifact(report, out_dir)  # first: a failure in any later step keeps the int8 model on disk
        report.status = "evaluating"
        report.save(out_dir)  # says so until the evaluation is done
        try:
            with _sigterm_raises():
                self.evaluate_networks(trainer, pl_module, report)
                self.measure_networks(report)
        except BaseException as err:
            report.status = f"failed during evaluation ({type(err).__name__}: {err}); the int8 artifact is saved"
            report.save(out_dir)
            raise
        report.status = "complete"
        report.seconds = time.perf_counter() - start
        self.write_report(trainer, report, out_dir)
        self.check_metric_drop(report)
        return report

    def convert_network(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> QATReport:
        """Convert a CPU copy of the trained QAT network (last or best weights) to int8; a report to fill."""
        assert self.prepared is not None
        self._trained_network, converted_from = self._trained_weights(trainer, pl_module)
        self.quantized_model = to_int8(self._trained_network, self.prepared.mode, self.backend, self._example_inputs)
        return QATReport(
            backend=self.backend,
            mode=self.prepared.mode,
            num_fused=self.prepared.num_fused,
            quantized_layers=count_quantized_layers(self.quantized_model),
            skipped=float_islands(self.quantized_model),
            stage=self.evaluate,
            converted_from=converted_from,
            untrained_float=self.untrained_float,
            float_params=float_parameters(self.quantized_model),
            network_params=sum(p.numel() for p in self._trained_network.parameters()),
        )

    def _trained_weights(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[nn.Module, str]:
        """A CPU copy of the QAT network with the weights ``convert`` asks for, and where they come from."""
        assert self.target is not None
        network = cpu_eval_copy(self.network(pl_module))
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback is not None else ""
        if self._loaded_from is not None:
            return network, f"checkpoint: {self._loaded_from}"
        if self.convert == "last":
            return network, "last"
        if not best:
            rank_zero_warn("QAT: convert='best' but no ModelCheckpoint saved a best checkpoint; converting the last.")
            return network, "last"
        weights = checkpoint_io.network_state(checkpoint_io.read_checkpoint(best)["state_dict"], self.target)
        network.load_state_dict(weights)
        return network, f"best: {best}"

    def write_artifact(self, report: QATReport, out_dir: Path) -> None:
        """Save the int8 artifacts of ``export`` to ``out_dir`` (unless ``save_artifact=False``), TorchScript first."""
        if not self.save_artifact:
            return
        assert self.quantized_model is not None
        assert self.prepared is not None
        assert self._trained_network is not None
        if "torchscript" in self.export:
            self.artifact_path = save_torchscript(
                self.quantized_model,
                out_dir / "model_int8.pt",
                self.backend,
                self._example_inputs,
                mode=self.prepared.mode,
                skipped=self.skip,
            )
            report.artifact = str(self.artifact_path)
        if "onnx" in self.export:
            self.onnx_path = export_onnx(self._trained_network, out_dir / "model_int8.onnx", self._example_inputs)
            self._onnx_session = None  # a new file: a new session, opened once for evaluation and timing
            report.onnx_artifact = str(self.onnx_path)

    def evaluate_networks(self, trainer: pl.Trainer, pl_module: pl.LightningModule, report: QATReport) -> None:
        """Run the user's ``validation_step``/``test_step`` on float, (PTQ,) QAT and int8 CPU copies."""
        if self.evaluate is None:
            return
        assert self._float_network is not None
        assert self.target is not None
        assert self._trained_network is not None
        assert self.quantized_model is not None
        networks = {"float": self._float_network}
        if self.ptq_baseline:
            networks["ptq"] = self._ptq_network(trainer)
        qat_copy = cpu_eval_copy(self._trained_network)
        freeze_for_inference(qat_copy)
        networks |= {"qat": qat_copy, "int8": self.quantized_model}
        if self.onnx_path is not None:
            networks["int8-onnx"] = self._onnx_network()
        progress = trainer.progress_bar_callback is not None
        for row, network in networks.items():
            clone = module_with_network(pl_module, self.target, network)
            report.metrics[row] = run_evaluation(trainer, clone, self.evaluate, self.backend, progress)

    def measure_networks(self, report: QATReport) -> None:
        """Size and CPU latency on the example input of the float network and of the int8 artifacts as they ship.

        The int8 column times the TorchScript artifact loaded with :func:`load_quantized` (without ``save_artifact``,
        the same traced and frozen module, in memory); ``int8-onnx`` the ONNX file in ONNX Runtime. Sizes are the
        files' sizes (the float network: its saved ``state_dict``). All are timed interleaved, same batch and threads.
        """
        assert self._float_network is not None
        assert self.quantized_model is not None
        networks: dict[str, Any] = {"float": self._float_network}
        report.size_bytes = {"float": serialized_size(self._float_network)}
        report.latency_runtime = {"float": "PyTorch eager"}
        if self.artifact_path is not None:
            with ao.engine(self.backend):  # load_quantized sets the engine; keep the user's setting afterwards
                networks["int8"] = load_quantized(self.artifact_path)
            report.size_bytes["int8"] = self.artifact_path.stat().st_size
            report.latency_runtime["int8"] = "TorchScript artifact"
        else:
            networks["int8"] = to_torchscript(self.quantized_model, self.backend, self._example_inputs)
            report.size_bytes["int8"] = serialized_size(self.quantized_model)
            report.latency_runtime["int8"] = "TorchScript (not saved)"
        if self.onnx_path is not None:
            networks["int8-onnx"] = self._onnx_network()
            report.size_bytes["int8-onnx"] = self.onnx_path.stat().st_size
            report.latency_runtime["int8-onnx"] = f"ONNX Runtime {onnxruntime_version()}"
        report.latency_ms = measure_latency(networks, self._example_inputs, self.backend, repeats=self.latency_repeats)
        report.latency_batch_size = batch_size(self._example_inputs)
        report.latency_threads = torch.get_num_threads()

    def _onnx_network(self) -> OnnxRuntimeNetwork:
        """The ONNX artifact in one ONNX Runtime session, shared by the evaluation and the timing."""
        assert self.onnx_path is not None
        if self._onnx_session is None:
            self._onnx_session = OnnxRuntimeNetwork(self.onnx_path)
        return self._onnx_session

    def write_report(self, trainer: pl.Trainer, report: QATReport, out_dir: Path) -> None:
        """Metrics to the loggers (``float/…``, ``qat/…``, ``int8/…``), json + markdown files, the terminal table."""
        for logger in trainer.loggers:
            logger.log_metrics(
                {f"{row}/{k}": v for row, m in report.metrics.items() for k, v in m.items()}, step=trainer.global_step
            )
        report.save(out_dir)
        report.print()

    def check_metric_drop(self, report: QATReport) -> None:
        """The accuracy guard: warn (or raise, ``on_drop="raise"``) when ``monitor`` drops more than allowed."""
        if self.monitor is None:
            return
        if report.untrained_float:
            rank_zero_info("QAT accuracy guard: skipped, the float row is an untrained network (untrained_float=True).")
            return
        drop = report.metric_drop(self.monitor, self.monitor_mode)
        if drop is None:
            rank_zero_warn(
                f"QAT accuracy guard: monitor={self.monitor!r} was not logged by the evaluation; logged metrics: "
                f"{report.metric_names()}."
            )
            return
        if self.max_metric_drop is not None and drop > self.max_metric_drop:
            message = (
                f"QAT accuracy guard: {self.monitor} dropped by {drop:.4g} from float "
                f"({report.metrics['float'][self.monitor]:.4g}) to int8 ({report.metrics['int8'][self.monitor]:.4g}), "
                f"more than max_metric_drop={self.max_metric_drop}."
            )
            if self.on_drop == "raise":
                raise RuntimeError(message + " The trained QAT model, checkpoints and artifact are kept.")
            rank_zero_warn(message)

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
            "example_inputs": _storable(self._example_inputs),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version = state_dict.get("version", _STATE_VERSION)
        if version > _STATE_VERSION:
            raise ValueError(
                f"This checkpoint's QATCallback state has version {version}, newer than this lightning-qat "
                f"understands ({_STATE_VERSION}); upgrade lightning-qat to resume from it."
            )
        self._refuse_different_preparation(state_dict)
        float_state = state_dict.get("float_state_dict")
        if float_state is not None and self._float_network is not None:
            self._float_network.load_state_dict(float_state)

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.prepared is not None:
            checkpoint["state_dict"] = checkpoint_io.mark(checkpoint["state_dict"])

    def _refuse_different_preparation(self, saved_state: dict[str, Any]) -> None:
        """Raise ``ValueError`` naming the first setting that prepared the checkpoint's network differently."""
        current: dict[str, Any] = {
            "backend": self.backend,
            "module": self.target,
            "skip": list(self.skip),
            "relu6_to_relu": self.relu6_to_relu,
        }
        if self.prepared is not None:
            current["mode"] = self.prepared.mode
        elif self.mode != "auto":
            current["mode"] = self.mode
        for key, value in current.items():
            saved = saved_state.get(key, value)
            if saved != value:
                raise ValueError(
                    f"This checkpoint was QAT-prepared with {key}={saved!r}, but the QATCallback now has "
                    f"{key}={value!r}. Resume with the same {key}, or start a new fit from the float weights."
                )

    def _before_weights_load(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, state_dict: dict[str, Any], *_: Any
    ) -> None:
        """Runs when Lightning loads a checkpoint into the LightningModule, before any weight is copied.

        Drops the QAT checkpoint marker. In validate / test / predict, prepares the float network as the checkpoint's
        was, so the keys match. On resume, compares the QAT configuration: a different skip list or mode would change
        the keys, and the user gets the setting that differs instead of Lightning's missing/unexpected-keys error.
        """
        checkpoint_io.unmark(state_dict)
        saved = checkpoint_io.qat_state(lightning_internals.loaded_checkpoint(trainer))
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

    def _apply_schedule(self, pl_module: pl.LightningModule, counter: int) -> None:
        if self._schedule is None:
            return
        freeze_bn, freeze_observers = self._schedule.due(counter)
        network = self.network(pl_module)
        if freeze_bn and not self.bn_frozen:
            ao.freeze_bn_stats(network)
            self.bn_frozen = True
            rank_zero_info(f"QAT: BatchNorm statistics frozen at {self._schedule.interval} {counter}.")
        if freeze_observers and not self.observers_frozen:
            ao.set_observers(network, False)
            self.observers_frozen = True
            rank_zero_info(
                f"QAT: observers frozen at {self._schedule.interval} {counter}; quantization parameters fixed."
            )

    def _pause_observers(self, pl_module: pl.LightningModule) -> None:
        """Observers off for an evaluation loop, which then leaves no trace in the quantization state."""
        if self.prepared is None:
            if not self._said_float:
                self._said_float = True
                rank_zero_info("QAT: the network and checkpoint hold no QAT state: they are evaluated as float.")
            return
        if self._paused_observers is not None:
            return
        fake_quants = ao.fake_quant_modules(self.network(pl_module))
        self._paused_observers = [copy.deepcopy(fq.state_dict()) for _, fq in fake_quants]
        for _, fq in fake_quants:
            fq.disable_observer()

    def _resume_observers(self, pl_module: pl.LightningModule) -> None:
        if self._paused_observers is None:
            return
        fake_quants = ao.fake_quant_modules(self.network(pl_module))
        for (_, fq), saved in zip(fake_quants, self._paused_observers, strict=True):
            fq.load_state_dict(saved)
        self._paused_observers = None

    def _ptq_network(self, trainer: pl.Trainer) -> nn.Module:
        assert self._float_network is not None
        ptq = prepare_model(
            cpu_eval_copy(self._float_network),
            self.backend,
            self.mode,
            self.skip,
            self._example_inputs,
            qat=False,
            relu6_to_relu=self.relu6_to_relu,
        )
        with ao.engine(self.backend), ao.quiet(), torch.no_grad():
            loader = trainer.train_dataloader
            if loader is None and trainer.datamodule is not None:  # `convert` of a checkpoint: no fit loop
                loader = trainer.datamodule.train_dataloader()
            for i, batch in enumerate(loader or ()):
                if i >= self.ptq_batches:
                    break
                ptq.module(*cpu_inputs(batch_input(batch)))
        return to_int8(ptq.module, ptq.mode, self.backend, self._example_inputs)


def _storable(inputs: tuple[Any, ...]) -> list[Any] | None:
    """Two rows of the example input, for a checkpoint (``None`` unless it is made of tensors, tuples, lists, dicts)."""
    if not inputs or not all(_only_tensors(x) for x in inputs):
        return None
    return [map_tensors(lambda t: t[:2].clone() if t.dim() else t.clone(), x) for x in inputs]


def _only_tensors(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, dict):
        return all(_only_tensors(v) for v in value.values())
    if isinstance(value, (tuple, list)):
        return all(_only_tensors(v) for v in value)
    return False


class EvaluationInterrupted(RuntimeError):
    """SIGTERM arrived during the final evaluation; the int8 artifact is already on disk."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While the block runs, SIGTERM raises :class:`EvaluationInterrupted` (after the handler installed before).

    So the run ends non-zero, with the report saying why, instead of finishing as if nothing happened.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum: int, frame: Any) -> None:
        if callable(previous):
            previous(signum, frame)
        raise EvaluationInterrupted("SIGTERM received during the final QAT evaluation")

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
