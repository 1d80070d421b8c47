"""Static or dynamic int8 activations: chosen in ``setup`` by timing both artifacts, so QAT trains for what ships.

Static int8 quantizes every activation with a scale QAT calibrates; dynamic int8 quantizes each Linear's input per
batch at run time and runs the rest in float. For a dynamic artifact, QAT trains with weight fake-quant only (the
activation fake-quant is switched off, its observers keep observing), so the network learns the function it will
compute; deciding at the end of fit would ship a function QAT never trained.

An engine that captures the activations into its graph (PT2E) is timed on a second capture of the float network
with dynamic activations, each candidate compiled as it ships (an AOTInductor package); when dynamic wins, the
caller captures the network again for it, before the optimizers exist.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_qat.exceptions import ConversionError
from lightning_qat.lightning.settings import Activations
from lightning_qat.lightning.speed import calibrated_int8, shipped
from lightning_qat.lightning.state import QATState
from lightning_qat.quantization import ao
from lightning_qat.quantization.dynamic import LINEAR_HEAVY, linear_share, to_dynamic
from lightning_qat.quantization.engines import Prepared
from lightning_qat.quantization.measure import measure_latency

if TYPE_CHECKING:
    from lightning_qat.lightning.preflight import Checked

Choice = tuple[Literal["static", "dynamic"], dict[str, float]]
Capture = Callable[[], Prepared]  # the float network prepared again by the same engine, with dynamic activations


def choose(
    checked: Checked,
    backend: str,
    example_inputs: tuple[Any, ...],
    wanted: Activations,
    repeats: int = 20,
    capture: tuple[nn.Module, Capture] | None = None,
) -> Choice:
    """The activations the artifact will use, and the milliseconds timed on ``example_inputs`` (empty: not timed).

    ``checked``: the preflight's calibrated copy of the QAT network, its static int8 conversion and that traced
    (reused: not traced again). ``capture``: for an engine that fixes the activations at capture, the
    float network and how to capture it with dynamic ones. ``"auto"`` times both candidates only for Linear-heavy
    networks (:data:`LINEAR_HEAVY` of the multiply-accumulates in Linears: transformers); a network without a Linear
    is static whatever ``wanted`` says.
    """
    layers = capture[0] if capture else checked.probe  # a float network's Linears, or a QAT network's
    linears = any(isinstance(m, nn.Linear) if capture else ao.dynamic_linear_type(m) for m in layers.modules())
    if wanted == "static" or not linears:
        return "static", {}
    if wanted == "dynamic":
        return "dynamic", {}
    if linear_share(layers, example_inputs) < LINEAR_HEAVY:
        return "static", {}
    compiled = False
    if capture:
        rank_zero_info("QAT: timing static against dynamic int8 activations: two packages compiled (a minute).")
    with tempfile.TemporaryDirectory() as folder:
        try:
            if capture:
                prepared = capture[1]()
                compiled = prepared.engine.compiled
                dynamic = calibrated_int8(prepared, backend, example_inputs, dynamic=True)
            else:
                dynamic = to_dynamic(checked.probe)
            static = checked.scripted  # the preflight's trace: what ships
            if static is None or compiled:
                static = shipped(checked.quantized, compiled, backend, example_inputs, Path(folder) / "static")
            candidates = {"static": static}
            candidates["dynamic"] = shipped(dynamic, compiled, backend, example_inputs, Path(folder) / "dynamic")
        except ConversionError as err:  # static was checked by the preflight: it ships
            rank_zero_warn(f"QAT: dynamic int8 activations are no candidate: {err} Static ones ship.")
            return "static", {}
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
    checked: Checked,
    backend: str,
    wanted: Activations,
    repeats: int,
    capture: Capture,
) -> Choice:
    """:func:`choose` on global rank 0 for every rank, said once, and set on ``state``'s network for QAT to train.

    ``checked``: the preflight's calibrated copy of the prepared network, its int8 conversion and that traced;
    ``capture``: how the engine would prepare the float network with dynamic activations. An engine that fixes them
    at capture (PT2E) and was asked for ``"dynamic"`` keeps what it captured; with ``"auto"`` the caller captures
    again when the choice differs from :attr:`Prepared.activations`. An engine without dynamic activations: static.
    """
    prepared = state.prepared
    assert prepared is not None
    if prepared.activations == "dynamic" or not prepared.engine.dynamic:
        fixed: Literal["static", "dynamic"] = "dynamic" if prepared.activations == "dynamic" else "static"
        if fixed == "dynamic":
            rank_zero_info(describe(fixed, {}))
        return fixed, {}
    captured = None
    if prepared.activations is not None:  # captured into the graph: the float network is captured again to time
        assert state.float_network is not None
        captured = (state.float_network, capture)
    # rank 0 times for every rank: two CPUs (or two busy moments) could choose apart, and prepare other graphs
    choice: Choice = ("static", {})
    if trainer.is_global_zero:
        choice = choose(checked, backend, state.example_inputs, wanted, repeats, captured)
    if trainer.world_size > 1:
        choice = trainer.strategy.broadcast(choice, src=0)
    if choice[0] == "dynamic" or choice[1]:
        rank_zero_info(describe(*choice))
    if prepared.activations is None:
        ao.set_activation_fake_quant(prepared.module, choice[0] == "static")
    return choice
