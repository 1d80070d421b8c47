"""Layers kept float for speed, timed in ``setup`` on this CPU at the example's shapes: int8 no slower than float.

The depthwise probe (:func:`~lightning_qat.quantization.edits.kept_float`) keeps a layer float from one fixed shape;
a network can still ship slower than float when many layers are a few times slower each (timm's rexnet_100 at 32 px
on an AMX Xeon: 0.29x the float speed, depthwise convolutions 35x slower at their own shapes). So, once the network is
prepared and its preflight has converted it, the int8 network as it ships is timed against float. When int8 is slower
(and float takes :data:`FLOOR_MS` or more), every int8 layer is timed alone against its float twin, on the input it
gets (:func:`.measure.layer_times`), and two sets of layers are tried float: those slower in int8, and those that gain
less than :data:`MARGINAL` (the quantize and dequantize around a float layer can eat what a marginal int8 layer
saves). Each set is prepared, converted and timed whole beside the first; the fastest is taken when it runs in
:data:`GAIN` of the first's time or less. The whole-network timing, not the sum of layers, decides: conversions
between float and int8 layers are in it.

The set shapes the graph: rank 0 decides, every rank prepares it, and it is checkpointed with the kernels' decisions
(:attr:`Prepared.kernels`), which a resumed run honours on any CPU.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_qat.exceptions import ConversionError
from lightning_qat.export.aoti import load_pt2, save_pt2
from lightning_qat.export.torchscript import to_torchscript
from lightning_qat.lightning.report import timed_at_setup
from lightning_qat.quantization import ao
from lightning_qat.quantization.convert import cpu_eval_copy, to_int8
from lightning_qat.quantization.engines import Prepared
from lightning_qat.quantization.measure import layer_times, measure_latency

# A set kept float is taken when the int8 network with it runs in this share of the time or less (timed whole,
# interleaved): a smaller gain is within what two runs of the same network differ by on a busy 2-core machine.
GAIN = 0.9
# An int8 layer faster than float by less than this, alone, is tried float too (the second set).
MARGINAL = 1.5
# Timed passes of each network in setup (the median; 1 warm-up): the differences acted on are 10% and more, and a
# large network at the training batch takes seconds a pass.
REPEATS = 5
# A network whose float forward pass takes less (ms) on the example is not timed further: its time is mostly the
# runtime's calls, which no choice of float layers changes, and its layers' timings are within the timer's noise.
FLOOR_MS = 1.0

Prepare = Callable[[dict[str, str]], Prepared]  # the float network prepared again with these layers kept float


@dataclass
class Speed:
    """What ``setup`` timed: the example's milliseconds and the layers it keeps float for speed (name -> why).

    ``ms``: ``"float"``, ``"int8"`` (as first prepared) and, when a set was tried, ``"kept"`` (the fastest set).
    """

    ms: dict[str, float] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)


def shipped(quantized: nn.Module, compiled: bool, backend: str, inputs: tuple[Any, ...], path: Path) -> nn.Module:
    """``quantized`` as its artifact runs: a compiling engine's package (written at ``path``), else TorchScript."""
    if compiled:
        return load_pt2(save_pt2(quantized, path.with_suffix(".pt2"), inputs).path)
    return to_torchscript(quantized, backend, inputs)


def calibrated_int8(prepared: Prepared, backend: str, inputs: tuple[Any, ...], dynamic: bool = False) -> nn.Module:
    """The int8 conversion of a copy of ``prepared``'s network whose observers saw ``inputs`` once."""
    probe = cpu_eval_copy(prepared.module)
    with ao.quiet(), torch.no_grad():
        probe(*inputs)
    return to_int8(probe, prepared.engine, backend, inputs, dynamic=dynamic)


def candidates(times: dict[str, tuple[float, float]]) -> list[list[str]]:
    """The sets of layers to try float, from each int8 layer's (int8 ms, float ms) alone.

    Distinct and non-empty, and never every layer timed: an int8 network with nothing in int8 is the float one.
    """
    slower = [name for name, (int8, twin) in times.items() if int8 > twin]
    marginal = [name for name, (int8, twin) in times.items() if int8 * MARGINAL > twin]
    sets = [s for s in (slower, marginal) if s and len(s) < len(times)]
    return [s for i, s in enumerate(sets) if s not in sets[:i]]


