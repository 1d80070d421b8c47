"""torch.ao's prepare / fuse / convert calls, eager and FX, inside :func:`~.quiet.quiet`."""

from __future__ import annotations

import copy
from collections.abc import Collection, Sequence
from typing import Any

import torch
from torch import nn

from lightning_qat.quantization.ao.api import (
    PrepareCustomConfig,
    QConfig,
    QConfigMapping,
    _convert_fx,
    _eager_convert,
    _eager_prepare,
    _eager_prepare_qat,
    _fuse_modules,
    _fuse_modules_qat,
    _prepare_ptq_fx,
    _prepare_qat_fx,
)
from lightning_qat.quantization.ao.conv_bn import fold_frozen_batch_norm
from lightning_qat.quantization.ao.quiet import quiet


def prepare_fx(
    module: nn.Module,
    mapping: QConfigMapping,
    example_inputs: tuple[Any, ...],
    qat: bool = True,
    leaf_classes: Sequence[type[nn.Module]] = (),
) -> torch.fx.GraphModule:
    """Symbolically trace, fuse and insert fake-quant (QAT) or observers (post-training), FX graph mode.

    ``leaf_classes`` are not traced into: they stay modules (in float), called as such.
    """
    config = PrepareCustomConfig().set_non_traceable_module_classes(list(leaf_classes))
    with quiet():
        prepare = _prepare_qat_fx if qat else _prepare_ptq_fx
        prepared = prepare(module, mapping, example_inputs=example_inputs, prepare_custom_config=config)
    fold_frozen_batch_norm(prepared)
    return prepared


def prepare_eager(module: nn.Module, qat: bool = True) -> nn.Module:
    """Swap eager modules with a ``qconfig`` for their QAT versions (or add observers), in place."""
    with quiet():
        prepared = _eager_prepare_qat(module, inplace=True) if qat else _eager_prepare(module, inplace=True)
    fold_frozen_batch_norm(prepared)
    return prepared


def fuse_modules(module: nn.Module, groups: list[list[str]], qat: bool = True) -> nn.Module:
    """Fuse each group of module names (Conv+BN(+ReLU), Linear(+ReLU)) in place."""
    with quiet():
        if qat:
            return _fuse_modules_qat(module, groups, inplace=True)
        return _fuse_modules(module, groups, inplace=True)


def convert_fx(module: nn.Module, float_nodes: Collection[str] = ()) -> torch.fx.GraphModule:
    """FX-prepared QAT model -> int8 model; the graph nodes named in ``float_nodes`` stay float.

    A float node's QAT layer becomes its float form (BatchNorm folded); a fake-quant between float nodes only (its
    producer and every user) disappears, one with an int8 side becomes a quantize / dequantize. ``module`` is changed.

    Raises:
        TypeError: if ``module`` is not an FX-prepared ``GraphModule``.
    """
    if not isinstance(module, torch.fx.GraphModule):
        raise TypeError(f"convert_fx needs an FX-prepared GraphModule, got {type(module).__name__}.")
    if float_nodes:  # torch's convert reads each node's qconfig from what prepare recorded; None keeps it float
        attrs = copy.copy(module.meta["_observed_graph_module_attrs"])
        attrs.node_name_to_qconfig = {
            name: None if name in float_nodes else config for name, config in attrs.node_name_to_qconfig.items()
        }
        module.meta["_observed_graph_module_attrs"] = attrs
    with quiet():
        return _convert_fx(module)


def qconfig_of(module: nn.Module) -> QConfig | None:
    """The ``qconfig`` eager mode reads from ``module`` (``None``: float, or none set)."""
    qconfig = getattr(module, "qconfig", None)
    return qconfig if isinstance(qconfig, QConfig) else None


def set_qconfig(module: nn.Module, qconfig: QConfig | None) -> None:
    """Give ``module`` (and, through eager ``prepare``, its children) the ``qconfig`` eager mode reads; None: float."""
    module.qconfig = qconfig  # type: ignore[assignment]  # torch.ao reads this attribute


def convert_eager(module: nn.Module) -> nn.Module:
    """Eager-prepared QAT model -> int8 model, in place."""
    with quiet():
        return _eager_convert(module, inplace=True)
