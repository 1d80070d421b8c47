"""The callback's state beside its arguments: the network QAT trains, and what its run decided.

Set in ``setup`` (a fit prepares the network; validate / test / predict of a QAT checkpoint prepare it as the
checkpoint's was), saved in checkpoints with :meth:`QATState.state_dict`, and read by the end-of-fit pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_qat.lightning import example_input
from lightning_qat.lightning.budget import FitSearch
from lightning_qat.lightning.run import QATRun
from lightning_qat.lightning.speed import Speed
from lightning_qat.quantization.convert import cpu_eval_copy
from lightning_qat.quantization.engines import Mode, Prepared


@dataclass
class QATState:
    """Where the QAT network sits, how it was prepared, the float network it started from, and its activations.

    ``loaded_from``: the checkpoint whose weights the network holds (validate / test / predict of a QAT checkpoint),
    which are then the weights converted. ``activations``: what the artifact quantizes activations with, chosen in
    ``setup("fit")`` (:mod:`~lightning_qat.lightning.activations`), timed as ``activation_ms``. ``speed``: the layers
    kept float because they were slower in int8, timed in ``setup("fit")`` (:mod:`~lightning_qat.lightning.speed`).
    """

    target: str | None = None
    prepared: Prepared | None = None
    float_network: nn.Module | None = None
    example_inputs: tuple[Any, ...] = ()
    loaded_from: str | None = None
    activations: Literal["static", "dynamic"] = "static"
    activation_ms: dict[str, float] = field(default_factory=dict)
    speed: Speed = field(default_factory=Speed)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the float weights keep the report's float row right after a resume or a convert."""
        return {
            "mode": self.prepared.mode if self.prepared else None,
            "kernels": dict(self.prepared.kernels) if self.prepared else None,
            "module": self.target,
            "float_state_dict": self.float_network.state_dict() if self.float_network is not None else None,
            "example_inputs": example_input.storable(self.example_inputs),
            "activations": self.activations,
            "activation_ms": dict(self.activation_ms),
            "speed": {"ms": dict(self.speed.ms), "kept": dict(self.speed.kept)},
        }

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Restore what a checkpoint's run decided (the preparation itself was checked and redone by the callback)."""
        # what QAT trained for (the activation fake-quant switches are buffers: they come back with the weights)
        activations = saved.get("activations", "static")
        if activations != self.activations and self.prepared is not None:
            rank_zero_info(
                f"QAT: the checkpoint's run trained for {activations} int8 activations: the artifact keeps them."
            )
        self.activations = activations
        self.activation_ms = dict(saved.get("activation_ms", {}))
        self.speed = Speed(**saved.get("speed", {}))  # its layers are in "kernels", which the preparation honoured
        float_state = saved.get("float_state_dict")
        if float_state is not None and self.float_network is not None:
            self.float_network.load_state_dict(float_state)

    def from_checkpoint(self, pl_module: Any, saved: dict[str, Any], path: str) -> nn.Module:
        """Take the example input and float network of a QAT checkpoint's run; returns the network to prepare."""
        assert self.target is not None
        self.loaded_from = path
        self.example_inputs = example_input.stored(saved) or example_input.module_example_inputs(pl_module)
        network = pl_module.get_submodule(self.target)
        self.float_network = cpu_eval_copy(network)
        return network

    def run(
        self, pl_module: Any, best: str, mode: Mode, skip: Sequence[str], relu6_to_relu: bool, budget: FitSearch
    ) -> QATRun:
        """What the end-of-fit pipeline finishes: this state in ``pl_module``, with the budget search's result."""
        assert self.target is not None
        assert self.prepared is not None
        assert self.float_network is not None
        return QATRun(
            pl_module=pl_module,
            target=self.target,
            prepared=self.prepared,
            float_network=self.float_network,
            example_inputs=self.example_inputs,
            mode=mode,
            skip=list(skip),
            relu6_to_relu=relu6_to_relu,
            best_checkpoint=best,
            loaded_from=self.loaded_from,
            activations=self.activations,
            activation_ms=dict(self.activation_ms),
            speed=self.speed,
            fallback=list(budget.fallback),
            fallback_met=budget.met,
            fallback_candidates=list(budget.candidates),
            fallback_seconds=budget.seconds,
        )
