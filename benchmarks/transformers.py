"""Transformers through lightning-qat: parameters left float, size, int8 speed-up (static and dynamic), agreement.

    python -m benchmarks.transformers            # a ViT-Tiny-sized ViT, swin_t, deit_tiny, a text encoder
    python -m benchmarks.transformers --quick    # one small network, a few steps

Digits at 64x64 (3 channels; the text encoder reads the 8x8 pixels as 64 token ids), random weights, ``--steps``
float steps then as many QAT steps, as ``benchmarks.zoo`` trains them. Speed-ups: float eager / int8 TorchScript
artifact, median of interleaved runs, at batch 1 and 8 and 1 and 2 threads; "static" is the artifact with calibrated
activation scales, "dynamic" the one :class:`~lightning_qat.QATCallback` builds with ``activations="dynamic"`` (from
a second QAT run from the same float start that trains the weights' quantization only, as the callback does), and
"torch dynamic" torch's ``quantize_dynamic`` of the float network (Linears only): the peer without training.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

from benchmarks.runtimes import pinned_threads
from benchmarks.zoo import _predict, _train, digits, write_table
from lightning_qat import load_quantized
from lightning_qat.export.torchscript import save_torchscript, to_torchscript
from lightning_qat.quantization import ao
from lightning_qat.quantization.convert import to_int8
from lightning_qat.quantization.dynamic import to_dynamic
from lightning_qat.quantization.measure import float_parameters, measure_latency, serialized_size
from lightning_qat.quantization.prepare import prepare_model


def token_ids(images: torch.Tensor) -> torch.Tensor:
    """The digits' 8x8 pixels as token ids (17 grey levels): (N, 64) int64, made outside the network, as a tokenizer."""
    return (nn.functional.adaptive_avg_pool2d(images[:, :1], 8).flatten(1) * 16).round().clamp(0, 16).long()


