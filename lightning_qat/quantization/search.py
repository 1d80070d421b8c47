"""The smallest set of layers to keep float for an accuracy budget: a binary search over a ranking, then put-backs.

The layers come ranked, most damaging first (lowest SQNR). A binary search finds the shortest prefix of the ranking
whose int8 model meets the budget (``ceil(log2(K + 1))`` evaluations for ``K`` layers); then each layer of that
prefix but the last is put back into int8, least damaging first, and stays there when the budget is still met.
Every candidate is one evaluation of a real int8 model, by the caller's ``evaluate``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass
class Candidate:
    """One int8 model tried: the layers (groups) it kept float, its metric, and whether that meets the budget."""

    layers: list[str]
    metric: float
    meets: bool
    size_bytes: int = 0
    latency_ms: float | None = None
    names: list[str] = field(default_factory=list)  # every module / op kept float with those layers
    metrics: dict[str, float] = field(default_factory=dict)  # everything the evaluation logged
    when: str = ""  # the point of the run it was tried at ("fit end", "epoch 2")


@dataclass
class SearchResult:
    """Every candidate in the order tried, and the chosen one: the smallest that meets the budget, else ``None``."""

    ranked: list[str]
    candidates: list[Candidate] = field(default_factory=list)
    chosen: Candidate | None = None
    best: Candidate | None = None  # the chosen one, else (none meets the budget) the one with the best metric

    @property
    def evaluations(self) -> int:
        """How many int8 models the search evaluated."""
        return len(self.candidates)


def search(
    ranked: Sequence[str], evaluate: Callable[[list[str]], Candidate], better: Callable[[float, float], bool]
) -> SearchResult:
    """Find the smallest set of ``ranked`` layers whose float-keeping int8 model ``evaluate`` says meets the budget.

    ``better(a, b)``: whether metric ``a`` is better than ``b`` (orders the candidates when none meets it).
    """
    result = SearchResult(list(ranked))
    tried: dict[frozenset[str], Candidate] = {}

    def trial(layers: list[str]) -> Candidate:
        key = frozenset(layers)
        if key not in tried:
            tried[key] = evaluate(layers)
            result.candidates.append(tried[key])
        return tried[key]

    low, high, found = 1, len(ranked), 0
    while low <= high:
        middle = (low + high) // 2
        if trial(list(ranked[:middle])).meets:
            found, high = middle, middle - 1
        else:
            low = middle + 1
    if not found:
        for candidate in result.candidates:
            if result.best is None or better(candidate.metric, result.best.metric):
                result.best = candidate
        return result
    kept = list(ranked[:found])
    result.chosen = tried[frozenset(kept)]
    for layer in reversed(kept[:-1]):  # the least damaging first; the last one added is what made it pass
        smaller = [name for name in kept if name != layer]
        candidate = trial(smaller)
        if candidate.meets:
            kept, result.chosen = smaller, candidate
    result.best = result.chosen
    return result
