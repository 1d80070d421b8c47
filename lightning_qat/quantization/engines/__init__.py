"""The engines: FX, eager and PT2E, each an :class:`Engine` object the layers above ask (no branch on a name).

``"auto"`` (the callback's ``engine=``, :func:`~lightning_qat.quantization.prepare.prepare_model`'s ``mode``) is not
an engine: :func:`prepare` tries :data:`AUTO` first and takes :data:`FALLBACK` for what torch.fx cannot trace.
"""

from typing import Literal

from torch import nn

from lightning_qat.exceptions import NotTraceable
from lightning_qat.quantization.engines.base import Engine, Preparation, Prepared, count_fused
from lightning_qat.quantization.engines.eager import Eager
from lightning_qat.quantization.engines.fx import FX
from lightning_qat.quantization.engines.pt2e import PT2E

Mode = Literal["auto", "fx", "eager", "pt2e"]
ENGINES: dict[str, Engine] = {engine.name: engine for engine in (FX(), Eager(), PT2E())}
AUTO = ENGINES["fx"]  # what mode="auto" tries first (and names its formats and refusals)
FALLBACK = ENGINES["eager"]  # what mode="auto" takes when AUTO raises NotTraceable


def get(mode: str) -> Engine:
    """The engine of ``mode`` (``"auto"``: :data:`AUTO`)."""
    return AUTO if mode == "auto" else ENGINES[mode]


def prepare(mode: str, network: nn.Module, settings: Preparation, kept: dict[str, str]) -> Prepared:
    """Prepare ``network`` with the engine of ``mode``; ``"auto"`` takes :data:`FALLBACK` when FX cannot trace it.

    Raises:
        RuntimeError: when the engine asked for by name cannot take the network.
    """
    engine = get(mode)
    try:
        prepared = engine.prepare(network, settings, kept)
    except NotTraceable as err:
        if mode != "auto":
            raise RuntimeError(
                f"engine={mode!r} but {type(network).__name__} cannot be symbolically traced: {err}. "
                "Use engine='auto' or engine='eager'."
            ) from err
        prepared = FALLBACK.prepare(network, settings, kept)
        prepared.reason = f"FX tracing failed ({err})"
        return prepared
    prepared.reason = "requested" if mode != "auto" else "the network is symbolically traceable"
    return prepared


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
    "FX",
    "PT2E",
    "Eager",
    "Engine",
    "Mode",
    "Preparation",
    "Prepared",
    "count_fused",
    "get",
    "of_network",
    "prepare",
    "writing",
]
