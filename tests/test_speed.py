"""Layers kept float for speed in ``setup``: decided from timings, prepared so, reported, checkpointed and resumed.

The timings are this CPU's, so the tests that fit replace them (``stub_times``): which layer is slower is a property of
a machine, what the callback does with a timing is not. benchmarks/zoo.py measures real networks.
"""

import copy

import lightning.pytorch as pl
import pytest
from conftest import TinyNet, pretrained_tiny, trainer_kwargs
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_qat import QATCallback
from lightning_qat.exceptions import ConversionError
from lightning_qat.lightning import speed
from lightning_qat.lightning.report import QATReport, kept, timed_at_setup
from lightning_qat.quantization import ao
from lightning_qat.quantization.measure import layer_times
from lightning_qat.quantization.prepare import prepare_model

ship = speed.shipped


def test_candidates_are_the_slower_layers_then_the_marginal_ones_never_all():
    times = {"a": (3.0, 1.0), "b": (1.0, 1.2), "c": (1.0, 5.0)}  # slower; 1.2x faster alone; 5x faster
    assert speed.candidates(times) == [["a"], ["a", "b"]]
    assert speed.candidates({"a": (3.0, 1.0), "c": (1.0, 5.0)}) == [["a"]]  # the marginal set is the same: once
    assert speed.candidates({"a": (3.0, 1.0), "b": (2.0, 1.0)}) == []  # every layer: that is the float network
    assert speed.candidates({"c": (1.0, 5.0)}) == []


def stub_times(monkeypatch, slow: set[str], kept_ms: float = 5.0, whole=(10.0, 20.0)) -> list[list[str]]:
    """This CPU's timings replaced: float and int8 ``whole`` (ms), the ``slow`` layers 3x slower alone (the others 3x
    faster), and every network with layers kept float ``kept_ms``. Returns the networks timed, call by call."""
    calls: list[list[str]] = []

    def latency(networks, inputs, backend, repeats=20, warmup=3):
        calls.append(list(networks))
        return {name: {"float": whole[0], "int8": whole[1]}.get(name, kept_ms) for name in networks}

    def layers(int8, float_network, inputs, backend, repeats=10, prefix=""):  # the real function's layers, not times
        names = layer_times(int8, float_network, inputs, backend, repeats=1, prefix=prefix)
        return {n: (0.3, 0.1) if n in slow else (0.1, 0.3) for n in names}

    monkeypatch.setattr(speed, "measure_latency", latency)
    monkeypatch.setattr(speed, "layer_times", layers)
    return calls


def fit(tmp_path, digits8, float_tiny, qat, callbacks=(), ckpt_path=None, **kwargs) -> pl.Trainer:
    pl.seed_everything(0)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, **{"max_epochs": 1} | kwargs), callbacks=[qat, *callbacks])
    trainer.fit(pretrained_tiny(float_tiny), datamodule=digits8, ckpt_path=ckpt_path)
    return trainer


def layer(network: nn.Module, name: str) -> nn.Module:
    """Submodule ``name`` of a QAT or int8 network, inside the eager engine's wrapper and float island if any."""
    for found, module in network.named_modules():
        if found.endswith(name) and not found.endswith(f"{name}.module"):
            return getattr(module, "module", module) if type(module).__name__ == "FloatIsland" else module
    raise KeyError(name)


@pytest.mark.parametrize("engine", ["fx", "eager"])
def test_a_slower_layer_is_kept_float_trained_so_and_reported(tmp_path, digits8, float_tiny, monkeypatch, engine):
    calls = stub_times(monkeypatch, slow={"conv2"})
    traced = []
    monkeypatch.setattr(speed, "shipped", lambda *args: traced.append(args[-1].name) or ship(*args))
    qat = QATCallback(engine=engine, save_dir=str(tmp_path / "out"))
    fit(tmp_path, digits8, float_tiny, qat)

    assert calls == [["float", "int8"], ["float", "int8", "0"]]  # int8 beside float, then the set beside them
    assert traced == ["0"]  # the set only: the int8 network's trace is the preflight's
    assert list(qat.state.prepared.kernels) == ["conv2"]  # a graph-shaping decision: the checkpointed one
    assert not ao.is_qat_module(layer(qat.state.prepared.module, "conv2"))  # QAT trained it float
    int8 = qat.quantized_model
    assert not ao.is_quantized_module(layer(int8, "conv2"))  # float in what ships
    assert all(ao.is_quantized_module(layer(int8, n)) for n in ("conv1", "fc1", "fc2"))
    report = qat.report
    assert report.speed_ms == {"float": 10.0, "int8": 20.0, "kept": 5.0}
    assert [e for e in report.kept_float if e["by"] == "speed"] == [kept("conv2", "int8 0.3 ms, float 0.1 ms", "speed")]
    assert report.metrics["int8"]["val_acc"] > report.metrics["float"]["val_acc"] - 0.05  # real data: it still works
    assert "1 layers slower or barely faster in int8 kept float for speed: int8 then 5 ms" in "\n".join(
        report.summary()
    )


