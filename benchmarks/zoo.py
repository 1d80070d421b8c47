"""The model zoo through the callback's path: what fused, what stayed float, int8 speed-up, size, int8-vs-QAT agreement.

    python -m benchmarks.zoo --quick    # smoke test: two networks, a few steps (the test suite runs it)
    python -m benchmarks.zoo            # full: torchvision, timm and segmentation_models_pytorch networks (~20 min)

Every network has random weights (nothing is downloaded) and sees scikit-learn's digits at 64x64 (3 channels): 100
float steps (BatchNorm momentum 0.1 everywhere), then 100 QAT steps (batch 32, Adam) with the BatchNorm and
observer freezes at 60% and 80%, then the int8 TorchScript artifact as ``load_quantized`` loads it. Speed-up: float
eager / artifact, median of interleaved runs, 1 thread. Agreement: the share of validation images (pixels, for
segmentation) where int8 predicts the class QAT predicts; QAT accuracy (pixel accuracy) beside it says whether the
network learned anything to agree on.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from sklearn.datasets import load_digits
from torch import nn

from benchmarks.run import plain_steps_ms
from benchmarks.runtimes import pinned_threads
from lightning_qat import load_quantized
from lightning_qat.export.torchscript import save_torchscript
from lightning_qat.lightning import speed
from lightning_qat.quantization import ao
from lightning_qat.quantization.convert import to_int8
from lightning_qat.quantization.measure import measure_latency, serialized_size
from lightning_qat.quantization.prepare import prepare_model

IMAGE = 64
CLASSES = 10


def _timm(name: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=CLASSES)

    return make


def _smp(arch: str, encoder: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import segmentation_models_pytorch as smp

        return getattr(smp, arch)(encoder_name=encoder, encoder_weights=None, classes=CLASSES + 1)

    return make


def _torchvision(name: str, **kwargs: object) -> Callable[[], nn.Module]:
    return lambda: torchvision.models.get_model(name, weights=None, **kwargs)


def _segmentation(name: str) -> Callable[[], nn.Module]:
    return _torchvision(name, weights_backbone=None, num_classes=CLASSES + 1)


@dataclass(frozen=True)
class Network:
    name: str
    make: Callable[[], nn.Module]
    segmentation: bool = False
    needs: str = ""  # the package it comes from, when not torchvision


NETWORKS = (
    Network("torchvision resnet18", _torchvision("resnet18", num_classes=CLASSES)),
    Network("torchvision mobilenet_v3_large", _torchvision("mobilenet_v3_large", num_classes=CLASSES)),
    Network("torchvision efficientnet_b0", _torchvision("efficientnet_b0", num_classes=CLASSES)),
    Network("timm resnet18", _timm("resnet18"), needs="timm"),
    Network("timm efficientnet_b0", _timm("efficientnet_b0"), needs="timm"),
    Network("timm tf_efficientnet_b0 (same padding)", _timm("tf_efficientnet_b0"), needs="timm"),
    Network("timm mobilenetv3_large_100", _timm("mobilenetv3_large_100"), needs="timm"),
    Network("timm regnety_002", _timm("regnety_002"), needs="timm"),
    Network("timm densenet121", _timm("densenet121"), needs="timm"),
    Network("timm rexnet_100", _timm("rexnet_100"), needs="timm"),  # the held-out network of issue #39
    Network("timm ghostnet_100", _timm("ghostnet_100"), needs="timm"),
    Network("timm lcnet_050", _timm("lcnet_050"), needs="timm"),
    Network("torchvision lraspp_mobilenet_v3_large", _segmentation("lraspp_mobilenet_v3_large"), True),
    Network("torchvision deeplabv3_mobilenet_v3_large", _segmentation("deeplabv3_mobilenet_v3_large"), True),
    Network("smp Unet(resnet18)", _smp("Unet", "resnet18"), True, "segmentation_models_pytorch"),
    Network("smp FPN(mobilenet_v2)", _smp("FPN", "mobilenet_v2"), True, "segmentation_models_pytorch"),
    Network("smp DeepLabV3Plus(resnet18)", _smp("DeepLabV3Plus", "resnet18"), True, "segmentation_models_pytorch"),
)
QUICK = ("torchvision resnet18", "torchvision lraspp_mobilenet_v3_large")


def digits(size: int = IMAGE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train and validation digits, resized to ``size`` and repeated over 3 channels, in [0, 1]."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16
    x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    y = torch.tensor(data.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, val = order[:1400], order[1400:]
    return x[train], y[train], x[val], y[val]


def masks(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Segmentation targets from the digits: pixels brighter than the middle grey take the digit's class (1..10)."""
    return torch.where(x[:, 0] > 0.5, y[:, None, None] + 1, 0)


