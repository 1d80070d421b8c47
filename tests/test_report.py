import json

import pytest

from lightning_qat import QATReport
from lightning_qat.lightning.report import kept


def _report(**fields):
    base = dict(backend="x86", mode="fx", num_fused=3, quantized_layers=4, kept_float=[kept("fc2", "skip=", "you")])
    return QATReport(**base | fields)


MEASURED = dict(
    size_bytes={"float": 4_000_000, "int8": 1_000_000},
    latency_ms={"float": 8.0, "int8": 2.0},
    latency_batch_size=64,
    latency_threads=2,
)


def test_table_without_metrics_still_shows_size_and_latency_per_network():
    """evaluate=None: no metric rows, but the float and int8 columns carry the measured size and latency."""
    header, rows = _report(**MEASURED).table()
    assert header == ["", "float", "int8"]
    assert rows == [
        ["size (MB)", "4.000", "1.000"],
        ["latency (ms / batch of 64, 2 threads)", "8", "2"],
    ]


def test_table_rows_follow_the_network_order_and_mark_missing_values():
    metrics = {"int8": {"val_acc": 0.9}, "float": {"val_acc": 0.95, "val_loss": 0.2}, "qat": {"val_acc": 0.91}}
    header, rows = _report(metrics=metrics, **MEASURED).table()
    assert header == ["", "float", "qat", "int8"]
    assert rows[0] == ["val_acc", "0.95", "0.91", "0.9"]
    assert rows[1] == ["val_loss", "0.2", "-", "-"]
    assert rows[2] == ["size (MB)", "4.000", "-", "1.000"]


def test_markdown_and_terminal_render_the_same_table(capsys):
    report = _report(metrics={"float": {"val_acc": 0.95}, "int8": {"val_acc": 0.9}}, artifact="m.pt", **MEASURED)
    markdown = report.to_markdown()
    report.print()
    terminal = capsys.readouterr().out
    for text in (markdown, terminal):
        assert "val_acc" in text
        assert "4.000" in text
        assert "4.00x smaller" in text
        assert "4.00x faster" in text
        assert "m.pt" in text
    assert "| val_acc | 0.95 | 0.9 |" in markdown
    assert "| size (MB) | 4.000 | 1.000 |" in markdown


def test_ratios_and_round_trip_through_json(tmp_path):
    report = _report(metrics={"float": {"val_acc": 0.95}}, **MEASURED)
    assert report.size_ratio == pytest.approx(4.0)
    assert report.speedup == pytest.approx(4.0)
    assert _report().size_ratio is None
    json_path, md_path = report.save(tmp_path)
    data = json.loads(json_path.read_text())
    assert data["size_ratio"] == pytest.approx(4.0)
    assert QATReport.from_dict(data) == report
    assert md_path.read_text() == report.to_markdown()


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("max", pytest.approx(0.05)), ("min", pytest.approx(-0.05))],
)
def test_metric_drop_is_positive_when_int8_is_worse(mode, expected):
    report = _report(metrics={"float": {"m": 0.95}, "int8": {"m": 0.9}})
    assert report.metric_drop("m", mode) == expected
    assert report.metric_drop("other", mode) is None


def test_an_int8_model_slower_than_float_is_said_first():
    report = _report(**MEASURED | {"latency_ms": {"float": 2.0, "int8": 4.0}})
    assert report.summary()[0].startswith("SLOWER THAN FLOAT: the int8 artifact runs at 0.50x the float speed")
    assert "export=['torchscript', 'onnx']" in report.summary()[0]
    assert report.to_markdown().splitlines()[2].startswith("**SLOWER THAN FLOAT")
    assert not any("SLOWER" in line for line in _report(**MEASURED).summary())
    # the ONNX artifact is faster than float: the first line says to deploy that one
    both = _report(**MEASURED | {"latency_ms": {"float": 2.0, "int8": 4.0, "int8-onnx": 1.0}})
    assert both.summary()[0].startswith("SLOWER THAN FLOAT in TorchScript: 0.50x")
    assert "ONNX Runtime runs at 2.00x: deploy that one" in both.summary()[0]
    slow = _report(**MEASURED | {"latency_ms": {"float": 2.0, "int8": 4.0, "int8-onnx": 3.0}})
    assert slow.summary()[0].startswith("SLOWER THAN FLOAT: the int8 artifact runs at 0.67x")


