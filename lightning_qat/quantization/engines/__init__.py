"""The engines: FX, eager, PT2E and XNNPACK, each an :class:`Engine` object the layers above ask (no branch on a name).

``"auto"`` (the callback's ``engine=``, :func:`~lightning_qat.quantization.prepare.prepare_model`'s ``mode``) is not
an engine: :func:`prepare` tries the engines of the backend (:func:`candidates`: :data:`AUTO` first, then each of
:data:`FALLBACKS`) that serve the run, each for what the one before cannot take.
"""

from typing import Literal

from torch import nn

from lightning_qat.exceptions import NotTraceable
from lightning_qat.quantization.engines.base import Engine, Needs, Preparation, Prepared, count_fused
from lightning_qat.quantization.engines.eager import Eager
from lightning_qat.quantization.engines.fx import FX
from lightning_qat.quantization.engines.pt2e import PT2E
from lightning_qat.quantization.engines.xnnpack import XNNPACK

Mode = Literal["auto", "fx", "eager", "pt2e", "xnnpack"]
ENGINES: dict[str, Engine] = {engine.name: engine for engine in (FX(), Eager(), PT2E(), XNNPACK())}
Engine.registry.update(ENGINES)  # what an engine's refusal of a backend names instead
AUTO = ENGINES["fx"]  # what mode="auto" tries first (and names its formats and refusals)
# What mode="auto" tries next, in order, when the engine before raises NotTraceable. PT2E captures what torch.fx
# cannot (control flow on shapes, hybrid conv/attention networks) and quantizes every op of the graph; eager, the
# last resort, takes any network but meets `x + y` on quantized tensors in many of them (docs/engines has the zoo).
# XNNPACK is the only engine of backend="xnnpack" (ExecuTorch's), and of no other backend.
FALLBACKS = (ENGINES["pt2e"], ENGINES["xnnpack"], ENGINES["eager"])
FALLBACK = FALLBACKS[-1]


def candidates(backend: str) -> list[Engine]:
    """The engines ``"auto"`` tries for ``backend``, in order."""
    return [engine for engine in (AUTO, *FALLBACKS) if backend in engine.backends]


def get(mode: str, backend: str | None = None) -> Engine:
    """The engine of ``mode`` (``"auto"``: the first of :func:`candidates` for ``backend``; :data:`AUTO` if None)."""
    if mode != "auto":
        return ENGINES[mode]
    return candidates(backend)[0] if backend is not None else AUTO


def prepare(mode: str, network: nn.Module, settings: Preparation, kept: dict[str, str]) -> Prepared:
    """Prepare ``network`` with the engine of ``mode``, or the first that takes it and serves the run (``"auto"``).

    ``"auto"`` tries :data:`AUTO`, then :data:`FALLBACKS` in order, passing over those that cannot serve the run
    (:meth:`Engine.refuses`); ``prepared.reason`` says why each one before was passed over.

    Raises:
        RuntimeError: when the engine asked for by name cannot take the network.
    """
    if mode != "auto":
        try:
            prepared = ENGINES[mode].prepare(network, settings, kept)
        except NotTraceable as err:
            skipped = f" with skip={list(settings.skip)}" if settings.skip else ""
            raise RuntimeError(f"engine={mode!r}{skipped} but {err}. Use engine='auto' or engine='eager'.") from err
        prepared.reason = "requested"
        return prepared
    tried: list[str] = []
    *first, last = candidates(settings.backend)
    for engine in (*first, last):
        refused = engine.refuses(settings) if engine is not last else ""  # the last one says why in its own error
        if refused:
            tried.append(f"{engine.name}: {refused}")
            continue
        try:
            prepared = engine.prepare(network, settings, kept)
        except NotTraceable as err:
            if engine is last:
                raise
            tried.append(f"{engine.name}: {err}")
            continue
        if tried:
            prepared.reason = "; ".join(tried)
        elif first:
            prepared.reason = "the network is symbolically traceable"
        else:
            prepared.reason = f"the only engine of backend={settings.backend!r}"
        return prepared
    raise AssertionError("the last candidate returns or raises")


def of_network(network: nn.Module) -> Engine:
    """The engine that prepared the already QAT-prepared ``network`` (a model from ``load_qat_checkpoint``)."""
    return next((e for e in ENGINES.values() if e is not FALLBACK and e.owns(network)), FALLBACK)


def writing(fmt: str) -> list[str]:
    """The modes whose engine writes the artifact format ``fmt``."""
    return [name for name, engine in ENGINES.items() if fmt in engine.formats]


__all__ = [
    "AUTO",
    "ENGINES",
    "FALLBACK",
    "FALLBACKS",
    "FX",
    "PT2E",
    "XNNPACK",
    "Eager",
    "Engine",
    "Mode",
    "Needs",
    "Preparation",
    "Prepared",
    "candidates",
    "count_fused",
    "get",
    "of_network",
    "prepare",
    "writing",
]
