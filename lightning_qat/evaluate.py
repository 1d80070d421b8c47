"""Evaluating float / QAT / int8 networks with the user's own metrics, their size and latency, and the report."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import statistics
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from torch import nn
from torchmetrics import Metric

from lightning_qat import ao

Stage = Literal["val", "test"]
ROWS = ("float", "ptq", "qat", "int8")


@dataclass
class QATReport:
    """What quantization cost and bought: metrics, size and latency of the float, QAT and int8 networks."""

    backend: str
    mode: str
    num_fused: int
    quantized_layers: int
    skipped: list[str]
    stage: str | None = None
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    size_bytes: dict[str, int] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)
    latency_batch_size: int = 0
    latency_threads: int = 0
    artifact: str | None = None
    seconds: float = 0.0

    @property
    def size_ratio(self) -> float | None:
        """Float size / int8 size."""
        if self.size_bytes.get("int8"):
            return self.size_bytes["float"] / self.size_bytes["int8"]
        return None

    @property
    def speedup(self) -> float | None:
        """Float latency / int8 latency (same batch, same threads)."""
        if self.latency_ms.get("int8"):
            return self.latency_ms["float"] / self.latency_ms["int8"]
        return None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict, ratios included."""
        return {**asdict(self), "size_ratio": self.size_ratio, "speedup": self.speedup}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QATReport:
        """Inverse of :meth:`to_dict`."""
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in names})

    def metric_names(self) -> list[str]:
        """Every metric name of any row, sorted."""
        return sorted({name for row in self.metrics.values() for name in row})

    def to_markdown(self) -> str:
        """The report as a markdown document."""
        rows = [r for r in ROWS if r in self.metrics]
        names = self.metric_names()
        lines = [
            "# QAT report",
            "",
            f"backend `{self.backend}`, mode `{self.mode}`, {self.num_fused} fused modules, "
            f"{self.quantized_layers} quantized layers, skipped: {self.skipped or 'none'}",
            "",
        ]
        if names:
            lines += ["| metric | " + " | ".join(rows) + " |", "|---" * (len(rows) + 1) + "|"]
            lines += [f"| {n} | " + " | ".join(_fmt(self.metrics[r].get(n)) for r in rows) + " |" for n in names]
            lines.append("")
        lines += ["| | float | int8 | ratio |", "|---|---|---|---|"]
        if self.size_bytes:
            lines.append(
                f"| size (MB) | {self.size_bytes['float'] / 1e6:.3f} | {self.size_bytes['int8'] / 1e6:.3f} "
                f"| {_fmt(self.size_ratio)}x smaller |"
            )
        if self.latency_ms:
            lines.append(
                f"| latency (ms/batch of {self.latency_batch_size}, {_threads(self.latency_threads)}) "
                f"| {self.latency_ms['float']:.2f} | {self.latency_ms['int8']:.2f} | {_fmt(self.speedup)}x faster |"
            )
        if self.artifact:
            lines += ["", f"int8 artifact: `{self.artifact}`"]
        return "\n".join(lines) + "\n"

    def print(self) -> None:
        """Print the report as rich tables."""
        from rich.console import Console
        from rich.table import Table

        rows = [r for r in ROWS if r in self.metrics]
        console = Console()
        table = Table(title=f"QAT report ({self.backend}, {self.mode} mode, {self.num_fused} fused)")
        table.add_column("metric")
        for r in rows:
            table.add_column(r, justify="right")
        for n in self.metric_names():
            table.add_row(n, *(_fmt(self.metrics[r].get(n)) for r in rows))
        if self.size_bytes:
            table.add_row("size (MB)", *(_mb(self.size_bytes.get(r)) for r in rows))
        if self.latency_ms:
            table.add_row(f"ms / batch of {self.latency_batch_size}", *(_fmt(self.latency_ms.get(r)) for r in rows))
        console.print(table)
        extras = []
        if self.size_ratio:
            extras.append(f"int8 is {self.size_ratio:.2f}x smaller")
        if self.speedup:
            extras.append(f"{self.speedup:.2f}x faster ({_threads(self.latency_threads)})")
        if self.artifact:
            extras.append(f"artifact: {self.artifact}")
        if extras:
            console.print("; ".join(extras))

    def save(self, directory: str | Path) -> tuple[Path, Path]:
        """Write ``qat_report.json`` and ``qat_report.md`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        json_path, md_path = directory / "qat_report.json", directory / "qat_report.md"
        json_path.write_text(json.dumps(self.to_dict(), indent=2))
        md_path.write_text(self.to_markdown())
        return json_path, md_path


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _mb(value: int | None) -> str:
    return "-" if value is None else f"{value / 1e6:.3f}"


def _threads(n: int) -> str:
    return f"{n} thread" if n == 1 else f"{n} threads"


def serialized_size(module: nn.Module) -> int:
    """Bytes of ``torch.save(module.state_dict())``: what the weights cost on disk."""
    buffer = io.BytesIO()
    with ao.quiet():
        torch.save(module.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def count_quantized_layers(module: nn.Module) -> int:
    """Number of converted int8 modules with weights (conv, linear, fused variants)."""
    return sum(ao.is_quantized_module(m) and hasattr(m, "weight") for m in module.modules())


def measure_latency(
    models: dict[str, nn.Module], inputs: tuple[Any, ...], backend: str, repeats: int = 20, warmup: int = 3
) -> dict[str, float]:
    """Median CPU milliseconds per forward pass of each model, measured interleaved on the same batch and threads."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with ao.engine(backend), ao.quiet(), torch.inference_mode():
        for _ in range(warmup):
            for model in models.values():
                model(*inputs)
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(*inputs)
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Keep the evaluation trainer's start-up lines (GPU available, ...) out of the user's log."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def module_with(pl_module: pl.LightningModule, target: str, network: nn.Module) -> pl.LightningModule:
    """A CPU copy of ``pl_module`` whose submodule ``target`` is ``network``; ``pl_module`` is not changed.

    The original network is swapped out while copying so it is neither copied nor moved.
    """
    parent_name, _, attr = target.rpartition(".")
    parent = pl_module.get_submodule(parent_name)
    original = getattr(parent, attr)
    setattr(parent, attr, nn.Identity())
    try:
        clone = copy.deepcopy(pl_module)
    finally:
        setattr(parent, attr, original)
    setattr(clone.get_submodule(parent_name), attr, network)
    # Lightning caches id(metric) -> attribute name for `self.log(metric)`; the copies have new ids.
    clone._metric_attributes = None
    # Only global rank 0 evaluates: a torchmetrics sync would wait forever for the other ranks.
    for metric in clone.modules():
        if isinstance(metric, Metric):
            metric.distributed_available_fn = _single_process
    return clone.cpu()