def test_an_onnx_artifact_computing_another_function_is_said_first_and_never_recommended():
    """timm's mobilenetv2_100 trained on digits: the ONNX file scored 0.100 in ONNX Runtime against int8's 0.859, and
    the report still said "int8-onnx (ONNX Runtime) is 3.00x faster than float"."""
    onnx = {"latency_ms": {"float": 2.0, "int8": 4.0, "int8-onnx": 1.0}, "monitor": "val_acc"}
    broken = _report(**MEASURED | onnx, metrics={"int8": {"val_acc": 0.859}, "int8-onnx": {"val_acc": 0.100}})
    first = broken.summary()[0]
    assert first.startswith("INT8-ONNX DISAGREES WITH INT8: val_acc 0.1 in ONNX Runtime against 0.859 for the int8")
    assert broken.to_markdown().splitlines()[2].startswith("**INT8-ONNX DISAGREES")
    assert broken.onnx_speedup is None
    assert not any("deploy that one" in line or "int8-onnx (ONNX Runtime) is" in line for line in broken.summary())
    assert broken.summary()[1].startswith("SLOWER THAN FLOAT: the int8 artifact runs at 0.50x")  # the TorchScript one
    # the runtimes round differently: 0.848 against 0.859 (measured, after the float-bias fix) is agreement
    close = _report(**MEASURED | onnx, metrics={"int8": {"val_acc": 0.859}, "int8-onnx": {"val_acc": 0.848}})
    assert close.onnx_disagrees() is None
    assert close.summary()[0].startswith("SLOWER THAN FLOAT in TorchScript: 0.50x")
    # no monitor: the most different metric both rows have
    loss = _report(
        **MEASURED | onnx | {"monitor": None}, metrics={"int8": {"a": 1.0, "b": 2.0}, "int8-onnx": {"a": 1.0, "b": 3.0}}
    )
    assert loss.onnx_disagrees() == "b 3 in ONNX Runtime against 2 for the int8 model"


def test_a_slower_int8_model_says_which_layers_are_slower_than_float_and_what_is_outside_them():
    layer_ms = {"conv1": [0.09, 0.11], "fc1": [0.03, 0.02], "fc2": [0.05, 0.01]}
    report = _report(**MEASURED | {"latency_ms": {"float": 2.0, "int8": 4.0}, "layer_ms": layer_ms})
    report.float_ops = {"silu": 3}
    line = report.summary()[1]
    assert line.startswith("where the int8 time goes: 2 of 3 int8 layers are slower than float alone (fc2 0.050 vs ")
    assert "fc1 0.030 vs 0.020 ms; skip= keeps them float)" in line  # the most costly first
    assert line.endswith("the int8 layers take 0.170 of its 4.000 ms, the rest is the runtime and the conversions "
                         "around 3 float ops (each between a dequantize and a quantize)")  # fmt: skip
    assert QATReport.from_dict(json.loads(json.dumps(report.to_dict()))) == report
    assert not any("where the int8 time goes" in line for line in _report(**MEASURED).summary())


def test_the_report_counts_conv_bn_fusion_and_says_first_when_most_pairs_stay_unfused():
    fused = _report(conv_bn_pairs=3)
    assert "Conv-BN pairs fused: 3 of 3" in fused.summary()
    unfused = ["c1 -> b1: the convolution's output is also used elsewhere", "c2 -> b2: not fused by torch"]
    most = _report(conv_bn_pairs=3, conv_bn_unfused=unfused, **MEASURED)
    first = most.summary()[0]
    assert first.startswith("MOST BATCHNORMS UNFUSED: Conv-BN pairs fused: 1 of 3")
    assert "c1 -> b1: the convolution's output is also used elsewhere" in first
    assert f"**{first}**" in most.to_markdown()
    some = _report(conv_bn_pairs=3, conv_bn_unfused=unfused[:1])
    assert not some.summary()[0].startswith("MOST")
    assert any(line.startswith("Conv-BN pairs fused: 2 of 3 (") for line in some.summary())
    assert not any("Conv-BN" in line for line in _report().summary())  # not counted (eager mode): not said
    assert QATReport.from_dict(most.to_dict()).conv_bn_unfused == unfused


