"""Preparing a float network for QAT: the edits every engine starts from, then the engine's own preparation.

:func:`prepare_model` folds weight norms, swaps ReLU6 (when asked), asks this CPU's kernels what stays float
(:mod:`.edits`), then hands the network to the engine of ``mode`` (:mod:`.engines`); ``mode="auto"`` tries FX, then
PT2E for what torch.fx cannot trace, then eager.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from lightning_qat.quantization import ao, edits, engines, pt2e
from lightning_qat.quantization.engines import Mode, Needs, Preparation, Prepared
from lightning_qat.quantization.engines.eager import EagerQATWrapper, FloatIsland
from lightning_qat.quantization.engines.fx import Unfused

__all__ = ["Mode", "Prepared", "float_modules", "freeze_batch_norm", "prepare_model"]


def float_modules(network: nn.Module) -> list[str]:
    """Names of the submodules kept in float in a prepared or converted network (skipped or shared)."""
    prefix = "module." if isinstance(network, EagerQATWrapper) else ""
    return [
        name.removeprefix(prefix)
        for name, module in network.named_modules()
        if isinstance(module, (Unfused, FloatIsland))
    ]


def freeze_batch_norm(network: nn.Module) -> list[nn.Module]:
    """Freeze the BatchNorm statistics of a QAT network of any engine (see :func:`ao.freeze_bn_stats`).

    Returns the modules to hold in eval mode while training (:func:`ao.hold_eval`): none for the PT2E engine,
    whose graph keeps the switch itself.
    """
    if pt2e.is_exported(network):
        network.freeze_bn()
        return []
    return ao.freeze_bn_stats(network)


def prepare_model(
    network: nn.Module,
    backend: str,
    mode: Mode,
    skip: Sequence[str],
    example_inputs: tuple[Any, ...],
    qat: bool = True,
    relu6_to_relu: bool = False,
    kept: dict[str, str] | None = None,
    needs: Needs | None = None,
) -> Prepared:
    """Fuse and insert fake-quant into ``network`` for ``backend`` with the engine of ``mode``.

    ``kept``: the layers to keep float for this CPU's int8 kernels (name -> why), decided before (by rank 0 of a
    DDP job, or by the run that wrote a checkpoint, on its CPU); ``None``: measured here
    (:func:`~.edits.kept_float`). The graph depends on it, so a checkpoint keeps it.

    With ``qat=False`` the network is prepared for post-training quantization instead (observers, eval mode):
    the PTQ baseline of the report. ``relu6_to_relu`` first applies :func:`~.edits.replace_relu6` (outside ``skip``).
    ``mode="auto"`` takes the PT2E engine when torch.fx cannot trace the network, and eager when ``torch.export``
    cannot capture it either or PT2E cannot serve ``needs`` (formats the user named, dynamic activations, the
    accuracy-budget search: :func:`~.engines.prepare`); any other failure of an engine (a bug in its passes, say) is
    raised, with the network as it was given to the engine.

    Raises:
        RuntimeError: when ``mode="fx"`` and the network cannot be symbolically traced, or ``mode="pt2e"`` and
            ``torch.export`` cannot capture it.
    """
    edits.check_skip(network, skip)
    folded = edits.fold_parametrizations(network, skip)
    replaced = edits.replace_relu6(network, skip) if relu6_to_relu else 0
    edits.linears_from_conv1d(network, skip)  # the same function, in layers the quantizers take
    if kept is None:  # before fusion: found by the layers' own types
        kept = edits.kept_float(network, backend, skip)
    said = edits.kept_float_warning(kept, backend)
    depthwise = sum(
        ao.is_depthwise(m) for n, m in network.named_modules() if not any(edits.within(n, s) for s in [*skip, *kept])
    )
    if depthwise and ao.depthwise_saturation(backend):
        said.append(ao.depthwise_warning(backend, depthwise))
    zeros = edits.nudge_zero_batch_norm_weights(network, skip) if qat else 0
    if zeros:
        said.append(
            f"QAT: {zeros} BatchNorm weights were exactly 0 (zero_init_residual / zero_init_last) and are now "
            f"{edits.ZERO_BN_WEIGHT}: torch's fused Conv-BN QAT divides by them (NaN otherwise)."
        )
    network.train(qat)
    settings = Preparation(backend, list(skip), example_inputs, qat, relu6_to_relu, needs or Needs())
    with ao.engine(backend):
        prepared = engines.prepare(mode, network, settings, kept)
    prepared.relu6_replaced, prepared.folded, prepared.kernels = replaced, folded, dict(kept)
    prepared.warnings = said + prepared.warnings
    return prepared
