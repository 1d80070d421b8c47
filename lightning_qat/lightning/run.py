"""What the end-of-fit pipeline finishes: the trained QAT network in its LightningModule, and how it was prepared."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lightning_qat.lightning.speed import Speed
from lightning_qat.quantization.engines import Mode, Prepared


@dataclass
class QATRun:
    """The QAT network the pipeline finishes, inside its LightningModule, and how it was prepared.

    ``best_checkpoint``: the path ``convert="best"`` takes the weights from (empty: none saved).
    ``loaded_from``: the checkpoint the weights were loaded from (``convert_checkpoint``, ``trainer.validate``), which
    then are the weights converted.
    """

    pl_module: Any  # the LightningModule
    target: str
    prepared: Prepared
    float_network: nn.Module
    example_inputs: tuple[Any, ...]
    mode: Mode = "auto"
    skip: list[str] = field(default_factory=list)
    relu6_to_relu: bool = False
    best_checkpoint: str = ""
    loaded_from: str | None = None
    activations: str = "static"  # what the artifact quantizes activations with, chosen in setup (activations.choose)
    activation_ms: dict[str, float] = field(default_factory=dict)  # the candidates' timing behind that choice
    speed: Speed = field(default_factory=Speed)  # the layers kept float for speed in setup, and the timing behind them
    fallback: list[str] = field(default_factory=list)  # layers a search during the fit kept float (then trained so)
    fallback_met: bool | None = None  # whether that search met the budget (None: no search ran)
    fallback_candidates: list[dict[str, Any]] = field(default_factory=list)  # what it tried
    fallback_seconds: float = 0.0  # what those searches took
