"""The accuracy budget: the fewest layers to keep float, searched at fit end and during the fit.

:class:`BudgetSearch` is the search of one :class:`~lightning_qat.FinishPipeline` (its ``budget``): each candidate is
a real int8 model of the trained weights, evaluated with the user's ``validation_step``/``test_step`` and timed.
:class:`FitSearch` is the callback's slice of state for the search during the fit: when it runs, what it kept float,
and what it tried, saved in checkpoints so a resumed run does not search again.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_qat.exceptions import ConversionError
from lightning_qat.export.torchscript import to_torchscript
from lightning_qat.lightning.report import drop
from lightning_qat.lightning.run import QATRun
from lightning_qat.lightning.settings import FinishSettings
from lightning_qat.quantization.convert import cpu_eval_copy, freeze_for_inference
from lightning_qat.quantization.fallback import Group, float_names, groups, train_float
from lightning_qat.quantization.measure import measure_latency, serialized_size
from lightning_qat.quantization.schedule import FreezeSchedule, resolve_after
from lightning_qat.quantization.search import Candidate, SearchResult, search
from lightning_qat.quantization.sensitivity import MAX_DB


class Pipeline(Protocol):
    """What the search reads and sets of the end-of-fit pipeline (:class:`~lightning_qat.FinishPipeline`)."""

    settings: FinishSettings
    qat_run: QATRun
    trained_network: nn.Module | None
    float_groups: list[Group]
    budget: BudgetSearch

    def to_int8(self, network: nn.Module, float_groups: Sequence[Group] = ()) -> nn.Module: ...  # noqa: D102

    def evaluate(self, network: nn.Module, limit: int | None = None) -> dict[str, float]: ...  # noqa: D102

    def measure_sqnr(self, network: nn.Module) -> dict[str, float]: ...  # noqa: D102


class BudgetSearch:
    """The accuracy-budget search over the layers of one pipeline's QAT network (``on_drop="fallback"``).

    What it keeps float goes to the pipeline's ``float_groups``.
    """

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    @property
    def possible(self) -> bool:
        """Whether a missed accuracy budget starts a search (``on_drop="fallback"`` and a graph to search in)."""
        pipeline = self.pipeline
        if pipeline.settings.on_drop != "fallback":
            return False
        if pipeline.qat_run.prepared.engine.can_search(pipeline.qat_run.activations == "dynamic"):
            return True
        rank_zero_warn(
            "QAT fallback: int8 misses the accuracy budget, but the network was prepared in "
            f"{pipeline.qat_run.prepared.mode} mode: a layer kept float there keeps its damaged output quantizer "
            "(there is no graph to take it out of). Make the network FX-traceable, or skip= layers by hand: the "
            "report's per-layer SQNR says which are worst."
        )
        return False

    def search(
        self, network: nn.Module, sqnr: dict[str, float], float_value: float, int8_value: float, when: str = "fit end"
    ) -> SearchResult:
        """Search the layers of ``network`` still int8, lowest SQNR first, for the fewest to keep float for the budget.

        Each candidate is an int8 model converted from ``network`` with :attr:`float_groups` and the candidate's
        groups (:func:`~lightning_qat.quantization.fallback.groups`) float, evaluated with the user's
        ``validation_step``/``test_step`` and timed as TorchScript (not for a compiled engine). The chosen (else the
        best, if better than ``int8_value``) candidate's groups are added to :attr:`float_groups`.
        """
        pipeline = self.pipeline
        settings, run = pipeline.settings, pipeline.qat_run
        monitor, budget = settings.monitor, settings.max_metric_drop
        assert monitor is not None
        assert budget is not None
        found = groups(network, static=run.activations == "static")
        already = {group.layer for group in pipeline.float_groups}
        ranked = sorted((name for name in found if name not in already), key=lambda name: sqnr.get(name, MAX_DB))

        def lost(value: float) -> float:  # how much worse than float
            return drop(float_value, value, settings.monitor_mode)

        rank_zero_info(
            f"QAT fallback ({when}): {monitor} int8 {int8_value:.4g} vs float {float_value:.4g} misses "
            f"max_metric_drop={budget}; searching {len(ranked)} quantized layers, lowest SQNR first."
        )

        def evaluate(layers: list[str]) -> Candidate:
            chosen = [*pipeline.float_groups, *(found[name] for name in layers)]
            try:
                model = pipeline.to_int8(network, chosen)
            except ConversionError as err:  # this set does not convert: not a candidate, the search goes on
                rank_zero_warn(f"QAT fallback ({when}): keeping {float_names(chosen)} float: {err}")
                return Candidate(layers, float("nan"), False, names=float_names(chosen), when=when)
            metrics = pipeline.evaluate(model)
            value = metrics.get(monitor, float("nan"))
            latency = None
            if not run.prepared.engine.compiled:  # a compiled artifact would take a compile per candidate: not timed
                scripted = to_torchscript(model, settings.backend, run.example_inputs)
                latency = measure_latency({"int8": scripted}, run.example_inputs, settings.backend, repeats=5)["int8"]
            meets = lost(value) <= budget
            return Candidate(layers, value, meets, serialized_size(model), latency, float_names(chosen), metrics, when)

        result = search(ranked, evaluate, better=lambda a, b: lost(a) < lost(b))
        best = result.best
        if best is not None and (result.chosen is not None or lost(best.metric) < lost(int8_value)):
            pipeline.float_groups = [*pipeline.float_groups, *(found[name] for name in best.layers)]
        rank_zero_info(
            f"QAT fallback ({when}): budget {'met' if result.chosen else 'NOT met'} after {result.evaluations} int8 "
            f"evaluations; kept float: {', '.join(float_names(pipeline.float_groups)) or 'nothing'}."
        )
        return result

    def during_fit(self, when: str) -> SearchResult | None:
        """The fallback search on the QAT network as it is now, for training to go on with the result float.

        Evaluates the float network and the current int8 model; searches only when the budget is missed. ``None``
        when no search ran. :attr:`float_groups` then holds what to keep float.
        """
        pipeline = self.pipeline
        settings, run = pipeline.settings, pipeline.qat_run
        monitor = settings.monitor
        assert monitor is not None
        assert settings.max_metric_drop is not None
        network = cpu_eval_copy(run.pl_module.get_submodule(run.target))
        freeze_for_inference(network)
        pipeline.trained_network = network
        pipeline.float_groups = resolve_groups(network, run.fallback, run.activations == "static")
        float_value = pipeline.evaluate(run.float_network).get(monitor)
        int8_value = pipeline.evaluate(pipeline.to_int8(network, pipeline.float_groups)).get(monitor)
        if float_value is None or int8_value is None:
            rank_zero_warn(f"QAT fallback ({when}): monitor={monitor!r} was not logged by the evaluation: no search.")
            return None
        if drop(float_value, int8_value, settings.monitor_mode) <= settings.max_metric_drop or not self.possible:
            rank_zero_info(f"QAT fallback ({when}): {monitor} int8 {int8_value:.4g} vs float {float_value:.4g}.")
            return None
        return self.search(network, pipeline.measure_sqnr(network), float_value, int8_value, when)


def resolve_groups(network: nn.Module, layers: Sequence[str], static: bool = True) -> list[Group]:
    """The :class:`~lightning_qat.quantization.fallback.Group` of each of ``layers`` in ``network``."""
    if not layers:
        return []
    found = groups(network, static)
    return [found[name] for name in layers if name in found]


@dataclass
class FitSearch:
    """The search during the fit: when it runs (``at``, set when the fit starts) and what it found (checkpointed)."""

    at: int | None = None  # the epoch / step it searches at; None: not during this fit
    searched: bool = False  # it ran (a resumed run does not run it again)
    fallback: list[str] = field(default_factory=list)  # the layers it kept float (then trained so)
    met: bool | None = None  # whether it met the budget (None: no search ran)
    candidates: list[dict[str, Any]] = field(default_factory=list)  # what it tried

    def plan(self, trainer: pl.Trainer, schedule: FreezeSchedule, on_drop: str, fallback_at: Any) -> None:
        """Set :attr:`at` from ``fallback_at`` (``"bn"``: when BatchNorm statistics freeze) for this fit."""
        self.at = None
        if on_drop != "fallback" or fallback_at == "end":
            return
        at = schedule.bn_at if fallback_at == "bn" else fallback_at
        total = trainer.max_epochs if schedule.interval == "epoch" else trainer.estimated_stepping_batches
        length = int(total) if total is not None and 0 <= total < math.inf else None
        at = resolve_after("fallback_at", at, length, schedule.interval)
        self.at = None if at is None else max(1, at)  # observers must have seen data (freeze_bn_after=0)

    def due(self, counter: int) -> bool:
        """Whether the search runs now, at epoch / step ``counter``."""
        return self.at is not None and counter >= self.at and not self.searched

    def run(self, trainer: pl.Trainer, pipeline: Pipeline | None, network: nn.Module, static: bool, when: str) -> None:
        """Search with ``pipeline`` on global rank 0, broadcast, and keep the result float in ``network`` on every rank.

        ``pipeline`` is ``None`` on the other ranks; ``static``: the run ships static int8 activations.
        """
        self.searched = True
        found: tuple[list[str], bool | None, list[dict[str, Any]]] | None = None
        if pipeline is not None:
            try:
                result = pipeline.budget.during_fit(when)
            except Exception as err:  # noqa: BLE001 - training goes on as it was; the end of fit searches again
                rank_zero_warn(f"QAT fallback ({when}) failed, training goes on unchanged: {type(err).__name__}: {err}")
                result = None
            if result is not None:
                candidates = [asdict(candidate) for candidate in result.candidates]
                found = ([group.layer for group in pipeline.float_groups], result.chosen is not None, candidates)
        if trainer.world_size > 1:
            found = trainer.strategy.broadcast(found, src=0)
        if found is None:
            return
        self.fallback, self.met, self.candidates = found
        chosen = resolve_groups(network, self.fallback, static)
        train_float(network, chosen)
        # in the search's words: every module and op of the groups (a layer takes the readers of its quantizer along)
        rank_zero_info(f"QAT: training goes on with {', '.join(float_names(chosen)) or 'nothing'} kept float.")

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of it (``at`` is recomputed when a fit starts)."""
        return {
            "fallback": list(self.fallback),
            "fallback_searched": self.searched,
            "fallback_met": self.met,
            "fallback_candidates": list(self.candidates),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore it from a checkpoint's callback state (older checkpoints: nothing searched)."""
        self.fallback = list(state.get("fallback", []))
        self.searched = bool(state.get("fallback_searched", False))
        self.met = state.get("fallback_met")
        self.candidates = list(state.get("fallback_candidates", []))
