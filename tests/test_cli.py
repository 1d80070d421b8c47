import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torchvision
import yaml
from conftest import load_example, subprocess_env, trainer_kwargs

from lightning_qat.app.cli import DEFAULT_CONFIG
from lightning_qat.app.data import DigitsDataModule
from lightning_qat.app.models import ImageClassifier
from lightning_qat.quantization import xnnpack

TINY = [
    "--model.arch=mobilenet_v3_small",
    "--data.image_size=16",
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=2",
    "--trainer.enable_progress_bar=false",
    "--pretrain.epochs=0",
    "--qat.ptq_baseline=false",
    "--qat.max_metric_drop=null",
    "--qat.latency_repeats=2",
]


def _cli(tmp_path, *args):
    cmd = [sys.executable, "-m", "lightning_qat", "fit", *TINY, *args]  # writes to ./outputs (default.yaml)
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=subprocess_env(), timeout=600)


def test_cli_runs_end_to_end_and_applies_dotted_overrides(tmp_path):
    result = _cli(tmp_path, "--qat.backend=fbgemm", "--qat.freeze_bn_after=0", "--qat.export=[torchscript,onnx]")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "outputs" / "qat" / "version_0"
    report = json.loads((run_dir / "qat_report.json").read_text())
    assert report["backend"] == "fbgemm"
    assert (run_dir / "model_int8.pt").is_file()
    assert (tmp_path / report["onnx_artifact"]) == run_dir / "model_int8.onnx"
    assert set(report["metrics"]) == {"float", "qat", "int8", "int8-onnx"}
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["qat"]["backend"] == "fbgemm"
    assert config["model"]["init_args"]["arch"] == "mobilenet_v3_small"
    assert "int8/val_acc" in (run_dir / "metrics.csv").read_text()


@pytest.mark.skipif(xnnpack.missing() is not None, reason=f"XNNPACK engine: {xnnpack.missing()}")
def test_cli_trains_for_a_phone_with_one_override(tmp_path):
    result = _cli(tmp_path, "--qat.backend=xnnpack")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "outputs" / "qat" / "version_0"
    report = json.loads((run_dir / "qat_report.json").read_text())
    assert (report["backend"], report["mode"]) == ("xnnpack", "xnnpack")
    assert (tmp_path / report["artifact"]) == run_dir / "model_int8.pte"
    assert report["latency_runtime"]["int8"] == "ExecuTorch runtime (XNNPACK delegate)"
    assert report["delegated"]["xnnpack"] > 0
    # any batch up to the bound: torchvision's mobilenet_v3 is where ExecuTorch computes garbage for a program first run
    # below its bound, and where the classifier's in-place dropout must be gone before lowering
    assert "(batch up to 64)" in report["package_shapes"], report["package_shapes"]
    assert "XNNPACK delegate: " in (run_dir / "qat_report.md").read_text()


@pytest.mark.parametrize(
    ("arg", "named"),
    [
        ("--qat.backnd=x86", "qat.backnd"),
        ("--qat.backend=tensorrt", "qat.backend"),
        ("--data.batch_size=big", "batch_size"),
    ],
)
def test_cli_bad_config_exits_nonzero_naming_the_key(tmp_path, arg, named):
    result = _cli(tmp_path, arg)
    assert result.returncode != 0
    assert named in result.stderr
    assert not (tmp_path / "outputs").exists()


def test_cli_missing_checkpoint_is_a_clear_error(tmp_path):
    result = _cli(tmp_path, f"--model.init_checkpoint={tmp_path / 'nope.ckpt'}")
    assert result.returncode != 0
    assert "nope.ckpt" in result.stderr
    assert "does not exist" in result.stderr
    assert not (tmp_path / "outputs").exists()


