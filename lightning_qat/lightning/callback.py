"""QATCallback: quantization-aware training as a Lightning callback: hooks, argument checks, resumable state.

The work lives below it: preparing and converting in :mod:`lightning_qat.quantization`, the end of fit in
:mod:`lightning_qat.lightning.finish`, the set-up checks in :mod:`lightning_qat.lightning.preflight`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_qat import files
from lightning_qat.lightning import checkpoint as checkpoint_io
from lightning_qat.lightning import fit_setup, internals, preflight
from lightning_qat.lightning.budget import START, FitSearch
from lightning_qat.lightning.evaluate import EvalData, Stage, eval_data, stop_display
from lightning_qat.lightning.finish import FinishPipeline, finish_on_rank0
from lightning_qat.lightning.freeze import Freezing
from lightning_qat.lightning.report import MonitorMode, QATReport
from lightning_qat.lightning.run import QATRun
from lightning_qat.lightning.settings import (
    Activations,
    ConvertFrom,
    ExportFormat,
    FallbackAt,
    FinishSettings,
    OnDrop,
    check_arguments,
    renamed,
)
from lightning_qat.lightning.state import QATState
from lightning_qat.lightning.target import find_target
from lightning_qat.quantization import ao, compat, engines
from lightning_qat.quantization.backends import Backend, resolve_backend
from lightning_qat.quantization.engines import Mode, Needs, Prepared
from lightning_qat.quantization.schedule import Interval
from lightning_qat.quantization.sync import all_reduce_observers

_STATE_VERSION = 1


class QATCallback(Callback):
    r"""Quantization-aware training for any LightningModule, ending in a real int8 CPU model.

    In ``setup("fit")`` (before optimizers exist and before DDP wraps the model) the network is fused
    (Conv+BN(+ReLU), Linear(+ReLU)) and fake-quantized: FX graph mode when it is traceable, else PT2E or eager mode.
    During training BatchNorm statistics and then observers are frozen on a schedule; observers never move during
    validation. When the fit ends normally, a CPU copy is converted to int8, evaluated with your own
    ``validation_step`` metrics next to the float and QAT networks, reported, and saved as a TorchScript artifact
    that :func:`lightning_qat.load_quantized` reloads without your code.

    Args:
        module: attribute of the LightningModule holding the network to quantize (dotted paths allowed);
            ``None`` picks the single top-level child that is not a metric or loss.
        backend: ``"x86"``, ``"fbgemm"``, ``"qnnpack"`` or ``"xnnpack"`` (phones: an ExecuTorch ``.pte``; ``pip
            install 'lightning-qat[mobile]'``); ``None`` picks ``x86`` on x86-64, ``qnnpack`` on ARM.
        engine: ``"auto"`` (FX; PT2E where FX cannot trace; eager where neither takes the network or PT2E lacks what
            the run asks; XNNPACK for ``backend="xnnpack"``: see the manual), ``"fx"``, ``"eager"``, ``"pt2e"``
            (torchao, an AOTInductor package; ``pip install 'lightning-qat[pt2e]'``) or ``"xnnpack"``.
        skip: qualified submodule names (inside ``module``) kept in float, also in the int8 model.
        relu6_to_relu: replace ``nn.ReLU6`` by ``nn.ReLU`` before fusing (as torchvision's quantizable MobileNets do):
            Conv-BN-ReLU6 fuses into one int8 op; the function changes above 6, which QAT adapts to.
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
            meet the budget, searched (lowest SQNR first) with int8 models evaluated by your ``validation_step`` at
            ``fallback_at`` and once more at fit end if still missed (the manual's "Accuracy budget" page).
        fallback_at: with ``on_drop="fallback"`` only, when to search during training: ``"bn"`` (the default: when
            BatchNorm statistics freeze), an epoch/step index (int >= 1) or fraction, or ``"end"`` (fit end only).
        save_dir: where ``model_int8.pt`` and the report go; default ``trainer.log_dir``.
        export: the artifact formats the engine writes: ``"torchscript"`` (``model_int8.pt``), ``"onnx"`` (a QDQ
            graph; ``pip install 'lightning-qat[onnx]'``), ``"pt2"`` (PT2E's AOTInductor package), ``"pte"``
            (XNNPACK's ExecuTorch program). ``None``: the engine's first; ``[]``: none. Each is evaluated and timed.
        ptq_baseline: also calibrate, convert and evaluate a post-training-quantized copy of the float network.
        ptq_batches: training batches used to calibrate the PTQ baseline (default 8; with ``ptq_baseline=True`` only).
        sync_observers: under DDP, all-reduce observer min/max each step so every rank has the same qparams.
        latency_repeats: timed forward passes per network for the latency columns of the report.
        weights: which weights become the int8 model: ``"last"`` (the end of fit) or ``"best"`` (the best checkpoint
            of the trainer's ``ModelCheckpoint``; the last weights when it has none).
        untrained_float: QAT starts from random weights: the float row is no baseline, and the guard skips it.
        overwrite: let a run write into a ``save_dir`` holding an earlier run's files (refused before training).
        activations: ``"static"`` (scales calibrated by QAT, every layer int8), ``"dynamic"`` (Linears int8 with
            activations quantized per batch at run time, the rest float; captured so on PT2E) or ``"auto"`` (static,
            unless a Linear-heavy network runs faster dynamic: both artifacts timed in ``setup``, on rank 0).
        keep_slow_float: when the int8 network runs slower than float on the example in ``setup`` (rank 0, this
            CPU), time each layer and keep float the layers that make it slower, when that is measured faster.

    Raises:
        ValueError: for any argument outside the values listed above.
        OnnxExtraMissing: for ``export=[..., "onnx"]`` without ``pip install 'lightning-qat[onnx]'``.
        PT2EUnavailable: for ``engine="pt2e"`` without torchao (or with a torch older than it needs), for
            ``backend="xnnpack"`` without ExecuTorch.
        DeprecationWarning: for ``mode``, ``save_artifact`` or ``convert``, the old names of ``engine``,
            ``export=[]`` and ``weights`` (the manual's "Using the callback" page).

    At fit end, on global rank 0, the :class:`~lightning_qat.FinishPipeline` that :meth:`pipeline` returns runs its
    steps (the artifact is on disk before anything that can fail); to change one, subclass the pipeline and set it as
    :attr:`pipeline_class` of a subclass of this callback.

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
        engine: Mode = "auto",
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
        export: Sequence[ExportFormat] | None = None,
        ptq_baseline: bool = False,
        ptq_batches: int | None = None,
        sync_observers: bool = True,
        latency_repeats: int = 20,
        weights: ConvertFrom = "last",
        untrained_float: bool = False,
        overwrite: bool = False,
        activations: Activations = "auto",
        fallback_at: FallbackAt | None = None,
        keep_slow_float: bool = True,
        mode: Mode | None = None,
        save_artifact: bool | None = None,
        convert: ConvertFrom | None = None,
    ) -> None:
        super().__init__()
        self.backend = resolve_backend(backend)
        self.module = module
        self.engine, self.weights, export = renamed(mode, engine, convert, weights, save_artifact, export)
        self.skip = skip
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
        self.ptq_baseline = ptq_baseline
        self.sync_observers = sync_observers
        self.latency_repeats = latency_repeats
        self.untrained_float = untrained_float
        self.overwrite = overwrite
        self.activations = activations
        self.keep_slow_float = keep_slow_float
        self.export = check_arguments(self, export, ptq_batches, fallback_at, given_backend=backend)
        self.needs = Needs(tuple(export or ()), activations == "dynamic", on_drop == "fallback")  # of engine="auto"
        self.skip = list(skip)
        self.ptq_batches = ptq_batches if ptq_batches is not None else 8
        self.fallback_at: FallbackAt = fallback_at if fallback_at is not None else "bn"

        self.state = QATState()  # the network QAT trains and what its run decided (checkpointed)
        self.budget = FitSearch()  # the accuracy-budget search during the fit, and what it kept float
        self.freezing = Freezing()  # the freeze schedule as it runs
        self.report: QATReport | None = None
        self.finished: FinishPipeline | None = None  # the last end-of-fit pipeline run, with its results
        self._preparation_check: RemovableHandle | None = None
        self._out_dir: Path | None = None
        self._claim: Path | None = None

    @property
    @override
    def state_key(self) -> str:
        """``"QATCallback"`` for subclasses too, so every QAT checkpoint keeps its state under one key."""
        return checkpoint_io.STATE_KEY

    @property
    def prepared(self) -> Prepared | None:
        """What the engine did to the network (``None``: nothing QAT-prepared, e.g. a float checkpoint's test)."""
        return self.state.prepared

    @property
    def quantized_model(self) -> nn.Module | None:
        """The int8 network of the last conversion (``None`` before the end of fit)."""
        return self.finished.quantized_model if self.finished else None

    @property
    def artifact_path(self) -> Path | None:
        """The engine's artifact written at the end of fit: TorchScript, ``.pt2`` or ``.pte`` (``None``: none was)."""
        return self.finished.artifact_path if self.finished else None

    @property
    def onnx_path(self) -> Path | None:
        """The ONNX artifact written at the end of fit (``None`` if none was)."""
        return self.finished.onnx_path if self.finished else None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        target = find_target(pl_module, self.module)
        network = pl_module.get_submodule(target)
        if self.prepared is not None and network is self.prepared.module:
            return  # the network this callback prepared, e.g. `trainer.test` after `trainer.fit`
        self.state = QATState(target=target)
        if stage == "fit":
            self._prepare_for_fit(trainer, pl_module, network)
        elif ao.fake_quant_modules(network):  # e.g. from load_qat_checkpoint
            self.state.prepared = Prepared(network, engines.of_network(network), "already QAT-prepared", 0)
        # else validate / test / predict: float, unless a QAT checkpoint's weights arrive (_before_weights_load)
        self._preparation_check = compat.register_load_state_dict_pre_hook(
            pl_module, partial(self._before_weights_load, trainer)
        )

    def _prepare_for_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule, network: nn.Module) -> None:
        fit_setup.prepare_for_fit(self, trainer, pl_module, network)
        if not trainer.fast_dev_run:  # type: ignore[attr-defined]  # set by Lightning's debugging connector
            self._out_dir = preflight.output_dir(trainer, self.save_dir, self.overwrite)
            self._claim = preflight.claim_output_dir(trainer, self._out_dir)  # last: nothing after it can fail

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
        schedule = self.freezing.plan(trainer, self.interval, self.freeze_bn_after, self.freeze_observers_after)
        if self.budget.plan(trainer, schedule, self.on_drop, self.fallback_at):  # before QAT trains around damage
            self._search_fallback(trainer, pl_module, START)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply_schedule(trainer, pl_module, self.freezing.counter(trainer, "epoch"))

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._apply_schedule(trainer, pl_module, self.freezing.counter(trainer, "step"))
        self.freezing.hold()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.sync_observers and not self.freezing.observers_frozen and trainer.world_size > 1:
            all_reduce_observers(self.network(pl_module))
        pl_module.log("qat/bn_frozen", float(self.freezing.bn_frozen), on_step=True, on_epoch=False)
        pl_module.log("qat/observers_frozen", float(self.freezing.observers_frozen), on_step=True, on_epoch=False)

    def _apply_schedule(self, trainer: pl.Trainer, pl_module: pl.LightningModule, counter: int | None) -> None:
        if counter is not None:  # the schedule's unit
            where = self.freezing.apply(self.network(pl_module), counter)
            if self.budget.due(counter):
                self._search_fallback(trainer, pl_module, where)

    def _search_fallback(self, trainer: pl.Trainer, pl_module: pl.LightningModule, when: str) -> None:
        """The accuracy-budget search during the fit, on global rank 0; every rank keeps the result float."""
        data = eval_data(trainer, self.evaluate)
        pipeline = self.pipeline(self._run(trainer, pl_module), data, trainer) if trainer.is_global_zero else None
        self.budget.run(trainer, pipeline, self.network(pl_module), self.state.activations == "static", when)

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

    def _pause_observers(self, pl_module: pl.LightningModule) -> None:
        self.freezing.pause(self.network(pl_module) if self.prepared is not None else None)

    def _resume_observers(self, pl_module: pl.LightningModule) -> None:
        self.freezing.resume(self.network(pl_module) if self.prepared is not None else None)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.prepared is None or trainer.interrupted:
            return
        self.freezing.finish(self.network(pl_module), trainer)
        stop_display(trainer.progress_bar_callback)  # the end of fit prints below the last epoch's bar, once

        def build() -> FinishPipeline:
            self.finished = self.pipeline(self._run(trainer, pl_module), eval_data(trainer, self.evaluate), trainer)
            return self.finished

        out_dir = self._out_dir or Path(trainer.default_root_dir)  # resolved (and checked) in setup, on every rank
        self.report = finish_on_rank0(trainer, build, out_dir)

    def pipeline(self, run: QATRun, data: EvalData, trainer: pl.Trainer) -> FinishPipeline:
        """The end-of-fit pipeline (a :attr:`pipeline_class`) for ``run`` with this callback's settings.

        Used at the end of fit and by :func:`~lightning_qat.convert_checkpoint`.
        """
        settings = FinishSettings.of(self, freezing=dict(self.freezing.applied))
        progress, root = trainer.progress_bar_callback, str(trainer.default_root_dir)
        return self.pipeline_class(settings, run, data, trainer.loggers, trainer.global_step, progress, root)

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> QATRun:
        best = getattr(trainer.checkpoint_callback, "best_model_path", "")  # a ModelCheckpoint's; "" without one
        return self.state.run(pl_module, best or "", self.engine, self.skip, self.relu6_to_relu, self.budget)

    @override
    def state_dict(self) -> dict[str, Any]:
        # The freeze flags are not state: the schedule derives them from the trainer's restored counters.
        preparation = {"backend": self.backend, "skip": list(self.skip), "relu6_to_relu": self.relu6_to_relu}
        return {"version": _STATE_VERSION, **preparation, **self.state.state_dict(), **self.budget.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        checkpoint_io.check_version(state_dict, _STATE_VERSION)
        self.check_preparation(state_dict)
        self.state.load_state_dict(state_dict)
        # the layers kept float: their fake-quant switches are buffers too; the names are what the conversion needs
        self.budget.load_state_dict(state_dict)

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.prepared is not None:
            checkpoint["state_dict"] = checkpoint_io.mark(checkpoint["state_dict"])

    def check_preparation(self, saved_state: dict[str, Any]) -> None:
        """Raise ``CheckpointError`` naming the first setting that prepared the checkpoint's network differently."""
        current = {"backend": self.backend, "skip": list(self.skip), "relu6_to_relu": self.relu6_to_relu}
        current["module"] = self.state.target if self.state.target is not None else self.module  # None: found in setup
        current["mode"] = (  # "auto" matches whichever engine the checkpoint's run took
            self.prepared.mode if self.prepared is not None else self.engine if self.engine in engines.ENGINES else None
        )
        checkpoint_io.check_same_preparation(saved_state, current)

    def _before_weights_load(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, state_dict: dict[str, Any], *_: Any
    ) -> None:
        """Runs when Lightning loads a checkpoint into the LightningModule, before any weight is copied.

        Drops the QAT checkpoint marker. In validate / test / predict, prepares the float network as the checkpoint's
        was, so the keys match. On resume, compares the QAT configuration (a different skip list or engine is named,
        instead of Lightning's missing/unexpected-keys error) and prepares again as the checkpoint's run did where that
        run's CPU kept other layers float for its kernels.
        """
        checkpoint_io.unmark(state_dict)
        saved = checkpoint_io.qat_state(internals.loaded_checkpoint(trainer))
        if saved is None:
            return
        kernels = saved.get("kernels")  # the writing run's decision for its CPU's kernels (None: an older checkpoint)
        dynamic = saved.get("activations") == "dynamic"  # captured into the graph by some engines (PT2E)
        if self.prepared is None:  # validate / test / predict: prepared as the checkpoint's network was
            self.check_preparation(saved)
            network = self.state.from_checkpoint(pl_module, saved, str(trainer.ckpt_path))
            fit_setup.install_network(self, pl_module, network, saved["mode"], kernels, dynamic)
        else:  # resumed: prepared again where the checkpoint's run prepared its graph otherwise
            fit_setup.prepare_as_saved(self, pl_module, saved["mode"], kernels, dynamic)
        self.load_state_dict(saved)

    def _remove_preparation_check(self) -> None:
        if self._preparation_check is not None:
            self._preparation_check.remove()
            self._preparation_check = None

    def network(self, pl_module: pl.LightningModule) -> nn.Module:
        """The (prepared) network inside ``pl_module``."""
        assert self.state.target is not None
        return pl_module.get_submodule(self.state.target)
