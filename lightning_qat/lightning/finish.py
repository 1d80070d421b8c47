"""The end-of-fit pipeline: convert -> write artifact -> evaluate -> measure -> report -> guard, on a CPU copy.

One object with its own state, like Lightning's connectors: :class:`~lightning_qat.QATCallback` runs it when a fit
ends and :func:`~lightning_qat.convert_checkpoint` runs it on a checkpoint, both through
:meth:`QATCallback.pipeline <lightning_qat.QATCallback.pipeline>`. Each step is a method; subclass to change one and
return the subclass from ``QATCallback.pipeline``. The artifact is on disk before anything that can fail.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.fabric.loggers import Logger
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_qat.exceptions import AccuracyBudgetError
from lightning_qat.lightning import checkpoint as checkpoint_io
from lightning_qat.lightning.artifacts import Artifacts
from lightning_qat.lightning.budget import BudgetSearch, resolve_groups
from lightning_qat.lightning.chart import save_chart
from lightning_qat.lightning.evaluate import EvalData, module_with_network, run_evaluation, showing
from lightning_qat.lightning.report import QATReport, kept
from lightning_qat.lightning.run import QATRun
from lightning_qat.lightning.settings import FinishSettings
from lightning_qat.lightning.sigterm import sigterm_raises
from lightning_qat.quantization import ao
from lightning_qat.quantization.convert import cpu_eval_copy, freeze_for_inference, to_int8
from lightning_qat.quantization.fallback import Group, activation_quantizers, float_names, float_nodes
from lightning_qat.quantization.inputs import batch_input, batch_size, cpu_inputs
from lightning_qat.quantization.measure import (
    count_quantized_layers,
    float_ops,
    float_parameters,
    layer_times,
    measure_latency,
    serialized_size,
    zero_weights,
)
from lightning_qat.quantization.prepare import prepare_model
from lightning_qat.quantization.sensitivity import LayerSQNR, layer_sqnr


class FinishPipeline:
    """Converts a QAT run to int8, writes its artifacts, evaluates and times them, reports, and guards accuracy.

    With ``on_drop="fallback"``, a missed accuracy budget is met by keeping layers float (:meth:`fall_back`).

    Args:
        settings: what to export, evaluate and guard.
        run: the trained QAT network and how it was prepared.
        data: the final evaluation's batches (and the PTQ baseline's calibration batches).
        loggers: the loggers the report's metrics go to (``float/…``, ``qat/…``, ``int8/…``), at ``step``.
        progress: the fit's progress bar: each evaluation shows one of its kind, named by the network it evaluates.
        root_dir: the evaluation trainer's ``default_root_dir``.

    After :meth:`run`: ``quantized_model`` (the int8 network), ``artifact_path`` / ``onnx_path`` (the files written),
    ``trained_network`` (the CPU copy of the QAT network that was converted).
    """

    sqnr_batches: int = 4  # evaluation batches the per-layer SQNR of the report is measured on

    def __init__(
        self,
        settings: FinishSettings,
        run: QATRun,
        data: EvalData,
        loggers: Sequence[Logger] = (),
        step: int = 0,
        progress: ProgressBar | None = None,
        root_dir: str = ".",
    ) -> None:
        self.settings = settings
        self.qat_run = run
        self.data = data
        self.loggers = list(loggers)
        self.step = step
        self.progress = progress
        self.root_dir = root_dir
        self.quantized_model: nn.Module | None = None
        self.trained_network: nn.Module | None = None
        self.artifacts = Artifacts(settings, run)
        self.float_groups: list[Group] = []  # the layers the accuracy-budget fallback keeps float
        self.sqnr: dict[str, float] = {}  # per layer, then per activation quantizer of its own (measure_sqnr)
        self.budget = BudgetSearch(self)

    @property
    def artifact_path(self) -> Path | None:
        """The engine's artifact: TorchScript, the PT2E engine's ``.pt2`` or the XNNPACK engine's ``.pte``."""
        return self.artifacts.path

    @property
    def onnx_path(self) -> Path | None:
        """The QDQ ONNX artifact, when ``export`` names it."""
        return self.artifacts.onnx_path

    def run(self, out_dir: Path, write: bool = True) -> QATReport:
        """Every step in order; ``write=False`` (``fast_dev_run``) stops after the conversion, writing nothing.

        A SIGTERM at any step raises :class:`~lightning_qat.EvaluationInterrupted` (the artifact kept if written).
        """
        with sigterm_raises("the QAT end of fit"):
            return self._run(out_dir, write)

    def _run(self, out_dir: Path, write: bool) -> QATReport:
        start = time.perf_counter()
        with showing(self.progress, "QAT: converting a CPU copy to int8"):
            report = self.convert_network()
        if not write:
            rank_zero_info("QAT: fast_dev_run: the int8 conversion works; no artifact or report is written.")
            return report
        with showing(self.progress, "QAT: writing the int8 artifact"):  # first: a later failure keeps it on disk
            self.write_artifact(report, out_dir)
        report.status = "evaluating"
        report.save(out_dir)  # says so until the evaluation is done
        try:
            self.evaluate_networks(report)
            self.analyze_layers(report)
            self.fall_back(report, out_dir)
            with showing(self.progress, "QAT: measuring size and latency"):
                self.measure_networks(report)
        except BaseException as err:
            report.status = f"failed during evaluation ({type(err).__name__}: {err}); the int8 artifact is saved"
            report.save(out_dir)
            raise
        report.status = "complete"
        report.seconds = time.perf_counter() - start
        self.write_report(report, out_dir)
        self.check_metric_drop(report)
        return report

    def convert_network(self) -> QATReport:
        """Convert a CPU copy of the trained QAT network (last or best weights) to int8; a report to fill."""
        run = self.qat_run
        self.trained_network, converted_from = self.trained_weights()
        static = run.activations == "static"
        self.float_groups = resolve_groups(self.trained_network, run.fallback, static)  # kept float in the fit
        self.quantized_model = self.to_int8(self.trained_network, self.float_groups)
        return QATReport(
            backend=self.settings.backend,
            mode=run.prepared.mode,
            num_fused=run.prepared.num_fused,
            quantized_layers=count_quantized_layers(self.quantized_model),
            stage=self.settings.evaluate,
            converted_from=converted_from,
            untrained_float=self.settings.untrained_float,
            float_params=float_parameters(self.quantized_model),
            float_ops=float_ops(self.quantized_model),
            zero_weights=zero_weights(self.quantized_model),
            network_params=sum(p.numel() for p in self.trained_network.parameters()),
            conv_bn_pairs=run.prepared.conv_bn_pairs,
            conv_bn_unfused=list(run.prepared.conv_bn_unfused),
            kept_float=self.kept_float(),
            module=run.target,
            outside_params=sum(
                p.numel() for name, p in run.pl_module.named_parameters() if not name.startswith(f"{run.target}.")
            ),
            activations=run.activations,
            activation_ms=dict(run.activation_ms),
            speed_ms=dict(run.speed.ms),
            attention=run.prepared.attention,
            monitor=self.settings.monitor,
            fallback=float_names(self.float_groups),
            fallback_met=run.fallback_met,
            fallback_candidates=list(run.fallback_candidates),
            fallback_evaluations=len(run.fallback_candidates),
            fallback_seconds=run.fallback_seconds,
            freezing=dict(self.settings.freezing),
        )

    def kept_float(self) -> list[dict[str, str]]:
        """Every layer or op the int8 model keeps float, with why and who decided: the report's one list."""
        run, settings = self.qat_run, self.settings
        entries = [kept(name, "skip=", "you") for name in run.skip]
        shared = "called at several places in one forward pass: fusing one call's BatchNorm would change the others"
        entries += [kept(name, shared, "engine") for name in run.prepared.shared]
        entries += [
            kept(name, why, "speed" if name in run.speed.kept else "engine")
            for name, why in run.prepared.kept_float.items()
        ]
        budget = f"int8 missed max_metric_drop={settings.max_metric_drop} on {settings.monitor}"
        return entries + [kept(name, budget, "budget") for name in float_names(self.float_groups)]

    def to_int8(self, network: nn.Module, float_groups: Sequence[Group] = ()) -> nn.Module:
        """The QAT ``network`` as the int8 model the run ships (static or dynamic), ``float_groups`` kept float."""
        run = self.qat_run
        engine = run.prepared.engine
        backend, inputs = self.settings.backend, run.example_inputs
        if run.activations == "dynamic":  # what QAT trained for (FX / eager: weights only)
            return to_int8(network, engine, backend, inputs, [group.layer for group in float_groups], dynamic=True)
        return to_int8(network, engine, backend, inputs, float_nodes(float_groups))

    def trained_weights(self) -> tuple[nn.Module, str]:
        """A CPU copy of the QAT network with the weights ``convert`` asks for, and where they come from."""
        run = self.qat_run
        network = cpu_eval_copy(run.pl_module.get_submodule(run.target))
        if run.loaded_from is not None:
            return network, f"checkpoint: {run.loaded_from}"
        if self.settings.weights == "last":
            return network, "last"
        if not run.best_checkpoint:
            rank_zero_warn("QAT: weights='best' but no ModelCheckpoint saved a best checkpoint; converting the last.")
            return network, "last"
        state = checkpoint_io.read_checkpoint(run.best_checkpoint)["state_dict"]
        network.load_state_dict(checkpoint_io.network_state(state, run.target))
        return network, f"best: {run.best_checkpoint}"

    def write_artifact(self, report: QATReport, out_dir: Path) -> None:
        """Save the int8 artifacts of ``export`` to ``out_dir`` (none for ``export=[]``), the engine's first."""
        if not self.settings.save_artifact:
            return
        assert self.quantized_model is not None
        assert self.trained_network is not None
        self.artifacts.write(report, self.quantized_model, self.trained_network, self.float_groups, out_dir)

    def evaluate_networks(self, report: QATReport) -> None:
        """Run the user's ``validation_step``/``test_step`` on float, (PTQ,) QAT and int8 CPU copies."""
        stage = self.settings.evaluate
        if stage is None:
            return
        assert self.trained_network is not None
        assert self.quantized_model is not None
        run = self.qat_run
        networks: dict[str, nn.Module] = {"float": run.float_network}
        if self.settings.ptq_baseline:
            networks["ptq"] = self.ptq_network()
        qat_copy = cpu_eval_copy(self.trained_network)
        freeze_for_inference(qat_copy)
        networks |= {"qat": qat_copy, "int8": self.artifacts.shipped or self.quantized_model}
        if self.onnx_path is not None:
            networks["int8-onnx"] = self.artifacts.onnx_network()
        for row, network in networks.items():
            report.metrics[row] = self.evaluate(network, label=f"QAT: evaluating {row}")

    def evaluate(
        self, network: nn.Module, limit: int | None = None, label: str = "QAT: evaluating"
    ) -> dict[str, float]:
        """The user's ``validation_step``/``test_step`` metrics of ``network`` in place of the trained one.

        ``limit``: that many batches (default: the run's evaluation limit); ``label``: its progress bar's name.
        """
        run, stage = self.qat_run, self.settings.evaluate
        assert stage is not None
        clone = module_with_network(run.pl_module, run.target, network)
        return run_evaluation(
            clone, stage, self.settings.backend, self.data, self.progress, limit, self.root_dir, label
        )

    def analyze_layers(self, report: QATReport) -> None:
        """The report's per-layer SQNR: :meth:`measure_sqnr` of the int8 layers of the trained QAT network."""
        assert self.trained_network is not None
        self.sqnr = self.measure_sqnr(self.trained_network)
        floating = set(float_names(self.float_groups)) | {group.layer for group in self.float_groups}  # not int8
        quantizers = activation_quantizers(self.trained_network)
        for name, db in self.sqnr.items():
            if name in quantizers:  # named by the ops on its sides, as what keeping it float keeps float
                report.quantizer_sqnr[", ".join(quantizers[name].names)] = db
            elif name not in floating:
                report.layer_sqnr[name] = db

    def measure_sqnr(self, network: nn.Module) -> dict[str, float]:
        """Per-layer, then per-quantizer SQNR of the QAT ``network`` on the inputs your evaluation feeds it.

        The quantizers: the activation quantizers of their own (:func:`~lightning_qat.quantization.fallback.groups`),
        by name. Measured on :attr:`sqnr_batches` batches.

        The LightningModule's ``validation_step``/``test_step`` runs on a copy for that many batches, so the layers see
        what your module gives the network (token ids, dicts...); with ``evaluate=None``, the example input.
        """
        if self.settings.evaluate is None:
            return layer_sqnr(network, [self.qat_run.example_inputs], quantizers=True)
        copy = cpu_eval_copy(network)
        freeze_for_inference(copy)
        with LayerSQNR(copy, self.sqnr_batches, quantizers=True) as meter:
            self.evaluate(copy, limit=self.sqnr_batches, label="QAT: per-layer SQNR")
        return meter.result()

    def fall_back(self, report: QATReport, out_dir: Path) -> None:
        """``on_drop="fallback"`` at fit end: when int8 misses the budget, keep float the fewest layers that meet it.

        Searched by :attr:`budget` (:class:`~lightning_qat.lightning.budget.BudgetSearch`) over the layers still int8
        (a search during the fit may have kept some float already). The chosen model (or, when none meets the budget,
        the best one, if it beats the int8 model) becomes the int8 model: its artifacts are written again and its
        metrics are the int8 row.
        """
        settings = self.settings
        monitor, budget = settings.monitor, settings.max_metric_drop
        if settings.on_drop != "fallback" or monitor is None or budget is None or report.untrained_float:
            return
        drop = report.metric_drop(monitor, settings.monitor_mode)
        if drop is not None and drop <= budget and report.fallback_met is False:
            report.fallback_met = True  # a search during the fit found nothing, but the training that followed did
        if drop is None or drop <= budget or not self.budget.possible:
            return  # met (or not measurable, which check_metric_drop says): nothing more to evaluate
        assert self.trained_network is not None
        start = time.perf_counter()
        searched = len(self.float_groups)
        result = self.budget.search(
            self.trained_network,
            self.sqnr,
            report.metrics["float"][monitor],
            report.metrics["int8"][monitor],
            qat_value=report.metrics.get("qat", {}).get(monitor),
        )
        report.fallback_candidates += [asdict(candidate) for candidate in result.candidates]
        report.fallback_evaluations += result.evaluations
        report.fallback_met = result.chosen is not None
        if len(self.float_groups) > searched:
            self.quantized_model = self.to_int8(self.trained_network, self.float_groups)
            assert result.best is not None
            report.metrics["int8"] = dict(result.best.metrics)
            report.fallback = float_names(self.float_groups)
            report.quantized_layers = count_quantized_layers(self.quantized_model)
            report.kept_float = self.kept_float()
            report.float_params = float_parameters(self.quantized_model)
            report.float_ops = float_ops(self.quantized_model)
            report.zero_weights = zero_weights(self.quantized_model)
            self.write_artifact(report, out_dir)
            if self.onnx_path is not None:
                network = self.artifacts.onnx_network()
                report.metrics["int8-onnx"] = self.evaluate(network, label="QAT: evaluating int8-onnx")
        report.fallback_seconds += time.perf_counter() - start

    def measure_networks(self, report: QATReport) -> None:
        """Size and CPU latency on the example input of the float network and of the int8 artifacts as they ship.

        The int8 column times the engine's artifact in its runtime (:meth:`Artifacts.timed
        <lightning_qat.lightning.artifacts.Artifacts.timed>`; with ``export=[]``, the same traced and frozen module, in
        memory); ``int8-onnx`` the ONNX file in ONNX Runtime. Sizes are the files' sizes (the float network: its saved
        ``state_dict``). All are timed interleaved, same batch and threads.
        """
        assert self.quantized_model is not None
        run, backend = self.qat_run, self.settings.backend
        report.size_bytes = {"float": serialized_size(run.float_network)}
        report.latency_runtime = {"float": "PyTorch eager"}
        networks = {"float": run.float_network, **self.artifacts.timed(report, self.quantized_model)}
        report.latency_ms = measure_latency(
            networks, run.example_inputs, backend, repeats=self.settings.latency_repeats
        )
        report.latency_batch_size = batch_size(run.example_inputs)
        report.latency_threads = torch.get_num_threads()
        if report.speedup is not None and report.speedup < 1:  # why, layer by layer (not timed otherwise: seconds)
            times = layer_times(
                self.quantized_model, run.float_network, run.example_inputs, backend, prefix=run.prepared.engine.prefix
            )
            report.layer_ms = {name: list(pair) for name, pair in times.items()}

    def write_report(self, report: QATReport, out_dir: Path) -> None:
        """Metrics to the loggers (``float/…``, ``qat/…``, ``int8/…``), json + markdown files, chart, terminal table.

        The chart is :func:`~lightning_qat.lightning.chart.save_chart`'s ``qat_layers.png``, logged as an image too.
        """
        for logger in self.loggers:
            logger.log_metrics(
                {f"{row}/{k}": v for row, m in report.metrics.items() for k, v in m.items()}, step=self.step
            )
        report.save(out_dir)
        save_chart(report, out_dir, self.loggers, self.step)
        report.print()

    def check_metric_drop(self, report: QATReport) -> None:
        """The accuracy guard: warn (or raise, ``on_drop="raise"``) when ``monitor`` drops more than allowed.

        Raises:
            AccuracyBudgetError: with ``on_drop="raise"``, when the drop is larger than ``max_metric_drop``.
        """
        monitor, budget = self.settings.monitor, self.settings.max_metric_drop
        if monitor is None:
            return
        if report.untrained_float:
            rank_zero_info("QAT accuracy guard: skipped, the float row is an untrained network (untrained_float=True).")
            return
        drop = report.metric_drop(monitor, self.settings.monitor_mode)
        if drop is None:
            rank_zero_warn(
                f"QAT accuracy guard: monitor={monitor!r} was not logged by the evaluation; logged metrics: "
                f"{report.metric_names()}."
            )
            return
        if budget is not None and drop > budget:
            message = (
                f"QAT accuracy guard: {monitor} dropped by {drop:.4g} from float "
                f"({report.metrics['float'][monitor]:.4g}) to int8 ({report.metrics['int8'][monitor]:.4g}), "
                f"more than max_metric_drop={budget}."
            )
            if self.settings.on_drop == "raise":
                raise AccuracyBudgetError(message + " The trained QAT model, checkpoints and artifact are kept.")
            rank_zero_warn(message)

    def ptq_network(self) -> nn.Module:
        """The float network post-training quantized: calibrated on ``ptq_batches`` training batches, converted."""
        run = self.qat_run
        ptq = prepare_model(
            cpu_eval_copy(run.float_network),
            self.settings.backend,
            run.mode,
            run.skip,
            run.example_inputs,
            qat=False,
            relu6_to_relu=run.relu6_to_relu,
            kept=run.prepared.kernels,  # the run's decision for the kernels: the baseline has the QAT run's graph
        )
        self.calibrate(ptq.module)
        return to_int8(ptq.module, ptq.engine, self.settings.backend, run.example_inputs)

    def calibrate(self, network: nn.Module) -> None:
        """Run ``network`` (a CPU copy whose observers observe) on ``ptq_batches`` training batches."""
        with ao.engine(self.settings.backend), ao.quiet(), torch.no_grad():
            for i, batch in enumerate(self.data.calibration() if self.data.calibration else ()):
                if i >= self.settings.ptq_batches:
                    break
                network(*cpu_inputs(batch_input(batch)))


def finish_on_rank0(trainer: pl.Trainer, build: Callable[[], FinishPipeline], out_dir: Path) -> QATReport | None:
    """Run the pipeline ``build`` makes on global rank 0; every rank gets its report, or raises its failure.

    Under DDP the other ranks wait for rank 0 and then raise too when it failed (none hangs in a later collective).
    """
    failure: Exception | None = None
    report: QATReport | None = None
    if trainer.is_global_zero:
        try:
            fast_dev_run = trainer.fast_dev_run  # type: ignore[attr-defined]  # set by Lightning's init
            report = build().run(out_dir, write=not fast_dev_run)
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
    return report