def test_finetuning_starts_from_the_float_checkpoint(tmp_path):
    pl.seed_everything(0)
    dm = DigitsDataModule(image_size=16, channels=3)
    model = ImageClassifier("mobilenet_v3_small", lr=0.05)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, enable_checkpointing=True))
    trainer.fit(model, datamodule=dm)
    ckpt = tmp_path / "float.ckpt"
    trainer.save_checkpoint(ckpt)
    float_acc = trainer.validate(model, datamodule=dm, verbose=False)[0]["val_acc"]
    plain = tmp_path / "float_state.pt"
    torch.save(model.model.state_dict(), plain)
    for source in (ckpt, plain):
        out = tmp_path / source.stem
        out.mkdir()
        result = _cli(out, f"--model.init_checkpoint={source}", "--trainer.limit_val_batches=1.0")
        assert result.returncode == 0, result.stderr[-3000:]
        report = json.loads((out / "outputs" / "qat" / "version_0" / "qat_report.json").read_text())
        assert report["metrics"]["float"]["val_acc"] == pytest.approx(float_acc, abs=1e-6)


def _leaves(tree, prefix=()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, (*prefix, key))
        else:
            yield (*prefix, key), value


SHIPPED = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")) + [DEFAULT_CONFIG]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_parses_to_its_own_values(tmp_path, path):
    result = subprocess.run(
        [sys.executable, "-m", "lightning_qat", "fit", "--config", str(path), "--print_config"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    printed = yaml.safe_load(result.stdout)
    checked = 0
    for keys, value in _leaves(yaml.safe_load(path.read_text())):
        if isinstance(value, str) and value.startswith("${"):
            continue  # an interpolation: resolved, so not equal to its text
        resolved = printed
        for key in keys:
            if key not in resolved and "init_args" in resolved:  # `model: {arch: ...}` is short for init_args
                resolved = resolved["init_args"]
            resolved = resolved[key]
        assert resolved == value, keys
        checked += 1
    assert checked >= 3


def test_default_root_dir_override_moves_the_logger_too(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "lightning_qat", "fit", "--trainer.default_root_dir=runs/a", "--print_config"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert yaml.safe_load(result.stdout)["trainer"]["logger"]["init_args"]["save_dir"] == "runs/a"


def _sub(tmp_path, subcommand, *args):
    cmd = [sys.executable, "-m", "lightning_qat", subcommand, *TINY[:2], *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=subprocess_env(), timeout=600)


def test_cli_checkpoint_workflows_test_validate_predict_convert_analyze_resume(tmp_path):
    fit = _cli(tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    (ckpt,) = (tmp_path / "outputs" / "qat" / "version_0" / "checkpoints").glob("*.ckpt")
    for subcommand in ("test", "validate", "predict", "convert", "analyze"):
        result = _sub(tmp_path, subcommand, f"--ckpt_path={ckpt}", "--trainer.limit_val_batches=2")
        assert result.returncode == 0, (subcommand, result.stderr[-3000:])
        assert "QAT: prepared `model` in fx mode" in result.stderr + result.stdout, subcommand
    converted = sorted((tmp_path / "outputs" / "qat").glob("version_*/model_int8.pt"))
    assert len(converted) == 2  # the fit's and the convert's: analyze writes no artifact
    report = json.loads((converted[-1].parent / "qat_report.json").read_text())
    assert report["converted_from"] == f"checkpoint: {ckpt}"
    analyzed = max((tmp_path / "outputs" / "qat").glob("version_*/qat_report.json"), key=lambda p: p.stat().st_mtime)
    assert analyzed.parent != converted[-1].parent
    assert (analyzed.parent / "qat_layers.png").is_file()
    assert json.loads(analyzed.read_text())["layer_sqnr"].keys() == report["layer_sqnr"].keys() != set()

    resumed = _cli(tmp_path, f"--ckpt_path={ckpt}", "--trainer.max_epochs=2", "--pretrain.epochs=1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "the float pre-training (--pretrain.epochs) is skipped" in resumed.stderr + resumed.stdout
    assert "Float pre-training:" not in resumed.stderr + resumed.stdout


@pytest.mark.parametrize("subcommand", ["fit", "test", "convert"])
def test_cli_truncated_ckpt_path_is_one_error_line_before_any_work(tmp_path, subcommand):
    truncated = tmp_path / "cut.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:500])
    result = _sub(tmp_path, subcommand, f"--ckpt_path={truncated}")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "cut.ckpt' (500 bytes) is not a readable checkpoint, truncated or corrupted" in result.stderr
    assert not (tmp_path / "outputs").exists()


def test_cli_convert_of_a_float_checkpoint_is_one_error_line(tmp_path):
    float_ckpt = tmp_path / "float.ckpt"
    torch.save({"state_dict": {}, "callbacks": {}}, float_ckpt)  # no QATCallback state: a float network's
    result = _sub(tmp_path, "convert", f"--ckpt_path={float_ckpt}")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: NotAQATCheckpointError: '{float_ckpt}' holds no QATCallback state, so its network is float: there is "
        f"no QAT model to convert; load it with ImageClassifier.load_from_checkpoint('{float_ckpt}')."
    ]


@pytest.mark.parametrize("subcommand", ["fit", "test", "convert"])
def test_cli_missing_ckpt_path_stops_before_any_work(tmp_path, subcommand):
    result = _sub(tmp_path, subcommand, f"--ckpt_path={tmp_path / 'nope.ckpt'}")
    assert result.returncode == 2
    assert "nope.ckpt: no such checkpoint file" in result.stderr
    assert not (tmp_path / "outputs").exists()


def test_cli_fast_dev_run_checks_the_conversion_and_writes_nothing(tmp_path):
    result = _cli(tmp_path, "--trainer.fast_dev_run=true")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fast_dev_run: the int8 conversion works" in result.stderr + result.stdout
    assert not list(tmp_path.rglob("model_int8.pt"))
    assert not list(tmp_path.rglob("qat_report.*"))


def _evil_pickle(path, marker):
    import pickle

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"w": Payload()}}, f)


@pytest.mark.parametrize(
    ("case", "named"),
    [
        ("another architecture", "does not fit arch='mobilenet_v3_small'"),
        ("wrong type", "arch_kwargs={'width_mult': 'wide'}"),
        ("missing interpolation key", "InterpolationKeyError: Interpolation key"),
        ("malicious pickle", "would run code"),
    ],
)
def test_cli_configuration_errors_are_one_usage_line_before_any_training(tmp_path, case, named):
    marker = tmp_path / "pwned"
    if case == "another architecture":
        torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "resnet18.pt")
        arg = f"--model.init_checkpoint={tmp_path / 'resnet18.pt'}"
    elif case == "wrong type":
        arg = '--model.arch_kwargs={"width_mult": "wide"}'
    elif case == "missing interpolation key":
        arg = "--model.lr=${..nope}"
    else:
        _evil_pickle(tmp_path / "evil.pt", marker)
        arg = f"--model.init_checkpoint={tmp_path / 'evil.pt'}"
    result = _cli(tmp_path, arg)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1
    assert named in error_lines[0]
    assert not (tmp_path / "outputs").exists()
    assert not marker.exists()


