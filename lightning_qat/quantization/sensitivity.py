"""Per-layer quantization error of a QAT network: the SQNR of each quantized layer against its float computation.

For each layer, on the same (already quantized) input it receives in the network: the float layer (its weight
fake-quant off) against the quantized one (weight fake-quant on, then its output quantizer). Per output channel, the
error's energy over the float output's, averaged over channels, in dB (40 dB: a 1% error): a per-tensor quantizer
stretched by a few channels of a hundredfold range flattens the others, which an energy ratio over the whole tensor
(dominated by those few channels) would not show. The lowest are where int8 loses accuracy, ranked first for keeping
float by the accuracy-budget fallback.

A PT2E network (torchao's captured graph) has no layer modules to hook: in a copy of the graph, a probe module compares
each convolution / linear call with the same call on its float weight (the weight fake-quant's input), and another
each of its output quantizers (after the ops fused into the layer) with its input; the layer's SQNR is the lower.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from lightning_qat.quantization import ao
from lightning_qat.quantization.convert import cpu_eval_copy
from lightning_qat.quantization.exported import ExportedQAT
from lightning_qat.quantization.fallback import (
    layer_calls,
    measured_quantizers,
    output_calls,
    output_quantizers,
    quantized_layers,
)
from lightning_qat.quantization.inputs import cpu_inputs

_OUTPUT = " (output quantizer)"  # the key of a captured layer's output quantizers' sums
_CALL = " (call of shape) "  # the key of an activation quantizer's sums, per input shape
MAX_DB = 100.0  # a layer computing exactly its float output (an SQNR of infinity) is reported as this


def layer_sqnr(network: nn.Module, batches: Iterable[tuple[Any, ...]], quantizers: bool = False) -> dict[str, float]:
    """The SQNR (dB) of every quantized layer of the QAT ``network`` over ``batches`` of its inputs, network order.

    Runs on a CPU copy with observers off: ``network`` and its quantization parameters are not changed.
    ``quantizers``: then of its activation quantizers of their own (see :class:`LayerSQNR`).
    """
    model = cpu_eval_copy(network)
    ao.set_observers(model, False)
    with LayerSQNR(model, quantizers=quantizers) as meter, torch.no_grad(), ao.quiet():
        for inputs in batches:
            model(*cpu_inputs(inputs))
    return meter.result()


class LayerSQNR:
    """Measures :func:`layer_sqnr` while ``network`` runs (``with LayerSQNR(net) as meter: ...; meter.result()``).

    For the network's inputs as a LightningModule feeds them: run its evaluation loop inside the ``with``. The first
    ``calls`` forward passes of ``network`` are measured (``None``: all). ``network`` must not observe (eval copy with
    observers off): the extra forward passes of each layer would move its quantization parameters. ``quantizers``:
    also each activation quantizer of its own (:func:`~lightning_qat.quantization.fallback.measured_quantizers`),
    its output against its input, by its name.
    """

    def __init__(self, network: nn.Module, calls: int | None = None, quantizers: bool = False) -> None:
        self.network = network
        self.calls = calls
        self.quantizers = measured_quantizers(network) if quantizers else {}
        self._seen = 0
        self._sums: dict[str, list[torch.Tensor]] = {}
        self._handles: list[Any] = []
        self._order: list[str] = []

    def __enter__(self) -> LayerSQNR:
        if isinstance(self.network, ExportedQAT):  # rewrites the graph of the copy it was given (see the module)
            self._order = _probe(self.network.exported, self._sums, self._measuring)
        else:
            self._order = quantized_layers(self.network)
            outputs = output_quantizers(self.network)
            for name in self._order:
                hook = _accumulate(name, outputs.get(name), self._sums, self._measuring)
                self._handles.append(self.network.get_submodule(name).register_forward_hook(hook))
        graph = self.network.exported if isinstance(self.network, ExportedQAT) else self.network
        for name in {name for names in self.quantizers.values() for name in names}:
            self._handles.append(graph.get_submodule(name).register_forward_hook(self._compare(name)))
        self._handles.append(self.network.register_forward_pre_hook(self._count))
        return self

    def _compare(self, name: str) -> Any:
        def hook(_quantizer: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            if self._measuring() and isinstance(out, torch.Tensor) and out.is_floating_point():
                # a shared quantizer's calls (a cat's inputs) differ in channels: summed apart, the lowest counts
                _add(self._sums, f"{name}{_CALL}{tuple(args[0].shape[1:])}", args[0], out, args[0].dim() > 3)

        return hook

    def __exit__(self, *_: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _count(self, *_: Any) -> None:
        self._seen += 1

    def _measuring(self) -> bool:
        return self.calls is None or self._seen <= self.calls

    def result(self) -> dict[str, float]:
        """SQNR (dB) per quantized layer that ran, in network order, then per activation quantizer measured."""
        found = {name: _db(*self._sums[name]) for name in self._order if name in self._sums}
        for name in found:  # a captured layer's output quantizers, measured apart: the lower counts
            if f"{name}{_OUTPUT}" in self._sums:
                found[name] = min(found[name], _db(*self._sums[f"{name}{_OUTPUT}"]))
        each: dict[str, float] = {}  # per fake-quant module: its calls' lowest
        for key, sums in self._sums.items():
            if _CALL in key:
                name = key.split(_CALL)[0]
                each[name] = min(each.get(name, MAX_DB), _db(*sums))
        for key, names in self.quantizers.items():
            if any(name in each for name in names):
                found[key] = min(each.get(name, MAX_DB) for name in names)
        return found


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
        _add(sums, name, reference, quantized, isinstance(layer, nn.modules.conv._ConvNd))

    return hook


def _add(sums: dict[str, list[torch.Tensor]], name: str, reference: Any, quantized: Any, conv: bool) -> None:
    """Add one batch's per-channel signal and error energy of layer ``name`` to ``sums``."""
    channel = 1 if conv and reference.dim() > 2 else reference.dim() - 1  # convolutions: N, C, ...; else ..., C
    dims = [d for d in range(reference.dim()) if d != channel]
    signal = reference.detach().double().pow(2).sum(dims)
    noise = (reference.detach().double() - quantized.detach().double()).pow(2).sum(dims)
    if name in sums:
        sums[name][0] += signal
        sums[name][1] += noise
    else:
        sums[name] = [signal, noise]


