"""A 2-process CPU DDP QAT fit (gloo), run by test_ddp.py as a script: Lightning relaunches it once per rank.

Usage: python ddp_job.py FLOAT_STATE_DICT OUT_DIR [JSON {"qat": QATCallback kwargs, "trainer": Trainer kwargs,
"ddp": DDPStrategy kwargs}]
The trainer's accelerator, devices and strategy and the callback's DDP settings come from configs/ddp_cpu.yaml, the
config users run (`lightning-qat fit --config configs/ddp_cpu.yaml`), so the test runs what ships.
Every rank writes OUT_DIR/rank<k>.json: its qparams and BatchNorm statistics, the global step at which BN and
observers froze, the report.
"""

import faulthandler
import json
import math
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import yaml
from conftest import BoringClassifier, TinyNet, trainer_kwargs, with_outlier_channels
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy

from lightning_qat import FinishPipeline, QATCallback
from lightning_qat.app.data import DigitsDataModule
from lightning_qat.lightning import speed
from lightning_qat.quantization import ao

faulthandler.dump_traceback_later(240, exit=True)
speed.FLOOR_MS = math.inf  # the graph of conftest's one_graph_on_any_cpu: the same on any CPU, busy or not
CONFIG = Path(__file__).parents[1] / "configs" / "ddp_cpu.yaml"


class DiskFailure(FinishPipeline):
    def write_artifact(self, report, out_dir):
        raise OSError("simulated disk failure on rank 0")


class FailingOnRank0(QATCallback):
    """Fails at the end of fit on global rank 0 only, after the preflight passed on every rank."""

    pipeline_class = DiskFailure


class FreezeRecorder(Callback):
    """Global step at which each rank first trained with BN / observers frozen."""

    def __init__(self, qat: QATCallback) -> None:
        self.qat = qat
        self.steps: dict[str, int] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        for name, frozen in (("bn", self.qat.freezing.bn_frozen), ("observers", self.qat.freezing.observers_frozen)):
            if frozen and name not in self.steps:
                self.steps[name] = trainer.global_step


def main() -> None:
    state_path, out_dir = sys.argv[1], Path(sys.argv[2])
    extra = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    pl.seed_everything(0)
    net = TinyNet()
    net.load_state_dict(torch.load(state_path, weights_only=True))
    model = BoringClassifier(net)
    if extra.get("outlier"):  # a damaged quantizer, and QAT training only BatchNorm statistics (test_finish.py's)
        with_outlier_channels(model)
        model.lr = 0.0
    config = yaml.safe_load(CONFIG.read_text())
    qat_kwargs = dict(freeze_bn_after=1, freeze_observers_after=2, latency_repeats=2) | config["qat"]
    callback_class = FailingOnRank0 if extra.get("fail_on_rank0") else QATCallback
    qat = callback_class(**qat_kwargs | extra.get("qat", {}))
    recorder = FreezeRecorder(qat)
    shipped = {key: config["trainer"][key] for key in ("accelerator", "devices", "strategy")}
    if extra.get("ddp"):
        shipped["strategy"] = DDPStrategy(**extra["ddp"])
    trainer = pl.Trainer(
        **trainer_kwargs(out_dir, max_epochs=3, callbacks=[qat, recorder])
        | shipped
        | {"logger": CSVLogger(out_dir, name="logs")}
        | extra.get("trainer", {})
    )
    trainer.fit(model, datamodule=DigitsDataModule(image_size=8, channels=1, batch_size=32))
    qparams = {name: [fq.scale.tolist(), fq.zero_point.tolist()] for name, fq in ao.fake_quant_modules(model.net)}
    result = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "qparams": qparams,
        "batch_norm": {  # frozen at epoch 1 (freeze_bn_after=1): what every rank trained with from then on
            name: [m.running_mean.tolist(), m.running_var.tolist()]
            for name, m in model.net.named_modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        },
        "freeze_steps": recorder.steps,
        "global_step": trainer.global_step,
        "report": qat.report.to_dict() if qat.report else None,
        "has_int8_model": qat.quantized_model is not None,
        "strategy": type(trainer.strategy).__name__,
        "fallback": qat.budget.fallback,
        "fake_quant_off": sorted(name for name, fq in ao.fake_quant_modules(model.net) if not fq.fake_quant_enabled[0]),
    }
    (out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))
    # As torch asks of every DDP script (Lightning keeps the group alive): without it, gloo's threads can abort the
    # process at interpreter exit ("terminate called without an active exception", seen once in CI on torch 2.4.1).
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
