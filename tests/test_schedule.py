import math

import pytest

from lightning_qat.quantization.schedule import build_schedule, check_after


@pytest.mark.parametrize("max_epochs", [2, 3, 4, 5, 8, 20])
def test_the_default_fractions_freeze_bn_then_observers_before_the_last_epoch(max_epochs):
    schedule, notes, warnings = build_schedule("epoch", 0.5, 0.75, max_epochs, -1, 10.0 * max_epochs)
    assert schedule.interval == "epoch"
    assert 1 <= schedule.bn_at <= schedule.observers_at <= max_epochs - 1
    assert notes == warnings == []


def test_a_single_epoch_schedules_the_fractions_over_its_steps():
    schedule, notes, _ = build_schedule("epoch", 0.5, 0.75, 1, -1, 20.0)
    assert (schedule.interval, schedule.bn_at, schedule.observers_at) == ("step", 10, 15)
    assert notes == ["QAT: max_epochs=1: the freeze fractions apply to the run's 20 optimizer steps instead."]


def test_max_steps_without_max_epochs_takes_fractions_of_steps():
    schedule, notes, _ = build_schedule("epoch", 0.5, 0.75, -1, 40, 40.0)
    assert (schedule.interval, schedule.bn_at, schedule.observers_at) == ("step", 20, 30)
    assert "max_steps=40 without max_epochs" in notes[0]


def test_an_absolute_value_the_run_never_reaches_is_a_warning():
    schedule, _, warnings = build_schedule("epoch", 1, 5, 3, -1, 30.0)
    assert (schedule.bn_at, schedule.observers_at) == (1, 5)
    assert warnings == [
        "QAT: freeze_observers_after=5 resolves to epoch 5, which a run of 3 epochs never reaches: nothing is frozen "
        "by it. Use a smaller value or a fraction."
    ]


def test_mixed_int_and_fraction_keep_the_epoch_interval():
    schedule, notes, _ = build_schedule("epoch", 0, 0.5, 1, -1, 20.0)
    assert (schedule.interval, schedule.bn_at, schedule.observers_at) == ("epoch", 0, 1)
    assert notes == []


def test_a_fraction_of_an_endless_run_is_refused():
    with pytest.raises(ValueError, match=r"freeze_bn_after=0\.5 is a fraction.*no finite max_epochs"):
        build_schedule("epoch", 0.5, None, -1, -1, math.inf)


@pytest.mark.parametrize("value", [1.0, 0.0, -1, True, "1"])
def test_bad_after_values_name_the_accepted_forms(value):
    with pytest.raises(ValueError, match=r"use None \(never\), an int >= 0"):
        check_after("freeze_bn_after", value)