def why(name: str, times: dict[str, tuple[float, float]]) -> str:
    """The reason a layer is kept float for speed: its times alone at the example's shape (the report says so)."""
    int8, twin = times[name]
    return f"int8 {int8:.3g} ms, float {twin:.3g} ms"


def choose(
    float_network: nn.Module,
    quantized: nn.Module,
    prepare: Prepare,
    kernels: dict[str, str],
    backend: str,
    inputs: tuple[Any, ...],
    repeats: int = REPEATS,
    scripted: nn.Module | None = None,
    prefix: str = "",
) -> Speed:
    """The layers to keep float for speed beside ``kernels`` (none when int8 is faster, or no set pays).

    ``quantized``: the prepared network's int8 conversion (the preflight's), ``scripted`` its trace if made already;
    ``prepare``: how to prepare the float network again with other layers kept float; ``prefix``: what the engine's
    int8 network puts before the float network's layer names (:attr:`.Engine.prefix`). TorchScript, what the FX and
    eager engines ship, is what is timed.
    """
    with tempfile.TemporaryDirectory() as folder:
        if scripted is None:
            scripted = shipped(quantized, False, backend, inputs, Path(folder) / "int8")
        networks = {"float": float_network, "int8": scripted}
        ms = measure_latency(networks, inputs, backend, repeats=repeats, warmup=1)
        if ms["float"] < FLOOR_MS:
            return Speed()  # its time is the runtime's calls: nothing to say, nothing to search
        if ms["int8"] <= ms["float"]:
            return Speed(ms)
        times = layer_times(quantized, float_network, inputs, backend, repeats=min(repeats, 10), prefix=prefix)
        sets = candidates(times)
        if not sets:
            return Speed(ms)
        rank_zero_info(
            f"QAT: int8 is slower than float on the example ({ms['int8']:.3g} ms against {ms['float']:.3g} ms): "
            f"timing it with {' or '.join(str(len(s)) for s in sets)} of its {len(times)} layers kept float."
        )
        for i, names in enumerate(sets):
            try:
                network = calibrated_int8(prepare(kernels | dict.fromkeys(names, "")), backend, inputs)
            except ConversionError as err:  # e.g. a Linear inside a decomposed attention: no candidate
                rank_zero_info(f"QAT: keeping those {len(names)} layers float is no candidate: {err}")
                continue
            networks[str(i)] = shipped(network, False, backend, inputs, Path(folder) / str(i))
        tried = [i for i in range(len(sets)) if str(i) in networks]
        if not tried:
            return Speed(ms)
        timed = measure_latency(networks, inputs, backend, repeats=repeats, warmup=1)  # all again, interleaved
    if timed["int8"] <= timed["float"]:  # not slower when timed again (CI: a 1 ms network on a busy machine): noise
        return Speed({"float": timed["float"], "int8": timed["int8"]})
    best = min(tried, key=lambda i: timed[str(i)])
    ms = {"float": timed["float"], "int8": timed["int8"], "kept": timed[str(best)]}
    if ms["kept"] > GAIN * ms["int8"]:
        return Speed(ms)
    costliest = sorted(sets[best], key=lambda name: times[name][1] - times[name][0])  # the report shows the first
    return Speed(ms, {name: why(name, times) for name in costliest})


def decide(
    trainer: pl.Trainer,
    prepared: Prepared,
    float_network: nn.Module,
    quantized: nn.Module,
    scripted: nn.Module | None,
    prepare: Prepare,
    backend: str,
    inputs: tuple[Any, ...],
) -> Speed:
    """:func:`choose` on global rank 0 for every rank, said once; nothing for an engine that compiles its artifact.

    Each rank timing for itself could prepare another graph (two CPUs, or two busy moments, differ). A compiled
    artifact (PT2E's package) would take a compile per candidate, a minute each: not timed here.
    """
    speed = Speed()
    if trainer.is_global_zero and not prepared.engine.compiled:
        speed = choose(
            float_network, quantized, prepare, prepared.kernels, backend, inputs,
            scripted=scripted, prefix=prepared.engine.prefix,
        )  # fmt: skip
    if trainer.world_size > 1:
        speed = trainer.strategy.broadcast(speed, src=0)
    if speed.ms:
        rank_zero_info(f"QAT: {timed_at_setup(speed.ms, len(speed.kept))}.")
    return speed
