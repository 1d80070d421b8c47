"""The engines: FX, eager and PT2E, each an :class:`Engine` object the layers above ask (no branch on a name).

``"auto"`` (the callback's ``engine=``, :func:`~lightning_qat.quantization.prepare.prepare_model`'s ``mode``) is not
an engine: :func:`prepare` tries :data:`AUTO` first, then each of :data:`FALLBACKS` that serves the run, for what
the one before cannot take.
"""

from typing import Literal

from torch import nn

from lightning_qat.exceptions import NotTraceable
from lightning_qat.quantization.engines.base import Engine, Needs, Preparation, Prepared, count_fused
from lightning_qat.quantization.engines.eager import Eager
from lightning_qat.quantization.engines.fx import FX
from lightning_qat.quantization.engines.pt2e import PT2E

Mode = Literal["auto", "fx", "eager", "pt2e"]
ENGINES: dict[str, Engine] = {engine.name: engine for engine in (FX(), Eager(), PT2E())}
AUTO = ENGINES["fx"]  # what mode="auto" tries first (and names its formats and refusals)
# What mode="auto" tries next, in order, when the engine before raises NotTraceable. PT2E captures what torch.fx
# cannot (control flow on shapes, hybrid conv/attention networks) and quantizes every op of the graph; eager, the
# last resort, takes any network but meets `x + y` on quantized tensors in many of them (docs/engines has the zoo).
FALLBACKS = (ENGINES["pt2e"], ENGINES["eager"])
FALLBACK = FALLBACKS[-1]


def get(mode: str) -> Engine:
    """The engine of ``mode`` (``"auto"``: :data:`AUTO`)."""
    return AUTO if mode == "auto" else ENGINES[mode]


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
            raise RuntimeError(f"engine={mode!r} but {err}. Use engine='auto' or engine='eager'.") from err
        prepared.reason = "requested"
        return prepared
    tried: list[str] = []
    for engine in (AUTO, *FALLBACKS):
        refused = engine.refuses(settings) if engine is not FALLBACK else ""
        if refused:
            tried.append(f"{engine.name}: {refused}")
            continue
        try:
            prepared = engine.prepare(network, settings, kept)
        except NotTraceable as err:
            if engine is FALLBACK:
                raise
            tried.append(f"{engine.name}: {err}")
            continue
        prepared.reason = "; ".join(tried) if tried else "the network is symbolically traceable"
        return prepared
    raise AssertionError("FALLBACK never refuses")


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
    "Eager",
    "Engine",
    "Mode",
    "Needs",
    "Preparation",
    "Prepared",
    "count_fused",
    "get",
    "of_network",
    "prepare",
    "writing",
]