def test_the_report_names_the_layers_kept_float_and_what_the_artifact_holds():
    why = "int8 dilated depthwise convolution is 110x slower on 'x86'"
    entries = [kept("fc2", "skip=", "you"), kept("a.0", why, "engine"), kept("b.0", why, "engine")]
    entries.append(kept("conv1", "int8 missed max_metric_drop=0.01 on val_acc", "budget"))
    report = _report(kept_float=entries, artifact="model_int8.pt", module="model.backbone")
    summary = report.summary()
    assert "kept float (by you): fc2: skip=" in summary
    assert f"kept float (by the engine): a.0, b.0: {why}" in summary
    assert "kept float (for the accuracy budget): conv1: int8 missed max_metric_drop=0.01 on val_acc" in summary
    assert report.headline().endswith("kept float: fc2, a.0, b.0, conv1")
    assert "int8 artifact: model_int8.pt" in report.summary()  # the whole LightningModule's network
    part = _report(artifact="model_int8.pt", module="model.backbone", outside_params=1234)
    assert "int8 artifact: model_int8.pt (`model.backbone` only: 1,234 parameters" in "\n".join(part.summary())
    assert QATReport.from_dict(report.to_dict()).kept_float == report.kept_float
    older = report.to_dict() | {"kept_float": {"a.0": why}}  # a report file from before the one list
    assert QATReport.from_dict(older).kept_float == [kept("a.0", why, "engine")]


def test_per_layer_sqnr_names_the_ten_worst_and_the_files_list_every_layer():
    sqnr = {f"layer{i}": float(i * 3) for i in range(14)}
    report = _report(layer_sqnr=sqnr)
    (line,) = [s for s in report.summary() if s.startswith("per-layer SQNR")]
    assert line.endswith(
        "the 10 lowest of 14: layer0 0.0, layer1 3.0, " + ", ".join(f"layer{i} {i * 3:.1f}" for i in range(2, 10))
    )
    markdown = report.to_markdown()
    assert all(f"| layer{i} | {i * 3:.1f} |" in markdown for i in range(14))
    assert QATReport.from_dict(json.loads(json.dumps(report.to_dict()))).layer_sqnr == sqnr


def test_a_fallback_search_is_one_line_and_a_table_of_candidates():
    candidates = [
        {
            "layers": ["conv1", "fc"],
            "metric": 0.93,
            "meets": True,
            "size_bytes": 200_000,
            "latency_ms": 1.5,
            "names": ["conv1", "conv2", "fc"],
            "metrics": {},
            "when": "epoch 2",
        },
        {
            "layers": ["conv1"],
            "metric": 0.92,
            "meets": True,
            "size_bytes": 150_000,
            "latency_ms": 1.2,
            "names": ["conv1", "conv2"],
            "metrics": {},
            "when": "epoch 2",
        },
    ]
    met = _report(
        fallback=["conv1", "conv2"],
        fallback_met=True,
        fallback_evaluations=2,
        fallback_seconds=3.25,
        fallback_candidates=candidates,
    )
    assert "accuracy budget met by keeping float: conv1, conv2 (search: 2 int8 models evaluated in 3.2 s)" in (
        met.summary()
    )
    markdown = met.to_markdown()
    # every module / op kept float, as the search's log says (not only the layers it searched by)
    assert "| epoch 2 | conv1, conv2, fc | 0.93 | yes | 0.200 | 1.5 |" in markdown
    assert "| epoch 2 | conv1, conv2 | 0.92 | yes | 0.150 | 1.2 |" in markdown
    missed = _report(fallback_met=False, fallback_evaluations=3)
    assert missed.to_markdown().splitlines()[2].startswith("**ACCURACY BUDGET NOT MET by any fallback tried")
    assert not any("accuracy budget" in line.lower() for line in _report().summary())  # no search: no line


def test_the_terminal_prints_brackets_as_they_are(capsys):
    """rich would take "[[any, 65]]" for a style tag and print "[]"."""
    report = _report(package_shapes="[[any, 65]]", kept_float=[kept("[odd] name", "skip=", "you")], **MEASURED)
    report.print()
    terminal = capsys.readouterr().out
    assert "the compiled package takes inputs of shapes [[any, 65]]" in terminal
    assert "[odd] name" in terminal


def test_the_pte_line_names_the_layers_run_in_float_for_their_bias():
    """A .pte layer whose bias XNNPACK's int32 cannot hold runs in float inside the delegate: the report says which."""
    report = _report(delegated={"xnnpack": 20, "layout": 2}, float_bias=["depthwise.0"])
    line = report.delegation()
    assert line.startswith("XNNPACK delegate: 20 of 20 operators (100%)")
    assert "in float inside it (XNNPACK's int32 bias would miss theirs): depthwise.0" in line
    assert QATReport.from_dict(json.loads(json.dumps(report.to_dict()))).float_bias == ["depthwise.0"]
    assert "in float" not in _report(delegated={"xnnpack": 20}).delegation()
