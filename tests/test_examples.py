"""Every script of ``examples/`` runs as a user would run it, with fewer epochs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import EXAMPLES, load_example, subprocess_env

from lightning_qat import load_quantized


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """This Python's scripts first on PATH (``python``, ``lightning-qat``), as in the venv the user installed into."""
    bin_dir = str(Path(sys.executable).parent)
    return subprocess_env(PATH=os.pathsep.join([bin_dir, os.environ["PATH"]]), **extra)


def test_custom_module(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    accuracy = load_example("custom_module").main(
        float_epochs=3, qat_epochs=3, save_dir="out", enable_progress_bar=False
    )
    assert (tmp_path / "out" / "model_int8.pt").is_file()
    assert accuracy > 0.5  # the reloaded int8 artifact on the digits validation split; chance is 0.1


def test_finetune_from_checkpoint(tmp_path):
    report = load_example("finetune_from_checkpoint").main(
        float_epochs=1,
        qat_epochs=2,
        root=str(tmp_path),
        limit_train_batches=2,
        limit_val_batches=2,
        enable_progress_bar=False,
    )
    assert set(report.metrics) == {"float", "ptq", "qat", "int8"}
    assert report.status == "complete"
    assert load_quantized(report.artifact) is not None


def test_digits_to_folders(tmp_path):
    subprocess.run([sys.executable, str(EXAMPLES / "digits_to_folders.py"), "images"], cwd=tmp_path, check=True)
    pngs = list((tmp_path / "images").rglob("*.png"))
    assert len(pngs) == 1797  # every digit image, once
    assert sorted(p.name for p in (tmp_path / "images" / "train").iterdir()) == [str(d) for d in range(10)]


def test_finetune_imagefolder_script(tmp_path):
    quick = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=2"]
    result = subprocess.run(
        ["bash", str(EXAMPLES / "finetune_imagefolder.sh"), *quick, "--qat.latency_repeats=1"],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (report_file,) = (tmp_path / "outputs").rglob("qat_report.json")
    report = json.loads(report_file.read_text())
    assert report["status"] == "complete"
    assert "int8" in report["metrics"]


@pytest.mark.parametrize("config", ["custom_module_cli.yaml"])
def test_custom_module_cli(tmp_path, config):
    quick = ["--pretrain.epochs=1", "--trainer.max_epochs=2", "--trainer.enable_progress_bar=false"]
    result = subprocess.run(
        ["lightning-qat", "fit", f"--config={EXAMPLES / config}", *quick, "--qat.latency_repeats=1"],
        cwd=tmp_path,
        env=_env(tmp_path, PYTHONPATH=str(EXAMPLES)),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (report_file,) = tmp_path.rglob("qat_report.json")
    assert json.loads(report_file.read_text())["metrics"]["int8"]["val_acc"] > 0.3
