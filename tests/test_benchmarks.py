"""The benchmark suite's quick mode runs end to end, so it cannot rot (no timing asserts: numbers vary by machine)."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_quick_benchmarks_write_every_section_with_numbers(tmp_path):
    out = tmp_path / "bench.md"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    sections = re.split(r"^## ", text, flags=re.MULTILINE)[1:]
    assert [s.split(" ")[0] for s in sections] == ["int8", "Size", "QAT", "Accuracy"]
    for section in sections:
        rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| model")]
        assert rows, section
        assert all(re.search(r"\d+\.\d+", row) for row in rows), rows
    latency_rows = [line for line in sections[0].splitlines() if line.startswith("| resnet18 |")]
    assert {row.split("|")[2].strip() for row in latency_rows} == {"x86", "fbgemm", "qnnpack"}