def test_a_resumed_run_keeps_the_checkpoints_choice(tmp_path, digits8, float_tiny, monkeypatch):
    stub_times(monkeypatch, slow={"conv2"})
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(tmp_path / "first", digits8, float_tiny, QATCallback(), enable_checkpointing=True, callbacks=[checkpoint])
    monkeypatch.undo()
    stub_times(monkeypatch, slow={"fc1"}, kept_ms=1.0)  # another machine: fc1 slower there, conv2 not
    qat = QATCallback()
    fit(tmp_path / "resumed", digits8, float_tiny, qat, max_epochs=2, ckpt_path=tmp_path / "ckpt" / "last.ckpt")

    assert list(qat.state.prepared.kernels) == ["conv2"]  # what the checkpoint's run trained
    assert not ao.is_quantized_module(qat.quantized_model.get_submodule("conv2"))
    assert ao.is_quantized_module(qat.quantized_model.get_submodule("fc1"))
    assert qat.report.speed_ms == {"float": 10.0, "int8": 20.0, "kept": 5.0}  # the checkpoint's timing, reported
    assert [e["name"] for e in qat.report.kept_float if e["by"] == "speed"] == ["conv2"]


@pytest.mark.parametrize(
    ("keep_slow_float", "slow", "kept_ms", "whole", "timed", "said"),
    [
        (True, {"conv2"}, 19.0, (10.0, 20.0), {"kept": 19.0}, "too little gain to take"),  # under GAIN
        (True, set(), 5.0, (10.0, 20.0), {}, "int8 does not pay"),  # no layer slower alone
        (True, {"conv2"}, 0.1, (0.5, 1.0), None, None),  # under FLOOR_MS: int8 beside float, and no more
        (False, {"conv2"}, 5.0, (10.0, 20.0), None, None),
    ],
)
def test_nothing_is_kept_float_when_no_set_pays_or_when_asked(
    tmp_path, digits8, float_tiny, monkeypatch, keep_slow_float, slow, kept_ms, whole, timed, said
):
    calls = stub_times(monkeypatch, slow=slow, kept_ms=kept_ms, whole=whole)
    qat = QATCallback(keep_slow_float=keep_slow_float)
    fit(tmp_path, digits8, float_tiny, qat)

    assert qat.state.prepared.kernels == {}
    assert all(ao.is_quantized_module(qat.quantized_model.get_submodule(n)) for n in ("conv1", "conv2", "fc1", "fc2"))
    assert qat.report.speed_ms == ({"float": whole[0], "int8": whole[1]} | timed if timed is not None else {})
    assert [len(call) for call in calls] == (  # float and int8, then the sets beside them
        [] if not keep_slow_float else [2] if not timed else [2, 3]
    )
    summary = "\n".join(qat.report.summary())
    assert (said in summary) if said else "timed at setup" not in summary


def test_a_set_that_cannot_be_converted_is_no_candidate(tmp_path, digits8, float_tiny, monkeypatch):
    """Found in CI: a Linear of a decomposed attention kept float got a quantized input; setup must go on without it."""
    calls = stub_times(monkeypatch, slow={"conv2"})

    def fails(*_, **__):
        raise ConversionError("the int8 model (fx mode) fails on an example batch: mat1 and mat2 ...")

    monkeypatch.setattr(speed, "calibrated_int8", fails)
    qat = QATCallback()
    fit(tmp_path, digits8, float_tiny, qat)

    assert calls == [["float", "int8"]]  # no set timed
    assert qat.state.prepared.kernels == {}
    assert qat.report.speed_ms == {"float": 10.0, "int8": 20.0}
    assert qat.report.metrics["int8"]["val_acc"] > 0.8  # the run went on and shipped


