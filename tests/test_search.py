import math

import pytest

from lightning_qat.quantization.search import Candidate, search


def budget_search(needed, ranked, metric_without=0.5):
    """A model that meets the budget (metric 1.0) once every layer of ``needed`` is kept float."""
    calls = []

    def evaluate(layers):
        calls.append(list(layers))
        meets = set(needed) <= set(layers)
        return Candidate(layers, 1.0 if meets else metric_without - 0.01 * len(layers), meets)

    return search(ranked, evaluate, better=lambda a, b: a > b), calls


@pytest.mark.parametrize("k", [1, 2, 5, 8, 13])
def test_one_damaged_layer_ranked_first_costs_a_binary_search(k):
    ranked = [f"layer{i}" for i in range(k)]
    result, calls = budget_search(["layer0"], ranked)
    assert result.chosen.layers == ["layer0"]
    assert result.evaluations == len(calls) <= math.ceil(math.log2(k)) + 3
    assert result.best is result.chosen


def test_layers_the_budget_does_not_need_go_back_to_int8():
    ranked = ["a", "b", "c", "d", "e", "f"]
    result, calls = budget_search(["a", "d"], ranked)  # "b" and "c" rank above "d" but are not needed
    assert result.chosen.layers == ["a", "d"]
    assert ["a", "b", "d"] in calls or ["a", "c", "d"] in calls  # put back one at a time
    assert len(calls) == len({tuple(c) for c in calls})  # no candidate evaluated twice


def test_no_set_meets_the_budget_keeps_the_best_candidate():
    result, calls = budget_search(["not a layer"], ["a", "b", "c"])
    assert result.chosen is None
    assert calls == [["a", "b"], ["a", "b", "c"]]  # the binary search only goes up from a failing middle
    assert result.best.layers == ["a", "b"]  # 0.48 beats 0.47


def test_lower_is_better_metrics():
    def evaluate(layers):
        return Candidate(layers, 0.1 if "b" in layers else 0.9 - 0.1 * len(layers), "b" in layers)

    result = search(["a", "b", "c"], evaluate, better=lambda a, b: a < b)
    assert result.chosen.layers == ["b"]
