"""Dynamic int8: the QAT network's Linears with int8 weights on the grids QAT trained, activations quantized per batch.

For Linear-heavy networks (transformers) at small batches this can beat static int8, which quantizes and
dequantizes around every op without an int8 kernel (LayerNorm, softmax attention, GELU). Everything but the Linears
runs in float (Embeddings keep their int8 weights): convolutions with their BatchNorm folded and their trained weights,
activations unquantized.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch
from torch import nn

from lightning_qat.quantization import ao, compat
from lightning_qat.quantization.copies import cpu_eval_copy
from lightning_qat.quantization.inputs import cpu_inputs

LINEAR_HEAVY = 0.5  # the share of the multiply-accumulates in Linears from which dynamic int8 is a candidate


def linear_share(network: nn.Module, example_inputs: tuple[Any, ...]) -> float:
    """The share of a QAT network's multiply-accumulates in its fake-quantized layers that Linears do.

    Of a float network (no layer fake-quantized; an engine that captures a graph is asked before it does): of all its
    convolutions and Linears. Counted by running ``network`` (a CPU copy in eval mode: its observers observe) once on
    ``example_inputs``: a layer does ``weight.numel()`` per output channel position.
    """
    macs = {"linear": 0, "all": 0}

    def count(module: nn.Module, _args: Any, out: Any) -> None:
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and isinstance(out, torch.Tensor):  # Embeddings are not hooked: lookups
            n = weight.numel() * out.numel() // max(weight.shape[0], 1)
            macs["all"] += n
            macs["linear"] += n if module in linears else 0

    layers = [m for m in network.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    quantized = [m for m in layers if ao.weight_fake_quant(m) is not None]
    # a QAT network's Linears that dynamic int8 takes (not a fused Linear-BN), or a float network's
    linears = (
        {m for m in quantized if ao.dynamic_linear_type(m)}
        if quantized
        else {m for m in layers if isinstance(m, nn.Linear)}
    )
    handles = [m.register_forward_hook(count) for m in quantized or layers]
    try:
        with torch.no_grad(), ao.quiet():
            network(*cpu_inputs(example_inputs))
    finally:
        for handle in handles:
            handle.remove()
    return macs["linear"] / macs["all"] if macs["all"] else 0.0


def to_dynamic(prepared: nn.Module, float_layers: Collection[str] = ()) -> nn.Module:
    """A CPU copy of the QAT network ``prepared`` with dynamic int8 Linears, every other layer float.

    ``float_layers``: QAT layers kept float too (the accuracy-budget fallback).

    Activation fake-quant modules become ``nn.Identity``; QAT Linears torch's dynamic int8 Linear
    (:func:`ao.dynamic_linear`), Embeddings its weight-only int8 Embedding (:func:`ao.int8_embedding`: float out as
    before); other QAT layers their float form (:func:`ao.to_float`). ``prepared`` is not changed.
    """
    model = cpu_eval_copy(prepared)
    modules = dict(model.named_modules(remove_duplicate=False))  # FX registers a shared fake-quant under two names
    layers = [name for name, module in modules.items() if ao.is_qat_module(module)]
    for name, module in modules.items():
        if not name or any(name.startswith(f"{layer}.") for layer in layers):
            continue  # inside a QAT layer, replaced whole below
        if ao.is_qat_module(module):
            quantized = None if name in float_layers else ao.dynamic_linear(module) or ao.int8_embedding(module)
            int8 = quantized or ao.to_float(module)
            compat.set_submodule(model, name, int8)
        elif ao.is_fake_quant(module):
            compat.set_submodule(model, name, nn.Identity())
        elif name not in float_layers and (embedding := ao.int8_embedding(module)) is not None:
            compat.set_submodule(model, name, embedding)  # eager mode's (not a QAT module)
    return model