def test_int8_slower_once_but_not_when_timed_again_keeps_nothing(tmp_path, digits8, float_tiny, monkeypatch):
    """Found in CI: a 1 ms network timed slower in int8 on a busy machine, then 12x faster beside the candidates; the
    candidate was taken (and the report said int8 4.31 ms against float 53.4 ms, with 2 layers kept for speed)."""
    calls = stub_times(monkeypatch, slow={"conv2"})

    def noisy(networks, *_, **__):
        calls.append(list(networks))
        if len(calls) == 1:
            return {"float": 1.0, "int8": 1.2}
        return {"float": 53.4, "int8": 4.31} | {name: 0.878 for name in networks if name not in ("float", "int8")}

    monkeypatch.setattr(speed, "measure_latency", noisy)
    qat = QATCallback()
    fit(tmp_path, digits8, float_tiny, qat)

    assert calls == [["float", "int8"], ["float", "int8", "0"]]  # a set was tried, then int8 was not slower
    assert qat.state.prepared.kernels == {}
    assert qat.report.speed_ms == {"float": 53.4, "int8": 4.31}
    assert "kept float for speed" not in "\n".join(qat.report.summary())


def test_int8_faster_than_float_is_left_as_it_is(tmp_path, digits8, float_tiny, monkeypatch):
    calls = stub_times(monkeypatch, slow={"conv2"})

    def faster(networks, *_, **__):
        calls.append(list(networks))
        return {"float": 20.0, "int8": 10.0}

    monkeypatch.setattr(speed, "measure_latency", faster)
    qat = QATCallback()
    fit(tmp_path, digits8, float_tiny, qat)

    assert calls == [["float", "int8"]]  # no layer timed, no set tried
    assert qat.state.prepared.kernels == {}
    assert qat.report.speed_ms == {"float": 20.0, "int8": 10.0}


def test_the_report_says_what_setup_timed():
    assert timed_at_setup({"float": 1.0, "int8": 2.0}, 0) == (
        "timed at setup on the example: int8 2 ms against float 1 ms. int8 does not pay on this network on this CPU: "
        "ship the float model, or try another runtime (export=['onnx'] runs it in ONNX Runtime)"
    )
    assert timed_at_setup({"float": 1.0, "int8": 2.0, "kept": 1.5}, 3).endswith(
        "3 layers slower or barely faster in int8 kept float for speed: int8 then 1.5 ms. int8 does not pay on this "
        "network on this CPU: ship the float model, or try another runtime (export=['onnx'] runs it in ONNX Runtime)"
    )
    entries = [kept(f"layer{i}", f"int8 {i} ms, float 0.1 ms", "speed") for i in range(7)]
    report = QATReport("x86", "fx", 3, 4, kept_float=entries, speed_ms={"float": 1.0, "int8": 2.0, "kept": 0.5})
    lines = [line for line in report.summary() if "for speed" in line]
    assert lines == [
        "timed at setup on the example: int8 2 ms against float 1 ms; 7 layers slower or barely faster in int8 kept "
        "float for speed: int8 then 0.5 ms",
        "kept float (for speed, each alone at the example's shape, timed at setup): layer0 (int8 0 ms, float 0.1 ms), "
        "layer1 (int8 1 ms, float 0.1 ms), layer2 (int8 2 ms, float 0.1 ms), layer3 (int8 3 ms, float 0.1 ms), "
        "layer4 (int8 4 ms, float 0.1 ms), ... (7 in all)",
    ]
    assert QATReport.from_dict(report.to_dict()).speed_ms == report.speed_ms


def test_a_real_network_is_timed_on_this_cpu(digits32):
    """Real timings: which layers are slower is this CPU's, so only the result's form is asserted."""
    x, _ = next(iter(digits32.train_dataloader()))  # 64 images of 3x32x32: milliseconds in float (FLOOR_MS: 1)
    network = TinyNet(channels=3).eval()
    quantized = speed.calibrated_int8(prepare_model(copy.deepcopy(network), "x86", "fx", [], (x,)), "x86", (x,))
    prepared = []

    def again(kept):
        prepared.append(prepare_model(copy.deepcopy(network), "x86", "fx", [], (x,), kept=kept))
        return prepared[-1]

    result = speed.choose(network, quantized, again, {}, "x86", (x,), repeats=3)
    assert {"float", "int8"} <= set(result.ms) <= {"float", "int8", "kept"}
    assert all(ms > 0 for ms in result.ms.values())
    assert set(result.kept) <= {"conv1", "conv2", "fc1", "fc2"}
    assert len(result.kept) < 4
    assert ("kept" in result.ms) == bool(prepared)  # a set was timed when one was prepared
