"""The accuracy budget: the fewest layers to keep float, searched at fit end and during the fit.

:class:`BudgetSearch` is the search of one :class:`~lightning_qat.FinishPipeline` (its ``budget``): each candidate is
a real int8 model of the trained weights, evaluated with the user's ``validation_step``/``test_step`` and timed.
:class:`FitSearch` is the callback's slice of state for the search during the fit: when it runs, what it kept float,
and what it tried, saved in checkpoints so a resumed run does not search again.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from math import nan
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
from lightning_qat.quantization.fallback import Group, all_float, float_names, groups, train_float
from lightning_qat.quantization.fallback import alone as alone_quantized
from lightning_qat.quantization.measure import measure_latency, serialized_size
from lightning_qat.quantization.schedule import FreezeSchedule, resolve_after
from lightning_qat.quantization.search import Candidate, SearchResult, search
from lightning_qat.quantization.sensitivity import MAX_DB

FIRST = 8  # the candidates of lowest SQNR ranked by the metric each loses alone quantized: one evaluation each
START = "fit start"  # the search before the first training step, on a calibrated copy
# How far past the budget a calibrated int8 copy may be at the fit's start and be left to QAT, in the monitor's units.
# Measured (benchmarks/fallback.md, structural outliers, two runs): in 11 of 11 runs whose start missed the budget (by
# 0.4 to 89 points of val_acc), plain QAT never met it. So none: a miss is searched.
RECOVERS = 0.0


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

    def calibrate(self, network: nn.Module) -> None: ...  # noqa: D102


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
        self,
        network: nn.Module,
        sqnr: dict[str, float],
        float_value: float,
        int8_value: float,
        when: str = "fit end",
        qat_value: float | None = None,
    ) -> SearchResult:
        """Search the layers of ``network`` still int8, lowest SQNR first, for the fewest to keep float for the budget.

        Each candidate is an int8 model converted from ``network`` with :attr:`float_groups` and the candidate's
        groups (:func:`~lightning_qat.quantization.fallback.groups`) float, evaluated with the user's
        ``validation_step``/``test_step`` and timed as TorchScript (not for a compiled engine). The chosen (else, at
        fit end, the best, if better than ``int8_value``) candidate's groups are added to :attr:`float_groups`.
        ``qat_value``: the QAT network's metric when already evaluated (at fit end, the report's).
        """
        pipeline = self.pipeline
        settings, run = pipeline.settings, pipeline.qat_run
        monitor, budget = settings.monitor, settings.max_metric_drop
        assert monitor is not None
        assert budget is not None
        found = groups(network, static=run.activations == "static")
        already = {group.layer for group in pipeline.float_groups}
        same: dict[frozenset[str], str] = {}  # groups of the same nodes (the inputs of a cat): one candidate
        for name in sorted((name for name in found if name not in already), key=lambda name: sqnr.get(name, MAX_DB)):
            same.setdefault(frozenset(found[name].nodes) or frozenset([name]), name)
        ranked = list(same.values())

        def lost(value: float) -> float:  # how much worse than float
            return drop(float_value, value, settings.monitor_mode)

        # a set kept float computes between the QAT network and its weights in float (QAT can fit its quantizers)
        if qat_value is None:
            qat_value = pipeline.evaluate(network).get(monitor, nan)
        reach = min(qat_value, pipeline.evaluate(all_float(cpu_eval_copy(network))).get(monitor, nan), key=lost)
        if lost(reach) > budget:  # the weights themselves lost it (QAT's training, not its quantizers): nothing to find
            rank_zero_info(
                f"QAT fallback ({when}): {monitor} int8 {int8_value:.4g} vs float {float_value:.4g} misses "
                f"max_metric_drop={budget}, but the QAT network reaches at most {monitor} {reach:.4g}, its weights in "
                "float too: keeping layers float cannot meet it now (not searched). A lower learning rate, or more "
                "epochs, brings the QAT network back."
            )
            return SearchResult([])
        ranked, losses = self.rank(network, found, ranked, lost)
        rank_zero_info(
            f"QAT fallback ({when}): {monitor} int8 {int8_value:.4g} vs float {float_value:.4g} misses "
            f"max_metric_drop={budget}; searching {len(ranked)} candidates (quantized layers, and quantizers after "
            f"other ops), the {len(losses)} of lowest SQNR ranked by the {monitor} each loses alone quantized: "
            + ", ".join(f"[{', '.join(found[name].names)}] {loss:.3g}" for name, loss in list(losses.items())[:3])
            + (", ..." if len(losses) > 3 else "")
            + "."
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
        # short of the budget, the best set is kept only at fit end: during the fit, QAT may still train it back
        partial = when == "fit end" and best is not None and lost(best.metric) < lost(int8_value)
        if best is not None and (result.chosen is not None or partial):
            pipeline.float_groups = [*pipeline.float_groups, *(found[name] for name in best.layers)]
        short = ""
        if result.chosen is None and best is not None and ranked:
            worst = ", ".join(found[ranked[0]].names)
            short = (
                f" The closest: {monitor} {best.metric:.4g} with {', '.join(best.names) or 'nothing'} float, "
                f"{lost(best.metric) - budget:.4g} short; the costliest quantizer: {worst} "
                f"({sqnr.get(ranked[0], MAX_DB):.1f} dB SQNR)."
            )
        rank_zero_info(
            f"QAT fallback ({when}): budget {'met' if result.chosen else 'NOT met'} after {result.evaluations} int8 "
            f"evaluations; kept float: {', '.join(float_names(pipeline.float_groups)) or 'nothing'}.{short}"
        )
        return result

    def rank(
        self, network: nn.Module, found: dict[str, Group], ranked: list[str], lost: Callable[[float], float]
    ) -> tuple[list[str], dict[str, float]]:
        """``ranked`` (lowest SQNR first) with its :data:`FIRST` ordered by the metric each loses alone quantized.

        Most first, in ``network`` (:func:`~lightning_qat.quantization.fallback.alone`), then the rest. One evaluation
        of the QAT network each, no conversion: SQNR is the cheap first cut, the user's metric the ranking (the outlier
        a quantizer flattens can cost more than a lower SQNR elsewhere). Also returns the losses.
        """
        monitor = self.pipeline.settings.monitor
        assert monitor is not None
        losses = {}
        for name in ranked[:FIRST]:
            value = self.pipeline.evaluate(alone_quantized(cpu_eval_copy(network), found[name])).get(monitor, nan)
            losses[name] = -math.inf if math.isnan(value) else lost(value)
        order = sorted(losses, key=lambda name: losses[name], reverse=True)  # stable: ties keep the SQNR order
        return order + ranked[FIRST:], {name: losses[name] for name in order}

    def during_fit(self, when: str) -> SearchResult | None:
        """The fallback search on the QAT network as it is now, for training to go on with the result float.

        Evaluates the float network and the current int8 model; searches only when the budget is missed. ``None``
        when no search ran. :attr:`float_groups` then holds what to keep float.
        At the fit's start (``when`` is :data:`START`), the network has not observed anything yet: a copy calibrated
        on ``ptq_batches`` training batches is converted, and it searches only when int8 misses the budget by more
        than :data:`RECOVERS` (what QAT can train back is left to QAT).
        """
        pipeline = self.pipeline
        settings, run = pipeline.settings, pipeline.qat_run
        monitor = settings.monitor
        assert monitor is not None
        assert settings.max_metric_drop is not None
        network = cpu_eval_copy(run.pl_module.get_submodule(run.target))
        margin = 0.0
        if when == START:
            pipeline.calibrate(network)
            margin = RECOVERS
        freeze_for_inference(network)
        pipeline.trained_network = network
        pipeline.float_groups = resolve_groups(network, run.fallback, run.activations == "static")
        float_value = pipeline.evaluate(run.float_network).get(monitor)
        int8_value = pipeline.evaluate(pipeline.to_int8(network, pipeline.float_groups)).get(monitor)
        if float_value is None or int8_value is None:
            rank_zero_warn(f"QAT fallback ({when}): monitor={monitor!r} was not logged by the evaluation: no search.")
            return None
        lost = drop(float_value, int8_value, settings.monitor_mode)
        if lost <= settings.max_metric_drop + margin or not self.possible:
            left = " (within what QAT trains back: not searched)" if lost > settings.max_metric_drop else ""
            rank_zero_info(f"QAT fallback ({when}): {monitor} int8 {int8_value:.4g} vs float {float_value:.4g}{left}.")
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
    seconds: float = 0.0  # what its searches took (rank 0)

    def plan(self, trainer: pl.Trainer, schedule: FreezeSchedule, on_drop: str, fallback_at: Any) -> bool:
        """Set :attr:`at` (from ``fallback_at``; ``"bn"``: BatchNorm freezes) for this fit.

        Returns whether it looks at the fit's start (:data:`START`) too: not with ``"end"``, not on resume.
        """
        self.at = None
        if on_drop != "fallback" or fallback_at == "end":
            return False
        at = schedule.bn_at if fallback_at == "bn" else fallback_at
        total = trainer.max_epochs if schedule.interval == "epoch" else trainer.estimated_stepping_batches
        length = int(total) if total is not None and 0 <= total < math.inf else None
        at = resolve_after("fallback_at", at, length, schedule.interval)
        self.at = None if at is None else max(1, at)  # observers must have seen data (freeze_bn_after=0)
        # a resumed run trained past the start (its step counter comes back only after on_fit_start)
        return trainer.ckpt_path is None

    def due(self, counter: int) -> bool:
        """Whether the search runs now, at epoch / step ``counter``."""
        return self.at is not None and counter >= self.at and not self.searched

    def run(self, trainer: pl.Trainer, pipeline: Pipeline | None, network: nn.Module, static: bool, when: str) -> None:
        """Search with ``pipeline`` on global rank 0, broadcast, and keep the result float in ``network`` on every rank.

        ``pipeline`` is ``None`` on the other ranks; ``static``: the run ships static int8 activations. The search at
        :data:`START` leaves the one at :attr:`at` to come.
        """
        self.searched = self.searched or when != START
        found: tuple[list[str], bool | None, list[dict[str, Any]]] | None = None
        if pipeline is not None:
            start = time.perf_counter()
            try:
                result = pipeline.budget.during_fit(when)
            except Exception as err:  # noqa: BLE001 - training goes on as it was; the end of fit searches again
                rank_zero_warn(f"QAT fallback ({when}) failed, training goes on unchanged: {type(err).__name__}: {err}")
                result = None
            self.seconds += time.perf_counter() - start
            if result is not None:
                candidates = [asdict(candidate) for candidate in result.candidates]
                found = ([group.layer for group in pipeline.float_groups], result.chosen is not None, candidates)
        if trainer.world_size > 1:
            found = trainer.strategy.broadcast(found, src=0)
        if found is None:
            return
        self.fallback, self.met = found[:2]
        self.candidates = [*self.candidates, *found[2]]
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
            "fallback_seconds": self.seconds,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore it from a checkpoint's callback state (older checkpoints: nothing searched)."""
        self.fallback = list(state.get("fallback", []))
        self.searched = bool(state.get("fallback_searched", False))
        self.met = state.get("fallback_met")
        self.candidates = list(state.get("fallback_candidates", []))
        self.seconds = float(state.get("fallback_seconds", 0.0))
