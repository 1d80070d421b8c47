"""lightning-qat benchmarks, side by side in one process: int8 speed and size, QAT step overhead, digits accuracy.

    python -m benchmarks.run --quick          # smoke test: tiny sizes, a minute (the test suite runs it)
    python -m benchmarks.run                  # full: the README's "Performance" table (~15 min on 2 cores)

Prints a markdown report and writes it to ``--out``. Every speed number is a median over repeated runs with
warm-up excluded and threads pinned with ``torch.set_num_threads``; the variants of one row are measured
interleaved on the same batch. "hand" is torchvision's recipe written by hand: its quantizable model,
``fuse_model(is_qat=True)`` + ``prepare_qat`` + ``convert``. Random tensors for speed, digits for accuracy.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import itertools
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.runtimes import PATHS, pinned_threads, runtimes
from lightning_qat import QATCallback, load_quantized
from lightning_qat.app.cli import main as cli_main
from lightning_qat.export.torchscript import save_torchscript, to_torchscript
from lightning_qat.quantization import ao
from lightning_qat.quantization.backends import TORCH_BACKENDS, default_backend
from lightning_qat.quantization.convert import to_int8
from lightning_qat.quantization.measure import measure_latency, serialized_size
from lightning_qat.quantization.prepare import prepare_model


@dataclass(frozen=True)
class Sizes:
    """What one mode measures."""

    latency_models: tuple[str, ...]
    backends: tuple[str, ...]
    batches: tuple[int, ...]
    threads: tuple[int, ...]
    image: int
    repeats: int
    step_models: tuple[str, ...]
    step_batch: int
    step_image: int
    step_repeats: int
    accuracy: tuple[tuple[str, list[str]], ...]
    runtime_models: tuple[str, ...]
    runtime_batches: tuple[int, ...]
    runtime_image: int
    runtime_repeats: int


QUICK_RUN = ["--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2", "--trainer.max_epochs=1"]
QUICK = Sizes(
    latency_models=("resnet18",),
    backends=TORCH_BACKENDS,
    batches=(1, 4),
    threads=(1,),
    image=32,
    repeats=3,
    step_models=("resnet18",),
    step_batch=4,
    step_image=32,
    step_repeats=3,
    accuracy=(("resnet18", ["--data.image_size=16", "--pretrain.epochs=1", *QUICK_RUN]),),
    runtime_models=("resnet18",),
    runtime_batches=(1, 4),
    runtime_image=32,
    runtime_repeats=3,
)
FULL = Sizes(
    latency_models=("resnet18", "mobilenet_v2", "resnet50"),
    backends=TORCH_BACKENDS,
    batches=(1, 32),
    threads=(1, 2),
    image=224,
    repeats=7,
    step_models=("resnet18", "mobilenet_v2"),
    step_batch=32,
    step_image=112,
    step_repeats=10,
    accuracy=(
        ("resnet18", ["--config=configs/digits_resnet18.yaml"]),
        ("mobilenet_v2 (width 0.5)", ["--config=configs/digits_mobilenet_v2.yaml"]),
    ),
    runtime_models=("resnet18", "mobilenet_v2"),
    runtime_batches=(1, 32),
    runtime_image=224,
    runtime_repeats=9,
)


# ---------------------------------------------------------------------------------------------- the two int8 paths
def ours_int8(
    arch: str, backend: str, image: int, workdir: Path, relu6_to_relu: bool = True
) -> tuple[nn.Module, nn.Module, Path]:
    """The callback's path: prepare (FX), observe a few batches, convert, save the artifact and load it back.

    ``relu6_to_relu`` as the hand recipe's quantizable MobileNet does (no effect on ResNets).
    """
    torch.manual_seed(0)
    example = (torch.randn(1, 3, image, image),)
    network = torchvision.models.get_model(arch, weights=None)
    prepared = prepare_model(network, backend, "auto", [], example, relu6_to_relu=relu6_to_relu)
    _observe(prepared.module)
    int8 = to_int8(prepared.module, prepared.mode, backend, example)
    path = save_torchscript(int8, workdir / f"{arch}_{backend}_{relu6_to_relu}.pt", backend, example)
    return int8, load_quantized(path), path


def hand_qat_model(arch: str, backend: str) -> nn.Module:
    """torchvision's recipe: quantizable model, fuse_model(is_qat=True), qconfig, prepare_qat."""
    torch.manual_seed(0)
    model = getattr(torchvision.models.quantization, arch)(weights=None, quantize=False).train()
    with ao.quiet():
        model.fuse_model(is_qat=True)
        model.qconfig = torch.ao.quantization.get_default_qat_qconfig(backend)
        torch.ao.quantization.prepare_qat(model, inplace=True)
    return model


