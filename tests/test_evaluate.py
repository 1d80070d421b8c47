import csv
import json
import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch
from conftest import pretrained_tiny, trainer_kwargs
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger

from lightning_qat import FinishPipeline, QATCallback, QATReport, load_quantized
from lightning_qat.export.torchscript import PerShape, save_torchscript
from lightning_qat.lightning.evaluate import EvalData
from lightning_qat.lightning.settings import FinishSettings
from lightning_qat.quantization import ao
from lightning_qat.quantization.convert import to_int8
from lightning_qat.quantization.measure import measure_latency
from lightning_qat.quantization.prepare import prepare_model


def _fit(tmp_path, dm, float_tiny, qat, **kwargs):
    pl.seed_everything(0)
    model = pretrained_tiny(float_tiny)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[qat], **kwargs))
    trainer.fit(model, datamodule=dm)
    return trainer, model


@pytest.fixture(scope="module")
def finished(tmp_path_factory, digits8, float_tiny):
    tmp_path = tmp_path_factory.mktemp("eval")
    qat = QATCallback(freeze_bn_after=1, freeze_observers_after=2, monitor="val_acc", ptq_baseline=True)
    logger = CSVLogger(tmp_path, name="run")
    trainer, model = _fit(tmp_path, digits8, float_tiny, qat, max_epochs=3, logger=logger)
    return {"qat": qat, "trainer": trainer, "model": model, "float_acc": float_tiny["val_acc"]}


def test_float_qat_int8_metrics_reach_the_csv_logger(finished):
    path = f"{finished['trainer'].logger.log_dir}/metrics.csv"
    with open(path) as f:
        columns = set(next(csv.reader(f)))
    assert {"float/val_acc", "ptq/val_acc", "qat/val_acc", "int8/val_acc", "qat/bn_frozen"} <= columns


def test_report_fields_are_filled_and_consistent(finished):
    report = finished["qat"].report
    assert isinstance(report, QATReport)
    assert report.backend == "x86"
    assert report.mode == "fx"
    assert report.num_fused == 3
    assert report.quantized_layers == 4
    assert report.size_bytes["int8"] < report.size_bytes["float"] / 2  # the artifact file, code included
    assert report.latency_ms["float"] > 0
    assert report.latency_ms["int8"] > 0
    assert report.latency_batch_size == 64
    # the float row is the pretrained network before QAT, evaluated by the same loop as the QAT/int8 rows
    assert report.metrics["float"]["val_acc"] == pytest.approx(finished["float_acc"], abs=1e-6)
    assert report.metrics["int8"]["val_acc"] > 0.85
    log_dir = finished["trainer"].logger.log_dir
    with open(f"{log_dir}/qat_report.json") as f:
        assert QATReport.from_dict(json.load(f)) == report
    with open(f"{log_dir}/qat_report.md") as f:
        assert "| val_acc |" in f.read()


def test_report_times_the_artifact_as_loaded_next_to_float(finished, monkeypatch):
    """The int8 latency is the TorchScript artifact loaded by `load_quantized`, not the eager int8 GraphModule."""
    qat = finished["qat"]
    report = qat.report
    assert report.latency_runtime == {"float": "PyTorch eager", "int8": "TorchScript artifact"}
    assert report.size_bytes["int8"] == qat.artifact_path.stat().st_size
    timed = {}

    def spy(networks, *args, **kwargs):
        timed.update(networks)
        return measure_latency(networks, *args, **kwargs)

    monkeypatch.setattr("lightning_qat.lightning.finish.measure_latency", spy)
    again = QATReport.from_dict(report.to_dict())
    qat.finished.measure_networks(again)
    assert isinstance(timed["int8"], PerShape)
    assert isinstance(timed["int8"].module, torch.jit.ScriptModule)
    assert timed["int8"] is not qat.quantized_model
    # a direct timing of the loaded artifact in this process gives the same float/int8 ratio, within noise
    loaded = load_quantized(qat.artifact_path)
    run = qat.finished.qat_run
    direct = measure_latency({"float": run.float_network, "int8": loaded}, run.example_inputs, "x86", repeats=20)
    assert again.speedup == pytest.approx(direct["float"] / direct["int8"], rel=0.6)


