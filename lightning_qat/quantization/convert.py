"""From the trained QAT network to a real int8 CPU network: always on a copy, checked on an example batch."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch
from torch import nn

from lightning_qat.exceptions import ConversionError, first_line
from lightning_qat.quantization import ao, engines
from lightning_qat.quantization.copies import cpu_eval_copy
from lightning_qat.quantization.engines import Engine
from lightning_qat.quantization.inputs import cpu_inputs


def freeze_for_inference(network: nn.Module) -> None:
    """Stop observers from updating so a QAT model can be evaluated without moving its quantization parameters."""
    ao.set_observers(network, False)


def to_int8(
    prepared: nn.Module,
    engine: Engine | str,
    backend: str,
    example_inputs: tuple[Any, ...],
    float_nodes: Collection[str] = (),
    dynamic: bool = False,
) -> nn.Module:
    """Convert a CPU copy of the QAT model ``prepared`` to int8 and check that it runs on ``example_inputs``.

    ``engine``: the engine that prepared it (or its name). ``float_nodes``: graph nodes kept float
    (:func:`~lightning_qat.quantization.fallback.float_nodes`), for an engine that is ``searchable``; with ``dynamic``
    (the dynamic int8 artifact, :meth:`~.engines.Engine.to_dynamic`), the layers kept float. The PT2E engine
    returns torchao's quantize / dequantize graph (int8 arithmetic simulated in float until inductor compiles it:
    :mod:`lightning_qat.export.aoti`).

    Raises:
        ConversionError: if an observer never saw data, or conversion or the first int8 forward pass fails.
            ``prepared`` is left as it was.
    """
    engine = engines.get(engine) if isinstance(engine, str) else engine
    never = ao.uncalibrated(prepared)
    if never:
        named = ", ".join(never[:4]) + (", ..." if len(never) > 4 else "")
        raise ConversionError(
            f"{len(never)} fake-quant observers never saw data ({named}): their scales are the initial 1.0 and the "
            "int8 model would compute nothing like the float one. Train "
            "at least one step first (max_epochs=0, or a run stopped before its first training step, calibrates "
            "nothing), or `skip=` a branch the training forward never takes. The QAT model is unchanged."
        )
    model = cpu_eval_copy(prepared)
    inputs = cpu_inputs(example_inputs)
    with ao.engine(backend), ao.quiet():
        try:
            quantized = engine.to_dynamic(model, float_nodes) if dynamic else engine.convert(model, float_nodes)
        except Exception as err:
            raise ConversionError(
                f"int8 conversion ({engine.name} mode, backend {backend!r}) failed: {first_line(err)}. "
                "The trained QAT model is unchanged."
            ) from err
        try:
            with torch.no_grad():
                quantized(*inputs)
        except Exception as err:
            raise ConversionError(
                f"the int8 model ({engine.name} mode) fails on an example batch: {first_line(err)}."
                f"{engine.conversion_hint} The trained QAT model is unchanged."
            ) from err
    return quantized
