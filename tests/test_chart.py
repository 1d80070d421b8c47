from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lightning_qat.lightning import chart
from lightning_qat.lightning.report import QATReport


def searched_report():
    report = QATReport("x86", "fx", 3, 4, monitor="val_acc", metrics={"float": {"val_acc": 0.93}})
    report.layer_sqnr = {"conv1": 2.2, "conv2": 18.2, "fc1": 27.6, "fc2": 36.6}
    report.fallback = ["conv1", "conv2"]
    report.fallback_evaluations = 2
    report.fallback_candidates = [
        {"layers": ["conv2", "conv1"], "metric": 0.94, "meets": True, "latency_ms": 1.1, "names": ["conv1", "conv2"]},
        {"layers": ["conv2"], "metric": 0.66, "meets": False, "latency_ms": 0.9, "names": ["conv2"]},
    ]
    return report


def test_the_chart_is_written_beside_the_report_and_sent_to_image_loggers(tmp_path, monkeypatch):
    tensorboard = TensorBoardLogger(tmp_path / "tb")
    sent = []
    original = tensorboard.experiment.add_figure
    monkeypatch.setattr(
        tensorboard.experiment, "add_figure", lambda tag, fig, **kw: sent.append(tag) or original(tag, fig, **kw)
    )
    path = chart.save_chart(searched_report(), tmp_path, [CSVLogger(tmp_path / "csv"), tensorboard], step=7)
    assert path == tmp_path / "qat_layers.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000
    assert sent == ["qat/layers"]
    tensorboard.experiment.close()  # joins the writer thread (flush() may return before the image is on disk)
    assert sum(f.stat().st_size for f in (tmp_path / "tb").rglob("events.out.tfevents.*")) > 10_000  # the image


def test_without_matplotlib_one_line_says_how_to_get_the_chart(tmp_path, monkeypatch):
    said = []
    monkeypatch.setattr(chart, "available", lambda: False)
    monkeypatch.setattr(chart, "_said_missing", False)
    monkeypatch.setattr(chart, "rank_zero_info", said.append)
    assert chart.save_chart(searched_report(), tmp_path) is None
    assert chart.save_chart(searched_report(), tmp_path) is None
    assert said == ["QAT: qat_layers.png skipped: matplotlib is not installed (pip install 'lightning-qat[plot]')."]
    assert not (tmp_path / "qat_layers.png").exists()


def test_a_report_without_layers_draws_nothing(tmp_path):
    assert chart.save_chart(QATReport("x86", "eager", 0, 0, []), tmp_path) is None


def test_candidates_of_a_compiled_engine_are_drawn_by_what_they_keep_float(tmp_path):
    """PT2E's candidates are not timed (each would take a compile): their x is how much stays float."""
    report = searched_report()
    report.mode = "pt2e"
    for candidate in report.fallback_candidates:
        candidate["latency_ms"] = None
    figure = chart.layers_chart(report)
    assert figure.axes[1].get_xlabel() == "modules and ops kept float"
    assert chart.save_chart(report, tmp_path).stat().st_size > 10_000
