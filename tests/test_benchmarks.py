"""The benchmark suite's quick mode runs end to end, so it cannot rot (no timing asserts: numbers vary by machine)."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def run_quick(module: str, out: Path) -> str:
    """``python -m <module> --quick --out <out>`` from the repository root; the markdown it wrote."""
    result = subprocess.run(
        [sys.executable, "-m", module, "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out.read_text()


def test_quick_benchmarks_write_every_section_with_numbers(tmp_path):
    text = run_quick("benchmarks.run", tmp_path / "bench.md")
    sections = re.split(r"^## ", text, flags=re.MULTILINE)[1:]
    assert [s.split(" ")[0] for s in sections] == ["Deployment", "int8", "Size", "QAT", "Accuracy"]
    for section in sections:
        rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| model")]
        assert rows, section
        assert all(re.search(r"\d+\.\d+", row) for row in rows), rows
    # every path of ours and the hand recipe have numbers; a peer whose package is absent is skipped with a note
    header, _, *rows = sections[0].split("\n\n")[1].splitlines()
    columns = [c.strip() for c in header.split("|")[1:-1]]
    assert len(rows) == 2  # resnet18, batch 1 and 4
    for row in rows:
        cells = dict(zip(columns, (c.strip() for c in row.split("|")[1:-1]), strict=True))
        for path in ("ours TorchScript", "ours ONNX Runtime", "hand recipe (TorchScript)"):
            assert re.fullmatch(r"\d+\.\d \(\d\.\d{3}\)", cells[path]), cells
    for package, path in (("torchao", "torchao PT2E + inductor"), ("nncf", "NNCF -> OpenVINO")):
        if importlib.util.find_spec(package) is None:
            assert f"{path}: not installed: {package}" in sections[0]
    latency_rows = [line for line in sections[1].splitlines() if line.startswith("| resnet18 |")]
    assert {row.split("|")[2].strip() for row in latency_rows} == {"x86", "fbgemm", "qnnpack"}


def test_the_quick_zoo_benchmark_writes_a_row_per_network(tmp_path):
    text = run_quick("benchmarks.zoo", tmp_path / "zoo.md")
    rows = [line for line in text.splitlines() if line.startswith("| torchvision")]
    assert [row.split("|")[1].strip() for row in rows] == [
        "torchvision resnet18",
        "torchvision lraspp_mobilenet_v3_large",
    ]
    for row in rows:
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert re.fullmatch(r"\d+ of \d+", cells[2]), cells  # Conv-BN pairs fused, counted
        assert all(re.fullmatch(r"\d+\.\d+x", c) for c in cells[4:6] + cells[7:9]), cells  # b1, b8, step, size
        # the cost model's effect: nothing to do, a set too small a gain, or the layers kept and the network after
        assert re.fullmatch(
            r"-|none taken \(too little gain\)|\d+ kept: \d+\.\d+x, \d+\.\d+x, agreement \d+\.\d%", cells[6]
        )
        assert all(re.fullmatch(r"\d+\.\d%", c) for c in cells[9:11]), cells


def test_the_quick_transformer_benchmark_writes_its_row(tmp_path):
    text = run_quick("benchmarks.transformers", tmp_path / "transformers.md")
    rows = [line for line in text.splitlines() if line.startswith("| text encoder")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].split("|")[1:-1]]
    assert cells[1] == "fx, 4 MHA"  # every nn.MultiheadAttention decomposed into int8 Linears
    assert re.fullmatch(r"\d+\.\d%", cells[2]), cells
    assert re.fullmatch(r"\d+\.\d+x", cells[3]), cells
    for speedups in cells[4:8]:  # static / dynamic / torch's own dynamic quantization (fails on TransformerEncoder)
        assert re.fullmatch(r"\d+\.\d+x / \d+\.\d+x / (\d+\.\d+x|fails)", speedups), speedups


def test_the_quick_hugging_face_benchmark_writes_its_row_beside_both_peers(tmp_path):
    pytest.importorskip("transformers")
    text = run_quick("benchmarks.hugging_face", tmp_path / "hugging_face.md")
    (row,) = [line for line in text.splitlines() if line.startswith("| BERT")]
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert re.fullmatch(r"\d+\.\d% / \d+\.\d% / \d+\.\d%", cells[1]), cells  # float / QAT / int8 accuracy
    assert re.fullmatch(r"\d+\.\d+x / \d+\.\d+x", cells[2]), cells
    assert "layer_norm" in cells[5]  # what stays float, named
    for peer in cells[6:9]:  # ours with dynamic activations; torch's and ONNX Runtime's dynamic int8 of the float model
        assert re.fullmatch(r"\d+\.\d%, \d+\.\d+x / \d+\.\d+x", peer), peer


def test_quick_fallback_benchmark_writes_its_rows(tmp_path):
    text = run_quick("benchmarks.fallback", tmp_path / "fallback.md")
    (outlier,) = [line for line in text.splitlines() if line.startswith("| gain | fx |")]
    cells = [c.strip() for c in outlier.split("|")[1:-1]]
    assert all(re.fullmatch(r"\d\.\d{3}", c) for c in cells[2:5]), cells  # float, int8 at start, plain QAT int8
    assert re.fullmatch(r"\d\.\d{3} \((met|missed); QAT \d\.\d{3}\)", cells[6]), cells
    assert cells[7] == "mul, conv2"  # the quantizer after the gain: the op and the conv reading it
    assert cells[10] == "fit start"
    (row,) = [line for line in text.splitlines() if line.startswith("| resnet18 |")]
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert len(cells) == 10
    assert all(re.fullmatch(r"\d+\.\d+ / \d+\.\d+", c) for c in cells[1:3]), cells  # float, int8: loss / accuracy
    assert all(re.fullmatch(r"\d+\.\d+", c) for c in cells[3:5]), cells  # int8 latency, QAT epoch seconds