def _logits(output: object) -> torch.Tensor:
    return output["out"] if isinstance(output, dict) else output  # type: ignore[return-value, index]


def _train(net: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, segmentation: bool, qat: bool) -> None:
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)
    net.train()
    for step in range(steps):
        if qat and step == int(0.6 * steps):
            ao.freeze_bn_stats(net)
        if qat and step == int(0.8 * steps):
            ao.set_observers(net, False)
        batch = torch.randint(0, len(x), (32,), generator=generator)
        target = masks(x[batch], y[batch]) if segmentation else y[batch]
        loss = nn.functional.cross_entropy(_logits(net(x[batch])), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _predict(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), ao.quiet(), ao.engine("x86"):
        return torch.cat([_logits(net(chunk)).argmax(1) for chunk in x.split(100)])


def _qat_int8(
    net: nn.Module, example: tuple, x: torch.Tensor, y: torch.Tensor, steps: int, seg: bool, kept: dict | None = None
) -> tuple:
    """``net`` prepared (``kept`` float; ``None``: the CPU's kernels decide), QAT-trained, and its int8 conversion."""
    prepared = prepare_model(net, "x86", "auto", [], example, kept=kept)
    _train(prepared.module, x, y, steps, seg, qat=True)
    qat = prepared.module.eval()
    return prepared, qat, to_int8(qat, prepared.mode, "x86", example)


def _speedups(fp32: nn.Module, path: Path, x: torch.Tensor, repeats: int) -> list[float]:
    """float eager / int8 artifact at batch 1 and 8, 1 thread, the artifact loaded afresh for each batch.

    A loaded x86 artifact runs fastest at the batch of its first calls, and another small batch then runs slower: timm's
    ghostnet_100 at 64 px ran batch 1 at 2.6x the float speed when batch 1 came first, at 0.42x after batch 8 or 100
    (docs/performance.md). Each batch is timed as a server that runs only it would run it.
    """
    speedups = []
    for batch in (1, 8):
        artifact = load_quantized(path)
        with pinned_threads(1):
            ms = measure_latency({"fp32": fp32.eval(), "int8": artifact}, (x[:batch],), "x86", repeats=repeats)
        speedups.append(ms["fp32"] / ms["int8"])
    return speedups


def _step_ratio(fp32: nn.Module, qat: nn.Module, x: torch.Tensor, y: torch.Tensor, seg: bool, repeats: int) -> float:
    """A QAT step (BatchNorm and observers frozen, as at the fit's end) / a float step, batch 32, 1 thread."""
    target = masks(x[:32], y[:32]) if seg else y[:32]
    with pinned_threads(1):
        ms = plain_steps_ms({"fp32": fp32.train(), "qat": qat.train()}, x[:32], target, repeats, _logits)
    return ms["qat"] / ms["fp32"]


def row(network: Network, steps: int, repeats: int, workdir: Path) -> str:
    """One table row: train float, prepare, train QAT, convert, save, reload, compare and time; then the cost model.

    The cost model (:func:`lightning_qat.lightning.speed.choose`, what ``setup`` runs) times the int8 network at batch
    1; when it keeps layers float, that network is prepared, QAT-trained and timed again ("after").
    """
    torch.manual_seed(0)
    x, y, x_val, y_val = digits()
    net = network.make()
    for module in net.modules():  # torchvision's MobileNetV3s use 0.01: their statistics would not move in time
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = 0.1
    _train(net, x, y, steps, network.segmentation, qat=False)
    fp32 = network.make()
    fp32.load_state_dict(net.state_dict())
    example = (x[:1],)
    prepared, qat, int8 = _qat_int8(copy.deepcopy(fp32), example, x, y, steps, network.segmentation)
    path = save_torchscript(int8, workdir / "zoo.pt", "x86", example)
    qat_pred, int8_pred = _predict(qat, x_val), _predict(load_quantized(path), x_val)
    truth = masks(x_val, y_val) if network.segmentation else y_val
    agreement = (qat_pred == int8_pred).float().mean().item()
    accuracy = (qat_pred == truth).float().mean().item()
    speedups = _speedups(fp32, path, x_val, repeats)
    step = _step_ratio(fp32, qat, x, y, network.segmentation, repeats)

    def again(kept: dict) -> object:
        return prepare_model(copy.deepcopy(fp32), "x86", prepared.mode, [], example, kept=kept)

    with pinned_threads(1):
        chosen = speed.choose(fp32.eval(), int8, again, prepared.kernels, "x86", example, repeats)
    after = "-"
    if chosen.kept:
        kept = prepared.kernels | chosen.kept
        _, qat_after, int8_after = _qat_int8(copy.deepcopy(fp32), example, x, y, steps, network.segmentation, kept)
        after_path = save_torchscript(int8_after, workdir / "after.pt", "x86", example)
        b1, b8 = _speedups(fp32, after_path, x_val, repeats)
        agree = (_predict(qat_after, x_val) == _predict(load_quantized(after_path), x_val)).float().mean().item()
        after = f"{len(chosen.kept)} kept: {b1:.2f}x, {b8:.2f}x, agreement {agree:.1%}"
    elif "kept" in chosen.ms:
        after = "none taken (too little gain)"
    fused = (
        f"{prepared.conv_bn_pairs - len(prepared.conv_bn_unfused)} of {prepared.conv_bn_pairs}"
        if prepared.conv_bn_pairs is not None
        else "not counted (eager)"
    )
    kept = f"{len(prepared.kept_float)}: {next(iter(prepared.kept_float.values()))}" if prepared.kept_float else "-"
    size = serialized_size(fp32) / serialized_size(int8)
    line = (
        f"| {network.name} | {prepared.mode} | {fused} | {kept} | {speedups[0]:.2f}x | {speedups[1]:.2f}x | "
        f"{after} | {step:.2f}x | {size:.2f}x | {agreement:.1%} | {accuracy:.1%} |"
    )
    print(line, flush=True)
    return line


def zoo(quick: bool, steps: int = 100, only: str = "") -> tuple[list[str], list[str]]:
    """The table's lines, and the networks not run (their package is absent); ``only``: names containing it."""
    lines = [
        "| network | mode | Conv-BN pairs fused | kept float (why) | int8 speed-up b1 | b8 | kept float for speed "
        "(setup's cost model): speed-up b1, b8 after | QAT step / float step | size ratio | int8-vs-QAT agreement "
        "| QAT accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    skipped = []
    with tempfile.TemporaryDirectory() as tmp:
        for network in NETWORKS:
            if (quick and network.name not in QUICK) or only not in network.name:
                continue
            if network.needs and importlib.util.find_spec(network.needs) is None:
                skipped.append(f"{network.name} (not installed: {network.needs})")
                continue
            lines.append(row(network, steps=4 if quick else steps, repeats=3 if quick else 15, workdir=Path(tmp)))
    return lines, skipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two networks, a few steps: a smoke test")
    parser.add_argument("--out", type=Path, default=None, help="markdown file (default benchmarks/zoo[_quick].md)")
    parser.add_argument("--steps", type=int, default=100, help="float steps, then as many QAT steps (full mode)")
    parser.add_argument("--only", default="", help="only the networks whose name contains this")
    args = parser.parse_args()
    lines, skipped = zoo(args.quick, args.steps, args.only)
    intro = (
        f"torch {torch.__version__}, torchvision {torchvision.__version__}; x86 backend; digits at {IMAGE}x{IMAGE}; "
        "speed-up: float eager / int8 TorchScript artifact, 1 thread."
    )
    notes = [f"Not run: {'; '.join(skipped)}."] if skipped else []
    out = args.out or Path(__file__).with_name("zoo_quick.md" if args.quick else "zoo.md")
    write_table(
        out, f"The model zoo through lightning-qat ({'quick' if args.quick else 'full'} mode)", intro, lines, notes
    )


def write_table(out: Path, title: str, intro: str, lines: list[str], notes: Sequence[str] = ()) -> None:
    """A benchmark's markdown: title, one intro line, the table, notes; written to ``out`` and printed."""
    text = "\n".join([f"# {title}", "", intro, "", *lines, "", *(f"{note}\n" for note in notes)])
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
