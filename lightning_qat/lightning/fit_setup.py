"""What ``setup("fit")`` does to the network, in order: checks, preparation, preflight, the activations' choice.

Everything here runs before the optimizers exist and before DDP wraps the model, so a failure stops the run before
its first training step, and a second preparation (for the activations chosen) costs no trained weight.
"""

from __future__ import annotations

import copy
import dataclasses
from functools import partial
from typing import TYPE_CHECKING, Any, cast

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_qat.lightning import activations as activation_choice
from lightning_qat.lightning import example_input, peers, preflight, speed
from lightning_qat.lightning.evaluate import eval_data
from lightning_qat.lightning.install import decide_kernels, install
from lightning_qat.quantization.engines import Mode, Prepared
from lightning_qat.quantization.prepare import prepare_model

if TYPE_CHECKING:
    from lightning_qat.lightning.callback import QATCallback


def prepare_for_fit(qat: QATCallback, trainer: pl.Trainer, pl_module: pl.LightningModule, network: nn.Module) -> None:
    """Check the run, prepare ``network`` inside ``pl_module``, run the preflight and choose the activations.

    An engine that captures the activations into its graph (PT2E) and was asked for ``"auto"`` captured static ones:
    when dynamic ones are chosen, the float network is prepared and checked again for them.
    """
    state, target = qat.state, qat.state.target
    assert target is not None
    network = preflight.check_fit(trainer, pl_module, target, network, qat.evaluate)
    state.example_inputs = example_input.example_inputs(trainer, pl_module)
    # the checked copy is the float baseline (an eval forward pass leaves a float network as it was)
    state.float_network = preflight.check_example(network, state.example_inputs, target)
    kernels = decide_kernels(trainer, network, qat.backend, qat.skip)
    names = peers.module_names(pl_module)

    def prepare(network: nn.Module, mode: Mode, dynamic: bool, kernels: dict[str, str]) -> preflight.Checked:
        prepared = install_network(qat, pl_module, network, mode, kernels, dynamic)
        peers.retarget_pruning(trainer, pl_module, target, prepared, names)
        data = eval_data(trainer, qat.evaluate)
        return preflight.run_preflight(
            pl_module, state, qat.backend, qat.evaluate, data, qat.export, qat.monitor, dynamic
        )

    checked = prepare(network, qat.engine, qat.activations == "dynamic", kernels)
    assert state.prepared is not None
    mode, captured = cast(Mode, state.prepared.mode), state.prepared.activations
    capture = partial(_capture, qat, state.float_network, mode, kernels, True)
    wanted = qat.activations
    if qat.needs.search and not state.prepared.engine.can_search(True):
        wanted = "static"  # the accuracy-budget search needs quantizers to drop: static activations on this engine
    state.activations, state.activation_ms = activation_choice.decide(
        trainer, state, checked, qat.backend, wanted, qat.latency_repeats, capture
    )
    if captured not in (None, state.activations):  # captured for the other activations: again, for the chosen
        prepare(copy.deepcopy(state.float_network), mode, state.activations == "dynamic", kernels)
    # timed on a resumed run too (setup cannot know it), whose checkpoint's choice then wins (prepare_as_saved)
    if qat.keep_slow_float and state.activations == "static":
        again = partial(_capture, qat, state.float_network, mode, dynamic=False)
        state.speed = speed.decide(
            trainer, state.prepared, state.float_network, checked.quantized, checked.scripted, again, qat.backend,
            state.example_inputs,
        )  # fmt: skip
        if state.speed.kept:
            prepare(copy.deepcopy(state.float_network), mode, False, kernels | state.speed.kept)


def install_network(
    qat: QATCallback, pl_module: pl.LightningModule, network: nn.Module, mode: Mode, kernels: Any, dynamic: bool
) -> Prepared:
    """Prepare ``network`` with ``qat``'s settings in ``mode`` and set it in ``pl_module`` (:func:`.install`).

    ``kernels``: the layers kept float for the int8 kernels, decided before; ``dynamic``: for dynamic int8
    activations (an engine that captures them into its graph needs to know).
    """
    state = qat.state
    assert state.target is not None
    needs = dataclasses.replace(qat.needs, dynamic=dynamic)
    state.prepared = install(
        pl_module, state.target, network, qat.backend, mode, qat.skip, state.example_inputs, qat.relu6_to_relu,
        kernels, needs,
    )  # fmt: skip
    if qat.export and not qat.needs.formats:  # formats not named: the artifact of the engine "auto" took
        qat.export = [state.prepared.engine.formats[0]]  # type: ignore[list-item]
    qat.freezing.reset()
    return state.prepared


def _capture(qat: QATCallback, float_network: nn.Module, mode: Mode, kernels: Any, dynamic: bool) -> Prepared:
    """A copy of ``float_network`` prepared as :func:`install_network` would (``dynamic`` activations), not set."""
    needs = dataclasses.replace(qat.needs, dynamic=dynamic)
    return prepare_model(
        copy.deepcopy(float_network), qat.backend, mode, qat.skip, qat.state.example_inputs,
        relu6_to_relu=qat.relu6_to_relu, kept=kernels, needs=needs,
    )  # fmt: skip


def prepare_as_saved(
    qat: QATCallback, pl_module: pl.LightningModule, mode: Mode, kernels: dict[str, str] | None, dynamic: bool
) -> None:
    """On resume, prepare the float network again when the checkpoint's run prepared its graph otherwise.

    ``kernels``: the layers that run kept float for its CPU's int8 kernels (``None``: an older checkpoint, which did
    not say: this run's are kept); ``dynamic``: whether it trained for dynamic activations, which an engine that
    captures them (PT2E) has in its graph. Another machine times both otherwise, so the checkpoint's decisions win.
    """
    prepared, float_network = qat.state.prepared, qat.state.float_network
    assert prepared is not None
    if float_network is None:
        return
    kernels = prepared.kernels if kernels is None else kernels
    activations = "dynamic" if dynamic else "static"
    why = []
    if kernels != prepared.kernels:
        why.append(f"keeping {sorted(kernels)} float for its CPU's int8 kernels")
    if prepared.activations not in (None, activations):
        why.append(f"capturing {activations} int8 activations")
    if why:
        rank_zero_info(f"QAT: prepared again as the checkpoint's run was, {' and '.join(why)}.")
        install_network(qat, pl_module, copy.deepcopy(float_network), mode, kernels, dynamic)
