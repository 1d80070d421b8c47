"""Other Lightning callbacks that hold the network's modules: pointed at the QAT network once it is prepared.

Weight averaging (SWA, EMA) is refused in ``setup`` (:func:`check_averaging`); ``BackboneFinetuning``,
``GradientAccumulationScheduler`` and ``LearningRateFinder`` read the modules when they act and need nothing here.

Preparing replaces the network's layers with QAT modules (fused Conv-BN-ReLU, fake-quantized Linears). A callback
that collected the float layers in its own ``setup`` (Lightning's ``ModelPruning`` placed before this callback) would
go on pruning modules nothing calls (0% zeros after the fit); one that collects after it (placed after) would prune
the BatchNorm inside a fused module too, whose ``forward`` never runs, so its pruning hook never recomputes the
weight and the second step backpropagates through the first step's graph. Both orders end here: the pruning acts on
the QAT layers' weights, the ones that become the int8 weights (a zero stays a zero in symmetric int8).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch import callbacks
from lightning.pytorch.callbacks import ModelPruning, StochasticWeightAveraging
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_qat.exceptions import PreflightError
from lightning_qat.quantization import ao
from lightning_qat.quantization.engines import Prepared


def check_averaging(trainer: pl.Trainer) -> None:
    """Refuse weight averaging beside QAT, before anything is prepared: neither works with a QAT network yet.

    Raises:
        PreflightError: for ``StochasticWeightAveraging`` or ``WeightAveraging`` (EMA) in the trainer's callbacks.
    """
    averaging = tuple(c for c in (StochasticWeightAveraging, getattr(callbacks, "WeightAveraging", None)) if c)
    found = [type(c).__name__ for c in trainer.callbacks if isinstance(c, averaging)]  # type: ignore[attr-defined]
    if found:
        raise PreflightError(
            f"{found[0]} beside QATCallback: weight averaging does not work on a QAT network yet. "
            "StochasticWeightAveraging resets the BatchNorm statistics at the end of training and recomputes them in "
            "an extra epoch, which the BatchNorms frozen inside fused Conv-BN layers never do (int8 val_acc 0.32 "
            "against 0.77 without it, measured on digits); WeightAveraging copies every buffer into its average, and "
            "the fake-quant scales change shape at the first batch. Average the float network's weights before QAT "
            "(a float fine-tuning run with the callback), then run QAT from those weights."
        )


def module_names(pl_module: pl.LightningModule) -> dict[int, str]:
    """Every submodule's qualified name, by identity: taken before preparing, to find each layer again after."""
    return {id(m): name for name, m in pl_module.named_modules()}


def retarget_pruning(
    trainer: pl.Trainer, pl_module: pl.LightningModule, target: str, prepared: Prepared, before: dict[int, str]
) -> None:
    """Point every ``ModelPruning`` of ``trainer`` at the QAT layers of ``prepared`` (see the module's docstring).

    ``before``: :func:`module_names` of ``pl_module`` with the float network. A pruned float layer is found again by
    its name; a BatchNorm fused into its convolution is pruned no more (it folds into the convolution's int8
    weights); the default (every weight and bias) becomes the QAT layers' own.

    Raises:
        PreflightError: for an engine whose QAT network has no layer modules to prune (PT2E's captured graph), or a
            pruned layer that is gone from the prepared network.
    """
    prunings = [c for c in trainer.callbacks if isinstance(c, ModelPruning)]  # type: ignore[attr-defined]
    if not prunings:
        return
    if not prepared.engine.layer_modules:
        raise PreflightError(
            f"ModelPruning with the {prepared.mode} engine: its captured graph holds no layer modules for pruning's "
            "hooks. Use engine='fx' (or 'eager') to prune and quantize together, or prune before QAT."
        )
    network = pl_module.get_submodule(target)
    now = module_names(pl_module)
    inside_fused = {id(ao.fused_batch_norm(m)) for m in network.modules() if ao.is_conv_bn_qat(m)}
    for pruning in prunings:
        wanted: list[tuple[nn.Module, str]] = list(pruning._parameters_to_prune)
        names = pruning._parameter_names or list(ModelPruning.PARAMETER_NAMES)
        if not wanted:  # Lightning's default, without the BatchNorms whose forward no longer runs
            wanted = [(m, p) for m in pl_module.modules() for p in names if _prunable(m, p)]
        kept, dropped = [], []
        for module, name in wanted:
            found = _find(pl_module, before.get(id(module)), module, target)
            if found is None or id(found) in inside_fused:
                dropped.append(f"{before.get(id(module)) or now.get(id(module))}.{name}")
                continue
            if not hasattr(found, name):
                raise PreflightError(
                    f"ModelPruning prunes `{before[id(module)]}.{name}`, which its QAT layer "
                    f"{type(found).__name__} does not have; prune its weight instead."
                )
            kept.append((found, name))
        pruning._parameters_to_prune = kept
        pruning.setup(trainer, pl_module, "fit")  # again where it ran before this callback: copies of the QAT layers
        if dropped:  # a network's every BatchNorm: a count and the first few, not a wall of names
            shown = ", ".join(dropped[:3]) + (", ..." if len(dropped) > 3 else "")
            rank_zero_info(
                f"QAT: ModelPruning does not prune {len(dropped)} parameters ({shown}): BatchNorms fused into their "
                "convolutions (their scale folds into the convolution's weights, which are pruned)."
            )
    rank_zero_info(f"QAT: ModelPruning prunes the QAT layers ({sum(len(p._parameters_to_prune) for p in prunings)}).")


_CONTAINERS = (pl.LightningModule, nn.Sequential, nn.ModuleList, nn.ModuleDict)  # as ModelPruning's default


def _prunable(module: nn.Module, name: str) -> bool:
    """ModelPruning's default, and torch's fused QAT layers, which are ``nn.Sequential`` subclasses too."""
    layer = not isinstance(module, _CONTAINERS) or ao.is_fused_module(module)
    return layer and isinstance(getattr(module, name, None), nn.Parameter)


def _find(pl_module: pl.LightningModule, name: str | None, module: nn.Module, target: str) -> nn.Module | None:
    """The module now at ``name`` (or inside the eager engine's wrapper); ``module`` itself if it never moved."""
    if name is None:  # added after the names were taken, or already a QAT layer: itself, if still in pl_module
        return module if any(m is module for m in pl_module.modules()) else None
    candidates = [name]
    if name.startswith(f"{target}."):
        candidates.append(f"{target}.module.{name[len(target) + 1 :]}")  # eager's EagerQATWrapper
    for candidate in candidates:
        try:
            found: Any = pl_module.get_submodule(candidate)
        except AttributeError:
            continue
        return found if isinstance(found, nn.Module) else None
    return None