MY_PACKAGE = """
import lightning.pytorch as pl
import torch
from torch import nn
from lightning_qat.app.data import DigitsDataModule


class MyModule(pl.LightningModule):
    def __init__(self, hidden: int = 32, lr: float = 0.01):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(1, hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(hidden, 10),
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    def on_train_end(self):
        print(f"training steps: {self.trainer.global_step}")


class MyData(DigitsDataModule):
    def __init__(self, batch_size: int = 64):
        super().__init__(image_size=8, channels=1, batch_size=batch_size)
"""

SHORT = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.enable_progress_bar=false"]
SHORT += ["--qat.max_metric_drop=null", "--qat.latency_repeats=2", "--qat.ptq_baseline=false"]


@pytest.mark.parametrize("how", ["command line", "yaml"])
def test_cli_runs_your_own_module_and_data_by_class_path(tmp_path, how):
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text(MY_PACKAGE)
    if how == "yaml":
        config = (
            "model:\n  class_path: mypkg.MyModule\n  init_args:\n    hidden: 8\ndata:\n  class_path: mypkg.MyData\n"
        )
        (tmp_path / "my.yaml").write_text(config)
        args = ["--config=my.yaml"]
    else:
        args = ["--model=mypkg.MyModule", "--model.hidden=8", "--data=mypkg.MyData"]
    env = subprocess_env(PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "lightning_qat", "fit", *args, *SHORT, "--pretrain.epochs=1"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "outputs" / "qat" / "version_0"
    report = json.loads((run_dir / "qat_report.json").read_text())
    assert set(report["metrics"]) == {"float", "qat", "int8"}
    assert (run_dir / "model_int8.pt").is_file()
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["model"] == {"class_path": "mypkg.MyModule", "init_args": {"hidden": 8, "lr": 0.005}}
    assert "Float pre-training: 1 epochs" in result.stderr + result.stdout
    # --trainer.limit_train_batches=3 limits the float pre-training too, not only the QAT fit
    assert result.stdout.count("training steps: 3\n") == 2, result.stdout[-2000:]


RECIPE = Path(__file__).parents[1] / "configs" / "finetune_imagefolder.yaml"
RECIPE_TINY = [
    "--data.root=images",
    "--data.image_size=16",
    "--data.resize_size=null",
    "--data.num_workers=0",
    "--data.persistent_workers=false",
    "--trainer.max_epochs=2",
    "--trainer.enable_progress_bar=false",
    "--pretrain.epochs=2",
    "--qat.freeze_bn_after=1",
    "--qat.freeze_observers_after=1",
    "--qat.max_metric_drop=null",
    "--qat.latency_repeats=2",
]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    load_example("digits_to_folders").main(str(root / "images"))
    # the "pretrained" ImageNet weights, where torchvision's cache keeps them (the test's own: no download here)
    (root / "torch_home" / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(
        torchvision.models.resnet18(num_classes=1000).state_dict(),
        root / "torch_home" / "hub" / "checkpoints" / "resnet18-f37072fd.pth",
    )
    return root


def _recipe(root, *args):
    env = subprocess_env(TORCH_HOME=str(root / "torch_home"))
    cmd = [sys.executable, "-m", "lightning_qat", "fit", f"--config={RECIPE}", *RECIPE_TINY, *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env, timeout=900)


def test_the_image_folder_recipe_fine_tunes_pretrained_weights_to_int8(image_folder):
    result = _recipe(image_folder, "--model.num_classes=10")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "re-initialised for num_classes=10" in result.stderr + result.stdout  # the ImageNet head was replaced
    report = json.loads((image_folder / "outputs" / "qat" / "version_0" / "qat_report.json").read_text())
    assert report["metrics"]["int8"]["val_acc"] > 0.5  # 10 classes: chance is 0.1
    assert report["status"] == "complete"


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--data.root=nowhere", "--model.num_classes=10"], "No train folder at nowhere/train"),
        (["--model.num_classes=7"], "the data has 10 classes but --model.num_classes=7"),
        (["--model.num_classes=10", "--model.arch=resnet34"], "needs resnet34-b627a593.pth"),
    ],
    ids=["bad folder", "class count", "missing weights"],
)
def test_the_image_folder_recipe_errors_are_one_line_before_any_work(image_folder, args, named):
    before = set((image_folder / "outputs").rglob("*")) if (image_folder / "outputs").exists() else set()
    result = _recipe(image_folder, *args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1
    assert named in error_lines[0]
    after = set((image_folder / "outputs").rglob("*")) if (image_folder / "outputs").exists() else set()
    assert after == before


def test_cli_convert_with_another_skip_than_the_checkpoint_is_one_error_line(tmp_path):
    fit = _cli(tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    (ckpt,) = (tmp_path / "outputs" / "qat" / "version_0" / "checkpoints").glob("*.ckpt")
    result = _sub(tmp_path, "convert", f"--ckpt_path={ckpt}", "--qat.skip=[classifier]")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: CheckpointError: This checkpoint was QAT-prepared with skip=[], but the QATCallback now has "
        "skip=['classifier']. Resume with the same skip, or start a new fit from the float weights."
    ]
