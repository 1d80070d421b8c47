"""Evaluating float / PTQ / QAT / int8 networks with the user's own metrics on the CPU; their size and latency."""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import statistics
import time
import warnings
from collections.abc import Iterator
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from torch import nn
from torchmetrics import Metric

from lightning_qat import ao, compat, lightning_internals

Stage = Literal["val", "test"]


def serialized_size(network: nn.Module) -> int:
    """Bytes of ``torch.save(network.state_dict())``: what the weights cost on disk."""
    buffer = io.BytesIO()
    with ao.quiet():
        torch.save(network.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def count_quantized_layers(network: nn.Module) -> int:
    """Quantized ops of a converted network: int8 modules with weights and, in FX graphs, int8 functional ops."""
    modules = sum(ao.is_quantized_module(m) and hasattr(m, "weight") for m in network.modules())
    functions = 0
    if isinstance(network, torch.fx.GraphModule):
        functions = sum(
            node.op == "call_function" and str(node.target).startswith("quantized.") for node in network.graph.nodes
        )
    return modules + functions


def float_parameters(network: nn.Module) -> dict[str, int]:
    """Float parameters left in a converted network, by module type (what int8 does not cover)."""
    counts: dict[str, int] = {}
    for module in network.modules():
        if ao.is_quantized_module(module):
            continue
        n = sum(p.numel() for p in module.parameters(recurse=False))
        if n:
            counts[type(module).__name__] = counts.get(type(module).__name__, 0) + n
    return dict(sorted(counts.items(), key=lambda item: -item[1]))


def measure_latency(
    networks: dict[str, nn.Module], inputs: tuple[Any, ...], backend: str, repeats: int = 20, warmup: int = 3
) -> dict[str, float]:
    """Median CPU milliseconds per forward pass of each network, measured interleaved on the same batch and threads."""
    times: dict[str, list[float]] = {name: [] for name in networks}
    with ao.engine(backend), ao.quiet(), torch.inference_mode():
        for _ in range(warmup):
            for network in networks.values():
                network(*inputs)
        for _ in range(repeats):
            for name, network in networks.items():
                start = time.perf_counter()
                network(*inputs)
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


def module_with_network(pl_module: pl.LightningModule, target: str, network: nn.Module) -> pl.LightningModule:
    """A CPU copy of ``pl_module`` whose submodule ``target`` is ``network``; ``pl_module`` is not changed.

    The original network is swapped out while copying so it is neither copied nor moved.
    """
    original = pl_module.get_submodule(target)
    compat.set_submodule(pl_module, target, nn.Identity())
    try:
        clone = copy.deepcopy(pl_module)
    finally:
        compat.set_submodule(pl_module, target, original)
    compat.set_submodule(clone, target, network)
    lightning_internals.forget_metric_attributes(clone)  # `self.log(metric)` looks metrics up by id
    # Only global rank 0 evaluates: a torchmetrics sync would wait forever for the other ranks.
    for metric in clone.modules():
        if isinstance(metric, Metric):
            metric.distributed_available_fn = _single_process
    return clone.cpu()


def _single_process() -> bool:
    return False


def run_evaluation(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    stage: Stage,
    backend: str,
    progress: bool,
    limit: int | float | None = None,
) -> dict[str, float]:
    """Run the user's ``validation_step``/``test_step`` on ``pl_module`` on the CPU with Lightning's own loop.

    Data comes from ``trainer``'s datamodule, the dataloaders given to ``fit``, or the module's hooks, re-created
    so a distributed sampler never hides part of the data; ``limit`` batches (default: the trainer's limit). Returns
    the logged metrics as floats.
    """
    datamodule = trainer.datamodule
    kwargs: dict[str, Any] = {}
    if datamodule is not None:
        kwargs["datamodule"] = datamodule
    else:
        source = lightning_internals.eval_data_source(trainer, stage)
        if source is not None and not isinstance(source, pl.LightningModule):
            kwargs["dataloaders"] = source
    if limit is None:
        limit = trainer.limit_val_batches if stage == "val" else trainer.limit_test_batches
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
