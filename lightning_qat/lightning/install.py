"""Putting the QAT-prepared network where the float one was in a LightningModule, and saying what was done."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_qat.quantization import ao, compat
from lightning_qat.quantization.edits import kept_float
from lightning_qat.quantization.engines import Mode, Needs, Prepared
from lightning_qat.quantization.prepare import prepare_model


def install(
    pl_module: pl.LightningModule,
    target: str,
    network: nn.Module,
    backend: str,
    mode: Mode,
    skip: Sequence[str],
    example_inputs: tuple[Any, ...],
    relu6_to_relu: bool = False,
    kernels: dict[str, str] | None = None,
    needs: Needs | None = None,
) -> Prepared:
    """Prepare ``network`` for QAT and set it as ``pl_module``'s submodule ``target``; on rank 0, say what was done.

    What was fused and in which mode, and what stays float and why (whether anything is quantized at all is said by
    the preflight, which converts).
    """
    notice = ao.first_notice()  # once per process: torch.ao's deprecation warnings are silenced
    if notice:
        rank_zero_info(notice)
    prepared = prepare_model(
        network, backend, mode, skip, example_inputs, relu6_to_relu=relu6_to_relu, kept=kernels, needs=needs
    )
    compat.set_submodule(pl_module, target, prepared.module)
    for warning in prepared.warnings:
        rank_zero_warn(warning)
    say_folded(prepared.folded)
    if prepared.shared:
        rank_zero_info(
            f"QAT: {prepared.shared} are called at several places in `{target}`'s forward; they stay "
            "float and unfused (fusing one call site's BatchNorm into them would change the others)."
        )
    rank_zero_info(
        f"QAT: prepared `{target}` in {prepared.mode} mode ({prepared.reason}); "
        f"{prepared.num_fused} fused modules, backend {backend!r}, skipped {list(skip) or 'nothing'}"
        + (f", {prepared.relu6_replaced} ReLU6 replaced by ReLU." if relu6_to_relu else ".")
    )
    if prepared.conv_bn_unfused:
        pairs, unfused = prepared.conv_bn_pairs or 0, len(prepared.conv_bn_unfused)
        rank_zero_warn(
            f"QAT: {unfused} of {pairs} Conv-BN pairs of `{target}` stay unfused: {prepared.conv_bn_unfused}"
        )
    return prepared


def decide_kernels(trainer: pl.Trainer, network: nn.Module, backend: str, skip: Sequence[str]) -> dict[str, str]:
    """The layers to keep float for this CPU's int8 kernels, timed on global rank 0 and the same on every rank.

    Each rank timing for itself could prepare another graph (the timings of two CPUs, or of one busy moment, differ).
    """
    kernels = kept_float(network, backend, skip) if trainer.is_global_zero else {}
    return trainer.strategy.broadcast(kernels, src=0) if trainer.world_size > 1 else kernels


def say_folded(folded: Sequence[str]) -> None:
    """Say which layers' weight norm (or other parametrization) was folded into a plain weight."""
    if folded:
        rank_zero_info(
            f"QAT: the weight norm of {list(folded)} is folded into their weights (torch's QAT layers take no "
            "parametrization): they compute the same function, and QAT trains those weights directly."
        )