def _single_process() -> bool:
    return False


def evaluate(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    stage: Stage,
    backend: str,
    progress: bool,
) -> dict[str, float]:
    """Run the user's ``validation_step``/``test_step`` on ``pl_module`` on the CPU with Lightning's own loop.

    Data comes from ``trainer``'s datamodule, the dataloaders given to ``fit``, or the module's hooks, re-created
    so a distributed sampler never hides part of the data. Returns the logged metrics as floats.
    """
    if stage == "val":
        source = trainer.fit_loop.epoch_loop.val_loop._data_source.instance
        limit = trainer.limit_val_batches
    else:
        source = trainer.test_loop._data_source.instance
        limit = trainer.limit_test_batches
    datamodule = trainer.datamodule
    kwargs: dict[str, Any] = {}
    if datamodule is not None:
        kwargs["datamodule"] = datamodule
    elif source is not None and not isinstance(source, pl.LightningModule):
        kwargs["dataloaders"] = source
    previous_dm_trainer = datamodule.trainer if datamodule is not None else None
    with _quiet_lightning():
        eval_trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=progress,
            # tqdm, not rich: a second rich live display inside the training one breaks rich's live stack.
            callbacks=[TQDMProgressBar(leave=False)] if progress else None,
            limit_val_batches=limit,
            limit_test_batches=limit,
            default_root_dir=trainer.default_root_dir,
        )
        try:
            with ao.engine(backend), ao.quiet():
                run = eval_trainer.validate if stage == "val" else eval_trainer.test
                results = run(pl_module, verbose=False, **kwargs)
        finally:
            if datamodule is not None:
                datamodule.trainer = previous_dm_trainer
    metrics: dict[str, float] = {}
    for result in results:
        for name, value in result.items():
            metrics[name.split("/dataloader_idx_")[0] if len(results) == 1 else name] = float(value)
    return metrics


def metric_drop(float_value: float, int8_value: float, mode: str) -> float:
    """How much worse int8 is than float (positive = worse), for a metric to ``max``imize or ``min``imize."""
    return float_value - int8_value if mode == "max" else int8_value - float_value