def hand_int8(arch: str, backend: str, image: int) -> nn.Module:
    model = hand_qat_model(arch, backend)
    _observe(model, image)
    with ao.quiet(), ao.engine(backend):
        return torch.ao.quantization.convert(model.eval())


def _observe(model: nn.Module, image: int | None = None) -> None:
    size = image or 64
    model.train()
    with torch.no_grad(), ao.quiet():
        for _ in range(2):
            model(torch.randn(4, 3, size, size))


# ---------------------------------------------------------------------------------------------- sections
def latency_and_size(sizes: Sizes, workdir: Path) -> tuple[list[str], list[str], dict]:
    latency = [
        "| model | backend | batch | threads | fp32 ms | ours int8 ms | hand int8 ms | int8 speedup "
        "| ours / hand speed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    size_rows = [
        "| model | fp32 MB | ours int8 MB | ratio | artifact MB | hand int8 MB | hand ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    fastest: dict[tuple[str, int, int], dict[str, float]] = {}
    for arch in sizes.latency_models:
        torch.manual_seed(0)
        fp32 = torchvision.models.get_model(arch, weights=None).eval()
        variants = [(arch, backend, True) for backend in sizes.backends]
        if any(isinstance(m, nn.ReLU6) for m in fp32.modules()):
            variants.insert(1, (f"{arch}, ReLU6 kept", sizes.backends[0], False))
        for label, backend, relu6_to_relu in variants:
            int8, artifact, path = ours_int8(arch, backend, sizes.image, workdir, relu6_to_relu)
            hand = hand_int8(arch, backend, sizes.image)
            if backend == sizes.backends[0]:
                float_mb, ours_mb, hand_mb = (serialized_size(m) / 2**20 for m in (fp32, int8, hand))
                size_rows.append(
                    f"| {label} | {float_mb:.2f} | {ours_mb:.2f} | {float_mb / ours_mb:.2f}x | "
                    f"{path.stat().st_size / 2**20:.2f} | {hand_mb:.2f} | {float_mb / hand_mb:.2f}x |"
                )
            # timed traced and frozen, as our artifact is: the ratio compares conversions, not runtimes
            hand = to_torchscript(hand, backend, (torch.randn(1, 3, sizes.image, sizes.image),))
            for batch in sizes.batches:
                x = (torch.randn(batch, 3, sizes.image, sizes.image),)
                for threads in sizes.threads:
                    with pinned_threads(threads):
                        ms = measure_latency(
                            {"fp32": fp32, "ours": artifact, "hand": hand}, x, backend, repeats=sizes.repeats, warmup=2
                        )
                    if relu6_to_relu:
                        fastest.setdefault((arch, batch, threads), {})[backend] = ms["ours"]
                    latency.append(
                        f"| {label} | {backend} | {batch} | {threads} | {ms['fp32']:.2f} | {ms['ours']:.2f} | "
                        f"{ms['hand']:.2f} | {ms['fp32'] / ms['ours']:.2f}x | {ms['hand'] / ms['ours']:.2f}x |"
                    )
                    print(latency[-1], flush=True)
    return latency, size_rows, fastest


class _Classifier(pl.LightningModule):
    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.network(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-4, momentum=0.9)


class _StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._start)


def _lightning_step_ms(network: nn.Module, data: TensorDataset, batch: int, callbacks: list, warmup: int) -> float:
    timer = _StepTimer()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*callbacks, timer],
        default_root_dir=tempfile.mkdtemp(),
    )
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.fit(_Classifier(network), DataLoader(data, batch_size=batch))
    return statistics.median(timer.times[warmup:]) * 1e3


