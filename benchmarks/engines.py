"""The two engines side by side: torch.ao FX + TorchScript artifact vs torchao PT2E + AOTInductor package.

    python -m benchmarks.engines            # resnet18, mobilenet_v2, a ViT-Tiny-sized ViT
    python -m benchmarks.engines --quick    # resnet18, a few steps: a smoke test

Digits at 32x32 (3 channels), random weights, ``--steps`` float steps, then from that same float start ``--steps``
QAT steps on each engine (same batches; BatchNorm frozen at 60%, observers at 80%). Accuracy: the int8 network of
each engine on the 397 held-out digits. Latency: median of interleaved runs at 1 thread, fp32 eager vs each artifact
as loaded, at batch 1 and 32: the PT2E package that ships (one, for any batch size), and beside it one compiled for
each batch size alone (static shapes, what the package is when the dynamic compile is refused). Sizes: the files; the
float network's saved ``state_dict``. Compile: seconds to write the artifact (TorchScript trace + freeze; AOTInductor
with its checks).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

from benchmarks.runtimes import pinned_threads
from benchmarks.zoo import _predict, digits, write_table
from lightning_qat import load_quantized
from lightning_qat.export.aoti import save_pt2
from lightning_qat.export.torchscript import save_torchscript
from lightning_qat.quantization import ao, pt2e
from lightning_qat.quantization.convert import to_int8
from lightning_qat.quantization.measure import measure_latency, serialized_size
from lightning_qat.quantization.prepare import freeze_batch_norm, prepare_model

IMAGE = 32
NETWORKS: dict[str, Callable[[], nn.Module]] = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=10),
    "ViT-Tiny size (12x192, patch 4)": lambda: torchvision.models.VisionTransformer(
        image_size=IMAGE, patch_size=4, num_layers=12, num_heads=3, hidden_dim=192, mlp_dim=768, num_classes=10
    ),
}
QUICK = ("resnet18",)


def train(net: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, qat: bool) -> None:
    """``steps`` Adam steps on random batches of 32 (the same batches for every call); QAT freezes as the callback."""
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)
    net.train()
    for step in range(steps):
        if qat and step == int(0.6 * steps):
            freeze_batch_norm(net)
        if qat and step == int(0.8 * steps):
            ao.set_observers(net, False)
        batch = torch.randint(0, len(x), (32,), generator=generator)
        loss = nn.functional.cross_entropy(net(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def row(name: str, steps: int, repeats: int, workdir: Path) -> list[str]:
    """Two table rows (accuracy and sizes; latency) for one network."""
    torch.manual_seed(0)
    x, y, x_val, y_val = digits(IMAGE)
    net = NETWORKS[name]()
    for module in net.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = 0.1
    train(net, x, y, steps, qat=False)
    fp32 = copy.deepcopy(net).eval()
    accuracy = {"fp32": (_predict(fp32, x_val) == y_val).float().mean().item()}
    artifacts: dict[str, nn.Module] = {}
    sizes = {"fp32": serialized_size(fp32)}
    compile_s: dict[str, float] = {}
    for engine in ("fx", "pt2e"):
        prepared = prepare_model(copy.deepcopy(fp32).train(), "x86", engine, [], (x[:32],))
        train(prepared.module, x, y, steps, qat=True)
        qat = prepared.module.eval()
        int8 = to_int8(qat, prepared.mode, "x86", (x[:32],))
        accuracy[engine] = (_predict(int8, x_val) == y_val).float().mean().item()
        start = time.perf_counter()
        if engine == "fx":
            path = save_torchscript(int8, workdir / f"{name[:8]}.pt", "x86", (x_val[:32],))
        else:  # what ships: one package for any batch size, compiled from the example batch of 32
            package = save_pt2(int8, workdir / f"{name[:8]}.pt2", (x_val[:32],))
            assert not package.static, package.static
            path = package.path
            for batch in (1, 32):  # beside it, a package compiled for each batch size alone
                begin = time.perf_counter()
                fixed = save_pt2(int8, workdir / f"{name[:8]}_b{batch}.pt2", (x_val[:batch],), any_batch=False).path
                compile_s[f"static b{batch}"] = time.perf_counter() - begin
                artifacts[f"static b{batch}"] = load_quantized(fixed)
                sizes["static"] = fixed.stat().st_size
        compile_s[engine] = time.perf_counter() - start - sum(compile_s.get(f"static b{b}", 0.0) for b in (1, 32))
        artifacts[engine] = load_quantized(path)
        sizes[engine] = path.stat().st_size
    latency = {}
    for batch in (1, 32):
        with pinned_threads(1):
            networks = {key: artifacts[key] for key in ("fx", "pt2e", f"static b{batch}")}
            latency[batch] = measure_latency({"fp32": fp32, **networks}, (x_val[:batch],), "x86", repeats)
            latency[batch]["static"] = latency[batch].pop(f"static b{batch}")
    mb = {key: value / 1e6 for key, value in sizes.items()}
    cells = [
        f"| {name} | {accuracy['fp32']:.1%} | {accuracy['fx']:.1%} | {accuracy['pt2e']:.1%} | "
        f"{mb['fp32']:.1f} | {mb['fx']:.1f} | {mb['pt2e']:.1f} / {mb['static']:.1f} | "
        f"{compile_s['fx']:.1f} / {compile_s['pt2e']:.0f} / {compile_s['static b1']:.0f} | "
        + " | ".join(
            f"{latency[b]['fp32']:.2f} / {latency[b]['fx']:.2f} / {latency[b]['pt2e']:.2f} / "
            f"{latency[b]['static']:.2f} ({latency[b]['fx'] / latency[b]['pt2e']:.2f}x)"
            for b in (1, 32)
        )
        + " |"
    ]
    print(cells[0], flush=True)
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="resnet18, a few steps: a smoke test")
    parser.add_argument("--steps", type=int, default=150, help="float steps, then as many QAT steps per engine")
    parser.add_argument("--out", type=Path, default=None, help="markdown file (default benchmarks/engines.md)")
    args = parser.parse_args()
    pt2e.require("benchmarks.engines")
    lines = [
        "| network | digits accuracy fp32 | int8 FX | int8 PT2E | MB fp32 | MB TorchScript | MB .pt2 any batch / "
        "static | compile s TorchScript / .pt2 any batch / static | ms 1 thread b1: fp32 / TorchScript / .pt2 any "
        "batch / .pt2 static (TorchScript / .pt2 any batch) | ms 1 thread b32 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for name in NETWORKS:
            if not args.quick or name in QUICK:
                lines += row(name, 4 if args.quick else args.steps, 3 if args.quick else 30, Path(tmp))
    out = args.out or Path(__file__).with_name("engines_quick.md" if args.quick else "engines.md")
    import torchao

    intro = (
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, torchao {torchao.__version__}; x86 "
        f"backend; digits at {IMAGE}x{IMAGE}; {torch.get_num_threads()} cores here, latency at 1 thread."
    )
    write_table(out, f"FX vs PT2E engine ({'quick' if args.quick else 'full'} mode)", intro, lines)


if __name__ == "__main__":
    main()
