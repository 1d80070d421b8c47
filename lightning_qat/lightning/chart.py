"""``qat_layers.png``: where the int8 error is (per-layer SQNR) and, after a fallback search, what each candidate cost.

Drawn with matplotlib's object API (no pyplot: the user's backend and open figures are not touched), saved beside the
report and sent to the trainer's loggers that take images (TensorBoard, Weights & Biases, MLflow). matplotlib is the
optional ``[plot]`` extra: without it the chart is skipped with one line saying how to get it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.fabric.loggers import Logger
from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info

from lightning_qat.lightning.report import QATReport

FILE = "qat_layers.png"
_said_missing = False


def available() -> bool:
    """Whether matplotlib is installed (``pip install 'lightning-qat[plot]'``)."""
    return importlib.util.find_spec("matplotlib") is not None


def layers_chart(report: QATReport) -> Any:
    """The chart of ``report`` as a matplotlib ``Figure``; ``None`` without per-layer SQNR or matplotlib."""
    global _said_missing
    if not report.layer_sqnr:
        return None
    if not available():
        if not _said_missing:
            _said_missing = True
            rank_zero_info(f"QAT: {FILE} skipped: matplotlib is not installed (pip install 'lightning-qat[plot]').")
        return None
    from matplotlib.figure import Figure

    names, values = list(report.layer_sqnr), list(report.layer_sqnr.values())
    candidates = report.fallback_candidates
    figure = Figure(figsize=(max(6.0, 0.18 * len(names) + 2), 7.0 if candidates else 4.0), layout="constrained")
    bars = figure.add_subplot(2 if candidates else 1, 1, 1)
    floating = set(report.fallback)
    colors = ["tab:red" if name in floating else "tab:blue" for name in names]
    bars.bar(range(len(names)), values, color=colors)
    bars.set_xticks(range(len(names)), names, rotation=90, fontsize=6 if len(names) > 30 else 8)
    bars.set_ylabel("SQNR (dB): int8 vs float")
    bars.axhline(40, color="grey", linewidth=0.8, linestyle=":")  # a 1% error
    bars.set_title("per-layer quantization error" + (" (red: kept float by the fallback)" if floating else ""))
    if candidates:
        trade = figure.add_subplot(2, 1, 2)
        timed = all(c["latency_ms"] is not None for c in candidates)  # a compiled engine's are not
        latency = [c["latency_ms"] if timed else len(c["names"] or c["layers"]) for c in candidates]
        metric = [c["metric"] for c in candidates]
        trade.scatter(latency, metric, c=["tab:green" if c["meets"] else "tab:orange" for c in candidates])
        for c, x, y in zip(candidates, latency, metric, strict=True):
            label = ", ".join(c["layers"]) or "all int8"
            label = label if len(label) <= 40 else f"{len(c['layers'])} layers"
            trade.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        float_value = report.metrics.get("float", {}).get(report.monitor or "")
        if float_value is not None:
            trade.axhline(float_value, color="grey", linewidth=0.8, linestyle="--", label="float")
            trade.legend(fontsize=7)
        trade.set_xlabel("int8 latency (ms, TorchScript)" if timed else "modules and ops kept float")
        trade.set_ylabel(report.monitor or "metric")
        trade.set_title(f"fallback candidates ({report.fallback_evaluations} evaluated; green: meets the budget)")
    return figure


def save_chart(report: QATReport, directory: Path, loggers: Sequence[Logger] = (), step: int = 0) -> Path | None:
    """Write :func:`layers_chart` to ``directory/qat_layers.png`` and log it to the loggers that take images."""
    figure = layers_chart(report)
    if figure is None:
        return None
    path = directory / FILE
    figure.savefig(path, dpi=110)
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_figure("qat/layers", figure, global_step=step, close=False)  # close: pyplot
        elif isinstance(logger, WandbLogger):
            logger.log_image("qat/layers", [str(path)], step=step)
        elif isinstance(logger, MLFlowLogger):
            logger.experiment.log_figure(logger.run_id, figure, FILE)
    return path