def plain_steps_ms(
    networks: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor, repeats: int, logits: Callable = lambda o: o
) -> dict:
    """Forward + backward + SGD step of each network, interleaved, median ms (``logits``: of a network's output)."""
    optimizers = {n: torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9) for n, m in networks.items()}
    times: dict[str, list[float]] = {n: [] for n in networks}
    with ao.quiet():
        for i in range(repeats + 2):
            for name, model in networks.items():
                inputs = x.contiguous(memory_format=torch.channels_last) if "channels_last" in name else x
                start = time.perf_counter()
                optimizers[name].zero_grad(set_to_none=True)
                nn.functional.cross_entropy(logits(model(inputs)), y).backward()
                optimizers[name].step()
                if i >= 2:
                    times[name].append((time.perf_counter() - start) * 1e3)
    return {n: statistics.median(t) for n, t in times.items()}


def step_overhead(sizes: Sizes) -> list[str]:
    rows = [
        "| model | threads | fp32 step ms | QATCallback (Lightning) / fp32 (Lightning) | ours / hand recipe "
        "| ours / fp32 | the same, torch's Conv-BN forward / fp32 | ours, observers frozen / fp32 "
        "| ours, observers+BN frozen / fp32 | the same, torch's Conv-BN forward / fp32 | ours channels_last / fp32 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    b, s = sizes.step_batch, sizes.step_image
    for arch, threads in itertools.product(sizes.step_models, sorted({1, max(sizes.threads)})):
        torch.manual_seed(0)
        x, y = torch.randn(b, 3, s, s), torch.randint(0, 1000, (b,))
        fp32 = torchvision.models.get_model(arch, weights=None).train()
        example = (x[:1],)
        ours = prepare_model(copy.deepcopy(fp32), "x86", "auto", [], example, relu6_to_relu=True).module.train()
        learning = copy.deepcopy(ours)  # BatchNorm learning: torch's output-sized division (ao.conv_bn)
        ao.unfold_batch_norm(learning)
        observed = copy.deepcopy(ours)
        ao.set_observers(observed, False)
        frozen = copy.deepcopy(observed)
        ao.freeze_bn_stats(frozen)
        unfolded = copy.deepcopy(frozen)  # the division and BatchNorm after each frozen Conv-BN (ao.conv_bn)
        ao.unfold_batch_norm(unfolded)
        channels_last = copy.deepcopy(ours).to(memory_format=torch.channels_last)
        hand = hand_qat_model(arch, "x86")
        with pinned_threads(threads):
            plain = plain_steps_ms(
                {
                    "fp32": fp32,
                    "ours": ours,
                    "hand": hand,
                    "learning": learning,
                    "observed": observed,
                    "frozen": frozen,
                    "unfolded": unfolded,
                    "ours channels_last": channels_last,
                },
                x,
                y,
                sizes.step_repeats,
            )
            data = TensorDataset(
                torch.randn(b * (sizes.step_repeats + 2), 3, s, s),
                torch.randint(0, 1000, (b * (sizes.step_repeats + 2),)),
            )
            lightning_fp32 = _lightning_step_ms(copy.deepcopy(fp32), data, b, [], warmup=2)
            qat = QATCallback(
                relu6_to_relu=True,
                freeze_bn_after=None,
                freeze_observers_after=None,
                evaluate=None,
                export=[],
                latency_repeats=1,
            )
            lightning_qat = _lightning_step_ms(copy.deepcopy(fp32), data, b, [qat], warmup=2)
        rows.append(
            f"| {arch} ({b}x3x{s}x{s}) | {threads} | {plain['fp32']:.1f} | {lightning_qat / lightning_fp32:.2f}x | "
            f"{plain['ours'] / plain['hand']:.2f}x | {plain['ours'] / plain['fp32']:.2f}x | "
            f"{plain['learning'] / plain['fp32']:.2f}x | {plain['observed'] / plain['fp32']:.2f}x | "
            f"{plain['frozen'] / plain['fp32']:.2f}x | {plain['unfolded'] / plain['fp32']:.2f}x | "
            f"{plain['ours channels_last'] / plain['fp32']:.2f}x |"
        )
        print(rows[-1], flush=True)
    return rows


def accuracy(sizes: Sizes, workdir: Path) -> list[str]:
    rows = [
        "| model (digits, 32x32) | float val acc | PTQ int8 | QAT int8 | QAT int8 - float (points) | "
        "QAT int8 - PTQ (points) | size ratio | int8 speedup | fit end -> report (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, (name, args) in enumerate(sizes.accuracy):
        root = workdir / f"accuracy{i}"
        common = [
            f"--trainer.default_root_dir={root}",
            "--trainer.enable_progress_bar=false",
            "--qat.ptq_baseline=true",
        ]
        with contextlib.redirect_stdout(io.StringIO()):
            cli_main(["fit", *args, *common])
        report = json.loads(next(root.rglob("qat_report.json")).read_text())
        acc = {row: m["val_acc"] for row, m in report["metrics"].items()}
        size = report["size_bytes"]["float"] / report["size_bytes"]["int8"]
        speed = report["latency_ms"]["float"] / report["latency_ms"]["int8"]
        rows.append(
            f"| {name} | {acc['float']:.2%} | {acc['ptq']:.2%} | {acc['int8']:.2%} | "
            f"{(acc['int8'] - acc['float']) * 100:+.2f} | {(acc['int8'] - acc['ptq']) * 100:+.2f} | {size:.2f}x | "
            f"{speed:.2f}x | {report['seconds']:.1f} |"
        )
        print(rows[-1], flush=True)
    return rows


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _timed(label: str, fn: Callable[[], object]) -> object:
    start = time.perf_counter()
    result = fn()
    print(f"[{label}: {time.perf_counter() - start:.0f} s]", flush=True)
    return result


def run(quick: bool, out: Path) -> str:
    sizes = QUICK if quick else FULL
    torch.set_num_threads(max(sizes.threads))
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        latency, size_rows, fastest = _timed("latency + size", lambda: latency_and_size(sizes, workdir))
        steps = _timed("QAT step overhead", lambda: step_overhead(sizes))
        side_by_side, runtime_sizes, notes = _timed(
            "runtimes side by side",
            lambda: runtimes(
                sizes.runtime_models,
                sizes.runtime_batches,
                1,
                sizes.runtime_image,
                sizes.runtime_repeats,
                workdir,
            ),
        )
        acc = _timed("accuracy", lambda: accuracy(sizes, workdir))
    winners = []
    for (arch, batch, threads), by_backend in fastest.items():
        best = min(by_backend, key=by_backend.get)
        winners.append(f"{arch} b{batch} t{threads}: {best}")
    lines = [
        f"# lightning-qat benchmarks ({'quick' if quick else 'full'} mode)",
        "",
        f"CPU: {_cpu_name()}, {torch.get_num_threads()} threads max; torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}, Lightning {pl.__version__}; input {sizes.image}x{sizes.image} "
        "random tensors for speed, scikit-learn digits for accuracy.",
        "",
        f"## Deployment runtimes side by side (median ms per batch, 1 thread, {sizes.runtime_image}x"
        f"{sizes.runtime_image}; in parentheses: int8 / fp32 eager, lower is better)",
        "",
        *side_by_side,
        "",
        "Artifact size on disk:",
        "",
        *runtime_sizes,
        "",
        *([f"Not run: {'; '.join(f'{k}: {v}' for k, v in notes.items())}.", ""] if notes else []),
        "What each column runs: " + "; ".join(name for name, _ in PATHS) + " (see benchmarks/runtimes.py).",
        "",
        "## int8 backends vs fp32 CPU latency (median ms per batch; ours = the callback's TorchScript artifact, "
        "hand = torchvision's recipe traced and frozen the same way)",
        "",
        *latency,
        "",
        f"Default backend here: `{default_backend()}`. Fastest int8 backend per row: {', '.join(winners)}.",
        "",
        "## Size (serialized state_dict)",
        "",
        *size_rows,
        "",
        "## QAT training-step overhead (forward + backward + SGD step, median; x86; ReLU6 -> ReLU as the recipe)",
        "",
        *steps,
        "",
        "## Accuracy on digits (the shipped configs; float pre-training then QAT; same seed)",
        "",
        *acc,
        "",
    ]
    text = "\n".join(lines)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of every section")
    parser.add_argument("--out", type=Path, default=None, help="markdown file (default benchmarks/results[_quick].md)")
    args = parser.parse_args()
    default = Path(__file__).with_name("results_quick.md" if args.quick else "results.md")
    run(args.quick, args.out or default)


if __name__ == "__main__":
    main()