@pytest.mark.parametrize("slower", [True, False])
def test_an_int8_artifact_slower_than_float_is_timed_layer_by_layer(finished, monkeypatch, slower):
    qat = finished["qat"]
    timed = {"float": 1.0, "int8": 2.0 if slower else 0.5}
    monkeypatch.setattr("lightning_qat.lightning.finish.measure_latency", lambda networks, *a, **k: dict(timed))
    again = QATReport.from_dict(qat.report.to_dict())
    qat.finished.measure_networks(again)
    assert list(again.layer_ms) == (["conv1", "conv2", "fc1", "fc2"] if slower else [])
    assert any(line.startswith("where the int8 time goes: ") for line in again.summary()) is slower


def test_artifact_reloads_in_a_fresh_process_bitwise(finished, digits8, tmp_path):
    qat = finished["qat"]
    x, _ = digits8.splits["val"].tensors
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import sys, torch; from lightning_qat import load_quantized; "
        "m = load_quantized(sys.argv[1]); torch.save(m(torch.load(sys.argv[2])), sys.argv[3])"
    )
    subprocess.run(
        [sys.executable, "-c", script, str(qat.artifact_path), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
        check=True,
        cwd=tmp_path,
    )
    with torch.no_grad(), ao.quiet():
        expected = qat.quantized_model(x)
    assert torch.equal(torch.load(tmp_path / "y.pt"), expected)


def test_load_quantized_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="No int8 artifact"):
        load_quantized(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a readable TorchScript"):
        load_quantized(bad)
    plain = tmp_path / "plain.pt"
    with ao.quiet():
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(plain))
    with pytest.raises(ValueError, match="not a lightning-qat artifact"):
        load_quantized(plain)


@pytest.mark.parametrize("backend", ["qnnpack", "fbgemm"])
def test_artifact_of_another_backend_loads_under_its_own_engine(tmp_path, digits8, float_tiny, backend):
    """int8 weights are packed for the engine active at load time, the artifact's; the process's setting stays."""
    x, _ = digits8.splits["val"].tensors
    net = pretrained_tiny(float_tiny).net
    prepared = prepare_model(net, backend, "fx", [], (x[:2],))
    with torch.no_grad(), ao.quiet():
        prepared.module(x[:256])
    int8 = to_int8(prepared.module, prepared.mode, backend, (x[:2],))
    path = save_torchscript(int8, tmp_path / "m.pt", backend, (x[:2],))
    torch.backends.quantized.engine = "x86"
    try:
        loaded = load_quantized(path)
        assert torch.backends.quantized.engine == "x86"
        with torch.no_grad(), ao.quiet(), ao.engine(backend):
            expected = int8(x)
        with torch.no_grad(), ao.quiet():
            assert torch.equal(loaded(x), expected)
    finally:
        torch.backends.quantized.engine = "x86"


class LowerInt8Pipeline(FinishPipeline):
    """Overrides one step of the end of fit: the int8 row's val_acc is made 0.5 lower than float's."""

    def evaluate_networks(self, report):
        super().evaluate_networks(report)
        report.metrics["int8"]["val_acc"] = report.metrics["float"]["val_acc"] - 0.5


class LowerInt8Metric(QATCallback):
    pipeline_class = LowerInt8Pipeline


@pytest.mark.parametrize("on_drop", ["raise", "warn"])
def test_guard_acts_after_the_artifact_is_saved(tmp_path, digits8, float_tiny, on_drop):
    qat = LowerInt8Metric(
        freeze_bn_after=1,
        freeze_observers_after=1,
        monitor="val_acc",
        max_metric_drop=0.1,
        on_drop=on_drop,
        save_dir=str(tmp_path / "out"),
    )
    if on_drop == "raise":
        expectation = pytest.raises(RuntimeError, match=r"val_acc dropped by 0\.5 .* more than max_metric_drop=0\.1")
    else:
        expectation = pytest.warns(UserWarning, match=r"val_acc dropped by 0\.5 ")
    with expectation:
        _fit(tmp_path, digits8, float_tiny, qat, max_epochs=2, limit_train_batches=2)
    assert (tmp_path / "out" / "model_int8.pt").is_file()  # saved before the guard ran
    assert (tmp_path / "out" / "qat_report.json").is_file()


