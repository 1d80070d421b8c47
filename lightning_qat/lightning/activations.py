"""Static or dynamic int8 activations: chosen in ``setup`` by timing both artifacts, so QAT trains for what ships.

Static int8 quantizes every activation with a scale QAT calibrates; dynamic int8 quantizes each Linear's input per
batch at run time and runs the rest in float. For a dynamic artifact, QAT trains with weight fake-quant only (the
activation fake-quant is switched off, its observers keep observing), so the network learns the function it will
compute; deciding at the end of fit would ship a function QAT never trained.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_qat.export.torchscript import to_torchscript
from lightning_qat.lightning.settings import Activations
from lightning_qat.lightning.state import QATState
from lightning_qat.quantization import ao
from lightning_qat.quantization.dynamic import LINEAR_HEAVY, linear_share, to_dynamic
from lightning_qat.quantization.measure import measure_latency


def choose(
    probe: nn.Module,
    static: nn.Module,
    backend: str,
    example_inputs: tuple[Any, ...],
    wanted: Activations,
    repeats: int = 20,
) -> tuple[Literal["static", "dynamic"], dict[str, float]]:
    """The activations the artifact will use, and the milliseconds timed on ``example_inputs`` (empty: not timed).

    ``probe``: a throw-away copy of the QAT network whose observers have seen the example (the preflight's);
    ``static``: its static int8 conversion. ``"auto"`` times both candidates only for Linear-heavy networks
    (:data:`LINEAR_HEAVY` of the multiply-accumulates in Linears: transformers); a network without a Linear is static
    whatever ``wanted`` says.
    """
    if wanted == "static" or not any(ao.dynamic_linear_type(m) for m in probe.modules()):
        return "static", {}
    if wanted == "dynamic":
        return "dynamic", {}
    if linear_share(probe, example_inputs) < LINEAR_HEAVY:
        return "static", {}
    candidates: dict[str, nn.Module] = {
        "static": to_torchscript(static, backend, example_inputs),
        "dynamic": to_torchscript(to_dynamic(probe), backend, example_inputs),
    }
    ms = measure_latency(candidates, example_inputs, backend, repeats=repeats)
    return ("dynamic" if ms["dynamic"] < ms["static"] else "static"), ms


def describe(chosen: str, ms: dict[str, float]) -> str:
    """The choice in one line, for the set-up log."""
    other = "static" if chosen == "dynamic" else "dynamic"
    timed = f" ({ms[chosen]:.3g} ms against {ms[other]:.3g} ms for {other} on the example input)" if ms else ""
    if chosen == "dynamic":
        return (
            f"QAT: the int8 artifact will quantize activations dynamically{timed}: Linears in int8, activations "
            "quantized per batch at run time, the rest in float; QAT trains for it."
        )
    return f"QAT: the int8 artifact will quantize activations statically{timed}."


def decide(
    trainer: pl.Trainer,
    state: QATState,
    probe: nn.Module,
    quantized: nn.Module,
    backend: str,
    wanted: Activations,
    repeats: int,
) -> tuple[Literal["static", "dynamic"], dict[str, float]]:
    """:func:`choose` on rank 0 for every rank, said once, and set on ``state``'s network for QAT to train.

    ``probe`` and ``quantized``: the preflight's calibrated copy of the prepared network and its int8 conversion.
    An engine that fixes them at capture (PT2E) keeps what it captured; one without dynamic activations, static.
    """
    prepared = state.prepared
    assert prepared is not None
    if prepared.activations is not None or not prepared.engine.dynamic:
        fixed: Literal["static", "dynamic"] = "dynamic" if prepared.activations == "dynamic" else "static"
        if fixed == "dynamic":
            rank_zero_info(describe(fixed, {}))
        return fixed, {}
    choice = choose(probe, quantized, backend, state.example_inputs, wanted, repeats)
    if trainer.world_size > 1:
        choice = trainer.strategy.broadcast(choice, src=0)
    if choice[0] == "dynamic" or choice[1]:
        rank_zero_info(describe(*choice))
    ao.set_activation_fake_quant(prepared.module, choice[0] == "static")
    return choice
