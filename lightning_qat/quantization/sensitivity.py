"""Per-layer quantization error of a QAT network: the SQNR of each quantized layer against its float computation.

For each layer, on the same (already quantized) input it receives in the network: the float layer (its weight
fake-quant off) against the quantized one (weight fake-quant on, then its output quantizer). Per output channel, the
error's energy over the float output's, averaged over channels, in dB (40 dB: a 1% error): a per-tensor quantizer
stretched by a few channels of a hundredfold range flattens the others, which an energy ratio over the whole tensor
(dominated by those few channels) would not show. The lowest are where int8 loses accuracy, ranked first for keeping
float by the accuracy-budget fallback.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lightning_qat.quantization import ao
from lightning_qat.quantization.convert import cpu_eval_copy
from lightning_qat.quantization.fallback import output_quantizers, quantized_layers
from lightning_qat.quantization.inputs import cpu_inputs

MAX_DB = 100.0  # a layer computing exactly its float output (an SQNR of infinity) is reported as this


def layer_sqnr(network: nn.Module, batches: Iterable[tuple[Any, ...]]) -> dict[str, float]:
    """The SQNR (dB) of every quantized layer of the QAT ``network`` over ``batches`` of its inputs, network order.

    Runs on a CPU copy with observers off: ``network`` and its quantization parameters are not changed.
    """
    model = cpu_eval_copy(network)
    ao.set_observers(model, False)
    with LayerSQNR(model) as meter, torch.no_grad(), ao.quiet():
        for inputs in batches:
            model(*cpu_inputs(inputs))
    return meter.result()


class LayerSQNR:
    """Measures :func:`layer_sqnr` while ``network`` runs (``with LayerSQNR(net) as meter: ...; meter.result()``).

    For the network's inputs as a LightningModule feeds them: run its evaluation loop inside the ``with``. The first
    ``calls`` forward passes of ``network`` are measured (``None``: all). ``network`` must not observe (eval copy with
    observers off): the extra forward passes of each layer would move its quantization parameters.
    """

    def __init__(self, network: nn.Module, calls: int | None = None) -> None:
        self.network = network
        self.calls = calls
        self._seen = 0
        self._sums: dict[str, list[torch.Tensor]] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> LayerSQNR:
        outputs = output_quantizers(self.network)
        for name in quantized_layers(self.network):
            hook = _accumulate(name, outputs.get(name), self._sums, self._measuring)
            self._handles.append(self.network.get_submodule(name).register_forward_hook(hook))
        self._handles.append(self.network.register_forward_pre_hook(self._count))
        return self

    def __exit__(self, *_: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _count(self, *_: Any) -> None:
        self._seen += 1

    def _measuring(self) -> bool:
        return self.calls is None or self._seen <= self.calls

    def result(self) -> dict[str, float]:
        """SQNR (dB) per quantized layer that ran, in network order."""
        return {name: _db(*self._sums[name]) for name in quantized_layers(self.network) if name in self._sums}


def _accumulate(
    name: str, output_quantizer: nn.Module | None, sums: dict[str, list[torch.Tensor]], measuring: Any
) -> Any:
    def hook(layer: nn.Module, args: tuple[Any, ...], _out: Any) -> None:
        if not measuring():
            return
        weight = ao.weight_fake_quant(layer)
        assert weight is not None
        enabled = weight.fake_quant_enabled.clone()
        with torch.no_grad():
            quantized = layer.forward(*args)  # forward, not __call__: without the eager layer's output-quantizer hook
            weight.disable_fake_quant()
            reference = layer.forward(*args)
            weight.fake_quant_enabled.copy_(enabled)
            if not isinstance(reference, torch.Tensor) or not reference.is_floating_point():
                return
            if output_quantizer is not None:
                quantized = output_quantizer(quantized)
        conv = isinstance(layer, nn.modules.conv._ConvNd) and reference.dim() > 2
        channel = 1 if conv else reference.dim() - 1  # convolutions: N, C, ...; Linears and Embeddings: ..., C
        dims = [d for d in range(reference.dim()) if d != channel]
        signal = reference.double().pow(2).sum(dims)
        noise = (reference.double() - quantized.double()).pow(2).sum(dims)
        if name in sums:
            sums[name][0] += signal
            sums[name][1] += noise
        else:
            sums[name] = [signal, noise]

    return hook


def _db(signal: torch.Tensor, noise: torch.Tensor) -> float:
    live = signal > 0  # channels that are always 0 in float (dead ReLUs) carry no signal to lose
    if not bool(live.any()):
        return MAX_DB if not bool((noise > 0).any()) else -MAX_DB
    ratio = float((noise[live] / signal[live]).mean())
    if ratio == 0:
        return MAX_DB
    return max(-MAX_DB, min(MAX_DB, -10 * math.log10(ratio)))


def worst(sqnr: dict[str, float], count: int = 10) -> list[tuple[str, float]]:
    """The ``count`` layers with the lowest SQNR, lowest first."""
    return sorted(sqnr.items(), key=lambda item: item[1])[:count]