@pytest.mark.parametrize(
    ("metrics", "mode", "max_drop", "expected"),
    [
        ({"float": {"m": 0.9}, "int8": {"m": 0.8}}, "max", 0.05, "dropped by 0.1 "),
        ({"float": {"m": 0.9}, "int8": {"m": 0.8}}, "max", 0.2, None),
        ({"float": {"m": 0.3}, "int8": {"m": 0.5}}, "min", 0.1, "dropped by 0.2 "),
        ({"float": {"m": 0.3}, "int8": {"m": 0.5}}, "max", 0.0, None),  # int8 better on a metric to maximize
        ({"float": {"x": 0.3}, "int8": {"x": 0.5}}, "max", 0.0, "monitor='m' was not logged"),
    ],
)
def test_check_metric_drop_compares_float_and_int8(metrics, mode, max_drop, expected, recwarn):
    settings = FinishSettings(backend="x86", monitor="m", monitor_mode=mode, max_metric_drop=max_drop)
    guard = FinishPipeline(settings, run=None, data=EvalData())  # the guard reads the report and the settings only
    report = QATReport(backend="x86", mode="fx", num_fused=0, quantized_layers=0, metrics=metrics)
    guard.check_metric_drop(report)
    messages = [str(w.message) for w in recwarn if "QAT accuracy guard" in str(w.message)]
    if expected is None:
        assert messages == []
    else:
        assert len(messages) == 1
        assert expected in messages[0]


def test_guard_quiet_within_threshold(tmp_path, digits8, float_tiny, recwarn):
    qat = QATCallback(
        freeze_bn_after=1,
        freeze_observers_after=1,
        monitor="val_acc",
        max_metric_drop=0.5,
        on_drop="warn",  # a drop beyond the budget warns: the assertion below can fail
        export=[],
    )
    _fit(tmp_path, digits8, float_tiny, qat, max_epochs=2, limit_train_batches=2)
    drop = qat.report.metric_drop("val_acc", "max")
    assert drop is not None  # the guard had both rows to compare
    assert drop <= 0.5
    assert not [w for w in recwarn if "QAT accuracy guard" in str(w.message)]


def test_evaluate_none_skips_evaluation(tmp_path, digits8, float_tiny):
    qat = QATCallback(evaluate=None, export=[])
    _fit(tmp_path, digits8, float_tiny, qat, max_epochs=1, limit_train_batches=2)
    assert qat.report.metrics == {}
    assert qat.quantized_model is not None


def test_evaluate_test_uses_the_test_loop(tmp_path, digits8, float_tiny):
    qat = QATCallback(evaluate="test", export=[])
    _fit(tmp_path, digits8, float_tiny, qat, max_epochs=1, limit_train_batches=2)
    assert set(qat.report.metrics["int8"]) == {"test_acc"}


@pytest.mark.parametrize("bar", [RichProgressBar, TQDMProgressBar])
def test_the_end_of_fit_shows_one_bar_per_step_of_the_fits_kind_and_nothing_after_the_report(
    tmp_path, digits8, float_tiny, capsys, bar
):
    """Before: five tqdm "Validation DataLoader" bars under the rich one, and the epoch's bar again after the report."""
    qat = QATCallback(export=[], latency_repeats=1)
    kwargs = trainer_kwargs(tmp_path, max_epochs=1, enable_progress_bar=True, callbacks=[bar(), qat])
    pl.Trainer(**kwargs).fit(pretrained_tiny(float_tiny), datamodule=digits8)
    out, err = capsys.readouterr()
    assert out.rstrip().splitlines()[-1].strip() == qat.report.summary()[-1]  # the report is the last thing shown
    for row in ("float", "qat", "int8"):  # each evaluation's bar names its step
        assert f"QAT: evaluating {row}" in out + err
    if bar is RichProgressBar:
        assert out.count("Epoch 0/0") == 1  # the fit's own bar, once, above the end of fit
        assert "Validation" not in out + err
        assert "it/s]" not in out + err  # no tqdm bar