class TextEncoder(nn.Module):
    """Token ids through nn.TransformerEncoder: 4 layers, width 128, 4 heads."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(17, 128)
        self.position = nn.Parameter(torch.randn(1, 64, 128) * 0.02)
        layer = nn.TransformerEncoderLayer(128, 4, 512, batch_first=True, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
        self.fc = nn.Linear(128, 10)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.encoder(self.embedding(ids) + self.position).mean(1))


def _timm(name: str, **kwargs: object) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10, img_size=64, **kwargs)

    return make


NETWORKS: dict[str, Callable[[], nn.Module]] = {
    "torchvision ViT-Tiny size (12x192, patch 8)": lambda: torchvision.models.VisionTransformer(
        image_size=64, patch_size=8, num_layers=12, num_heads=3, hidden_dim=192, mlp_dim=768, num_classes=10
    ),
    "torchvision swin_t": lambda: torchvision.models.swin_t(weights=None, num_classes=10),
    "timm deit_tiny_patch16_224 (patch 8)": _timm("deit_tiny_patch16_224", patch_size=8),
    "text encoder (nn.TransformerEncoder 4x128)": TextEncoder,
}
QUICK = ("text encoder (nn.TransformerEncoder 4x128)",)
INPUTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"text encoder (nn.TransformerEncoder 4x128)": token_ids}


def row(name: str, steps: int, repeats: int, workdir: Path) -> str:
    torch.manual_seed(0)
    x, y, x_val, y_val = digits()
    to_input = INPUTS.get(name, lambda images: images)
    x, x_val = to_input(x), to_input(x_val)
    net = NETWORKS[name]()
    _train(net, x, y, steps, False, qat=False)
    fp32 = copy.deepcopy(net).eval()
    example = (x[:1],)
    prepared = prepare_model(copy.deepcopy(fp32).train(), "x86", "auto", [], example)
    weights_only = prepare_model(net, "x86", "auto", [], example).module  # QAT for a dynamic artifact
    ao.set_activation_fake_quant(weights_only, False)
    _train(prepared.module, x, y, steps, False, qat=True)
    _train(weights_only, x, y, steps, False, qat=True)
    qat, qat_dynamic = prepared.module.eval(), weights_only.eval()
    int8 = to_int8(qat, prepared.mode, "x86", example)
    static = load_quantized(save_torchscript(int8, workdir / "static.pt", "x86", example))
    dynamic = to_torchscript(to_dynamic(qat_dynamic), "x86", example)
    peer: nn.Module | None = None
    try:  # torch's own dynamic quantization of nn.TransformerEncoder fails in eval (its fast path reads .weight)
        with ao.quiet():
            peer = torch.ao.quantization.quantize_dynamic(copy.deepcopy(fp32), {nn.Linear}, dtype=torch.qint8)
            peer = to_torchscript(peer, "x86", example)
    except Exception as err:  # noqa: BLE001 - reported in the table
        print(f"{name}: torch quantize_dynamic fails: {type(err).__name__}: {str(err).splitlines()[0][:100]}")
        peer = None
    qat_pred, qat_dynamic_pred = _predict(qat, x_val), _predict(qat_dynamic, x_val)
    agreement = {
        "s": (qat_pred == _predict(static, x_val)).float().mean().item(),
        "d": (qat_dynamic_pred == _predict(dynamic, x_val)).float().mean().item(),
    }
    accuracy = {"s": (qat_pred == y_val).float().mean().item(), "d": (qat_dynamic_pred == y_val).float().mean().item()}
    left = sum(float_parameters(int8).values()) / sum(p.numel() for p in fp32.parameters())
    cells = []
    for threads in (1, 2):
        for batch in (1, 8):
            with pinned_threads(threads):
                networks = {"fp32": fp32, "static": static, "dynamic": dynamic}
                ms = measure_latency(networks | ({"peer": peer} if peer else {}), (x_val[:batch],), "x86", repeats)
            cells.append(
                " / ".join(f"{ms['fp32'] / ms[k]:.2f}x" if k in ms else "fails" for k in (*networks, "peer")[1:])
            )
    size = serialized_size(fp32) / serialized_size(int8)
    line = (
        f"| {name} | {prepared.mode}, {prepared.attention} MHA | {left:.1%} | {size:.2f}x | {' | '.join(cells)} | "
        f"{agreement['s']:.1%} / {agreement['d']:.1%} | {accuracy['s']:.1%} / {accuracy['d']:.1%} |"
    )
    print(line, flush=True)
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one network, a few steps: a smoke test")
    parser.add_argument("--steps", type=int, default=100, help="float steps, then as many QAT steps")
    parser.add_argument("--out", type=Path, default=None, help="markdown file (default benchmarks/transformers.md)")
    args = parser.parse_args()
    lines = [
        "| network | mode | params left float | size ratio | speed-up 1 thread b1: static / dynamic / torch dynamic "
        "| 1 thread b8 | 2 threads b1 | 2 threads b8 | int8-vs-QAT agreement static / dynamic | QAT accuracy static / "
        "dynamic (weights-only QAT) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for name in NETWORKS:
            if not args.quick or name in QUICK:
                lines.append(row(name, 4 if args.quick else args.steps, 3 if args.quick else 15, Path(tmp)))
    peers = [p for p in ("nncf", "openvino") if importlib.util.find_spec(p) is None]
    notes = [f"Not installed here, so not run: {', '.join(peers)} (NNCF -> OpenVINO)."] if peers else []
    out = args.out or Path(__file__).with_name("transformers_quick.md" if args.quick else "transformers.md")
    intro = f"torch {torch.__version__}, torchvision {torchvision.__version__}; x86 backend; digits at 64x64."
    write_table(
        out, f"Transformers through lightning-qat ({'quick' if args.quick else 'full'} mode)", intro, lines, notes
    )


if __name__ == "__main__":
    main()
