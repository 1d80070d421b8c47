"""The phone engine side by side with the x86 one: XNNPACK ``.pte`` in ExecuTorch vs FX TorchScript vs float eager.

    python -m benchmarks.phones            # resnet18, mobilenet_v2, timm mobilenetv3 / regnety, a ViT
    python -m benchmarks.phones --quick    # resnet18, a few steps: a smoke test

Accuracy: digits at 32x32 (3 channels), random weights, ``--steps`` float steps, then from that float start as many
QAT steps on each engine (same batches; BatchNorm frozen at 60%, observers at 80%): the ``.pte`` run in ExecuTorch's
runtime on the 397 held-out digits, and its agreement with the QAT network it came from. Delegation: operators in the
XNNPACK delegate over all operators with arithmetic. Latency: median of interleaved runs at batch 1 of the float
network (eager), our x86 TorchScript artifact and the ``.pte``, at 1 and 2 threads (torch's and ExecuTorch's pools
alike); for resnet18 and mobilenet_v2 also at 224x224 (random weights, calibrated on random images, not trained).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
import torchvision
from torch import nn

from benchmarks.engines import train
from benchmarks.runtimes import pinned_threads
from benchmarks.zoo import _predict, digits, write_table
from lightning_qat.export.pte import PteNetwork, save_pte
from lightning_qat.export.torchscript import load_quantized, save_torchscript
from lightning_qat.quantization import xnnpack
from lightning_qat.quantization.convert import to_int8
from lightning_qat.quantization.measure import measure_latency, serialized_size
from lightning_qat.quantization.prepare import prepare_model

IMAGE = 32
NETWORKS: dict[str, Callable[[], nn.Module]] = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=10),
    "timm mobilenetv3_small_100": lambda: timm.create_model("mobilenetv3_small_100", num_classes=10),
    "timm regnety_002": lambda: timm.create_model("regnety_002", num_classes=10),
    "ViT (6x192, patch 4)": lambda: torchvision.models.VisionTransformer(
        image_size=IMAGE, patch_size=4, num_layers=6, num_heads=3, hidden_dim=192, mlp_dim=768, num_classes=10
    ),
}
LARGE = ("resnet18", "mobilenet_v2")  # also timed at 224x224
QUICK = ("resnet18",)
NOTES = (
    "2 threads: torch's OpenMP pool and ExecuTorch's thread pool each have 2 threads in one process, and the "
    "interleaved runs make them wait for each other (torch's 32 px times at 2 threads are slower than at 1); the "
    "1-thread columns are the comparison. With a pool of 2, ExecuTorch's XNNPACK used one core for resnet18 at 224 px "
    "(user CPU time equal to the wall time) and two for mobilenet_v2; not investigated further.",
    "Outside the delegate in the ViT: its LayerNorms and the attention's mask handling (nn.MultiheadAttention's "
    "key-padding checks), run by ExecuTorch's portable float kernels: why its .pte is slower than TorchScript.",
)


def artifacts(
    net: nn.Module, x: torch.Tensor, y: torch.Tensor | None, steps: int, example: torch.Tensor, workdir: Path
) -> tuple[dict[str, nn.Module], dict[str, float], dict[str, nn.Module], Any]:
    """The x86 TorchScript artifact and the ``.pte`` of ``net`` (QAT-trained on ``x, y``, or calibrated on ``x``)."""
    loaded, sizes, qat = {}, {}, {}
    program = None
    for backend in ("x86", "xnnpack"):
        captured = example.repeat(2, 1, 1, 1) if len(example) == 1 else example  # a batch of 1 is captured static
        prepared = prepare_model(copy.deepcopy(net).train(), backend, "auto", [], (captured,), qat=y is not None)
        if y is not None:
            train(prepared.module, x, y, steps, qat=True)
        else:
            with torch.no_grad():
                for batch in x.split(8):
                    prepared.module(batch)
        qat[backend] = prepared.module.eval()
        int8 = to_int8(qat[backend], prepared.mode, backend, (example,))
        if backend == "x86":
            path = save_torchscript(int8, workdir / "model.pt", "x86", (example,))
            loaded["torchscript"] = load_quantized(path)
        else:
            program = save_pte(int8, workdir / "model.pte", (example,))
            path = program.path
        sizes[backend] = path.stat().st_size / 1e6
    return loaded, sizes, qat, program


def latency(float_net: nn.Module, torchscript: nn.Module, pte: Path, x: torch.Tensor, repeats: int) -> list[str]:
    """``float / TorchScript / .pte ms (pte speed-up over TorchScript)`` at batch 1, 1 then 2 threads."""
    cells = []
    for threads in (1, 2):
        with pinned_threads(threads):
            program = PteNetwork(pte, threads=threads)
            ms = measure_latency({"fp32": float_net, "ts": torchscript, "pte": program}, (x[:1],), "x86", repeats)
        cells.append(f"{ms['fp32']:.2f} / {ms['ts']:.2f} / {ms['pte']:.2f} ({ms['ts'] / ms['pte']:.2f}x)")
    return cells


def row(name: str, steps: int, repeats: int, workdir: Path) -> str:
    """One table row: train float, QAT on both engines, convert, write, reload, compare and time."""
    torch.manual_seed(0)
    x, y, x_val, y_val = digits(IMAGE)
    net = NETWORKS[name]()
    train(net, x, y, steps, qat=False)
    fp32 = copy.deepcopy(net).eval()
    loaded, sizes, qat, program = artifacts(fp32, x, y, steps, x_val[:32], workdir)
    pte = PteNetwork(program.path)
    accuracy = {
        "fp32": (_predict(fp32, x_val) == y_val).float().mean().item(),
        "qat": (_predict(qat["xnnpack"], x_val) == y_val).float().mean().item(),
        "pte": (_predict(pte, x_val) == y_val).float().mean().item(),
        "ts": (_predict(loaded["torchscript"], x_val) == y_val).float().mean().item(),
    }
    agreement = (_predict(pte, x_val) == _predict(qat["xnnpack"], x_val)).float().mean().item()
    cells = latency(fp32, loaded["torchscript"], program.path, x_val, repeats)
    large = ["-", "-"]
    if name in LARGE:
        big = torch.randn(16, 3, 224, 224)
        random_net = NETWORKS[name]().eval()
        ts224, _, _, pte224 = artifacts(random_net, big, None, 0, big[:1], workdir / "224")
        if pte224.static:
            print(f"{name} at 224 px: a program for batch 1 only ({pte224.static})", flush=True)
        large = latency(random_net, ts224["torchscript"], pte224.path, big, max(3, repeats // 3))
    outside = ", ".join(f"{k} x{n}" for k, n in program.outside.items()) or "none"
    line = (
        f"| {name} | {accuracy['fp32']:.1%} / {accuracy['qat']:.1%} / {accuracy['pte']:.1%} ({accuracy['ts']:.1%}) | "
        f"{agreement:.1%} | {serialized_size(fp32) / 1e6:.1f} / {sizes['x86']:.1f} / {sizes['xnnpack']:.1f} | "
        f"{program.share:.0%} ({outside}) | {cells[0]} | {cells[1]} | {large[0]} | {large[1]} |"
    )
    print(line, flush=True)
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="resnet18, a few steps: a smoke test")
    parser.add_argument("--steps", type=int, default=150, help="float steps, then as many QAT steps per engine")
    parser.add_argument("--out", type=Path, default=None, help="markdown file (default benchmarks/phones.md)")
    args = parser.parse_args()
    xnnpack.require("benchmarks.phones")
    lines = [
        "| network | digits accuracy fp32 / QAT / .pte (x86 TorchScript) | .pte agrees with QAT | MB fp32 / "
        "TorchScript / .pte | in the XNNPACK delegate (outside it) | ms b1 1 thread: fp32 / TorchScript / .pte "
        "(.pte over TorchScript) | 2 threads | 224 px, 1 thread | 224 px, 2 threads |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for name in NETWORKS:
            if not args.quick or name in QUICK:
                (Path(tmp) / "224").mkdir(exist_ok=True)
                lines.append(row(name, 4 if args.quick else args.steps, 3 if args.quick else 30, Path(tmp)))
    out = args.out or Path(__file__).with_name("phones_quick.md" if args.quick else "phones.md")
    import executorch

    intro = (
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, executorch "
        f"{getattr(executorch, '__version__', '1.5')}; digits at {IMAGE}x{IMAGE}; {torch.get_num_threads()} cores "
        "here (x86): the .pte runs XNNPACK's x86 kernels, a phone runs its ARM ones."
    )
    title = f"Phones: XNNPACK .pte vs x86 TorchScript ({'quick' if args.quick else 'full'} mode)"
    write_table(out, title, intro, lines, NOTES)


if __name__ == "__main__":
    main()