class _Probe(nn.Module):
    """In a captured graph, after a layer call: passes its output on, measured against the float-weight call's."""

    def __init__(self, name: str, conv: bool, sums: dict[str, list[torch.Tensor]], measuring: Any) -> None:
        super().__init__()
        self.name, self.conv, self.sums, self.measuring = name, conv, sums, measuring

    def forward(self, quantized: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        if self.measuring() and reference.is_floating_point():
            _add(self.sums, self.name, reference, quantized, self.conv)
        return quantized


def _probe(graph_module: torch.fx.GraphModule, sums: dict[str, list[torch.Tensor]], measuring: Any) -> list[str]:
    """Put a :class:`_Probe` after each layer call of a captured graph, in place; returns the layers in order."""
    graph = graph_module.graph
    calls = layer_calls(graph_module)
    outputs = output_calls(graph_module)  # before the probes cut the walk
    for index, (name, node) in enumerate(calls.items()):
        weight, layer = node.args[1], node.target
        assert isinstance(weight, torch.fx.Node)
        assert callable(layer)
        with graph.inserting_after(node):
            reference = graph.call_function(layer, (node.args[0], weight.args[0], *node.args[2:]), node.kwargs)
        target = f"sqnr_probe_{index}"
        graph_module.add_submodule(target, _Probe(name, "conv" in str(node.target), sums, measuring))
        with graph.inserting_after(reference):
            probe = graph.call_module(target, (node, reference))
        node.replace_all_uses_with(probe, delete_user_cb=_other_than(probe))
        for count, quantizer in enumerate(outputs[name]):
            target = f"sqnr_probe_{index}_output_{count}"
            graph_module.add_submodule(target, _Probe(f"{name}{_OUTPUT}", True, sums, measuring))
            with graph.inserting_after(quantizer):
                probe = graph.call_module(target, (quantizer, quantizer.args[0]))
            quantizer.replace_all_uses_with(probe, delete_user_cb=_other_than(probe))
    graph_module.recompile()
    return list(calls)


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


def _other_than(probe: torch.fx.Node) -> Callable[[torch.fx.Node], bool]:
    """For ``replace_all_uses_with``: every user but the probe itself (which reads the node it replaces)."""

    def other(user: torch.fx.Node) -> bool:
        return user is not probe

    return other
