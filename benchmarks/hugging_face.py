"""Hugging Face models through lightning-qat, beside what users would otherwise run: torch's and ONNX Runtime's
dynamic quantization of the float model.

    python -m benchmarks.hugging_face            # BERT, ViT and a Llama decoder, 2 layers of width 256
    python -m benchmarks.hugging_face --quick    # one small BERT, a few steps

Random init (tiny configs built here, nothing downloaded), trained on digits: text models read the 8x8 pixels as 65
token ids (a class id, then the 17 grey levels), the ViT the 32x32 images. ``--steps`` float steps, then as many QAT
steps (``engine="auto"``: torch.fx cannot trace these models, so PT2E captures them); "float" is the same start
trained as many steps more in float, which the peers quantize. "ours" is the AOTInductor package the callback ships
(static int8 activations), loaded as a user loads it, and the one it ships with ``activations="dynamic"`` (QAT of
the same start for it); "torch dynamic" is ``quantize_dynamic`` of the float model (its
Linears int8, run eagerly); "ORT dynamic" ONNX Runtime's ``quantize_dynamic`` of the float model's ONNX export.
Speed-ups are float eager / each, medians of interleaved runs on the same batch, 1 thread.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from benchmarks.runtimes import pinned_threads
from benchmarks.zoo import _predict, _train, digits, write_table
from lightning_qat import load_quantized
from lightning_qat.export.aoti import save_pt2
from lightning_qat.export.onnx import OnnxRuntimeNetwork
from lightning_qat.quantization import ao
from lightning_qat.quantization.convert import to_int8
from lightning_qat.quantization.engines import Needs
from lightning_qat.quantization.measure import float_ops, float_parameters, measure_latency
from lightning_qat.quantization.prepare import prepare_model

WIDTH = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=1024, num_labels=10)
QUICK_WIDTH = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, num_labels=10)
TEXT = dict(vocab_size=20, max_position_embeddings=80)


def token_ids(images: torch.Tensor) -> torch.Tensor:
    """A class id (18), then the 8x8 pixels as ids 1..17: (N, 65) int64, made outside the network, as a tokenizer."""
    pixels = (nn.functional.adaptive_avg_pool2d(images[:, :1], 8).flatten(1) * 16).round().clamp(0, 16).long() + 1
    return torch.cat([torch.full((len(images), 1), 18), pixels], 1)


class Logits(nn.Module):
    """A LightningModule's ``forward`` around a Hugging Face model: ``.logits`` of its output."""

    def __init__(self, model: nn.Module, key: str) -> None:
        super().__init__()
        self.model, self.key = model, key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(**{self.key: x}).logits


def _model(config: str, model: str, key: str, **kwargs: object) -> Callable[[dict[str, int]], nn.Module]:
    def make(width: dict[str, int]) -> nn.Module:
        import transformers

        return Logits(getattr(transformers, model)(getattr(transformers, config)(**(width | kwargs))), key)

    return make


NETWORKS: dict[str, Callable[[dict[str, int]], nn.Module]] = {
    "BERT (text encoder)": _model("BertConfig", "BertForSequenceClassification", "input_ids", **TEXT),
    "ViT (32 px, patch 4)": _model(
        "ViTConfig", "ViTForImageClassification", "pixel_values", image_size=32, patch_size=4, num_channels=3
    ),
    "Llama (decoder, grouped-query attention)": _model(
        "LlamaConfig",
        "LlamaForSequenceClassification",
        "input_ids",
        num_key_value_heads=2,
        pad_token_id=0,
        use_cache=False,
        **TEXT,
    ),
}
QUICK = ("BERT (text encoder)",)


def _ort_dynamic(fp32: nn.Module, example: torch.Tensor, workdir: Path) -> nn.Module:
    """ONNX Runtime's dynamic int8 of ``fp32``'s ONNX export (torch's TorchScript-based exporter), on 1 thread."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    exported, quantized = workdir / "float.onnx", workdir / "ort_dynamic.onnx"
    with ao.quiet(), torch.no_grad():
        torch.onnx.export(
            fp32,
            (example,),
            str(exported),
            input_names=["x"],
            dynamic_axes={"x": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    quantize_dynamic(str(exported), str(quantized), weight_type=QuantType.QInt8)
    return OnnxRuntimeNetwork(quantized, threads=1)


def row(name: str, width: dict[str, int], steps: int, repeats: int, workdir: Path) -> str:
    torch.manual_seed(0)
    x, y, x_val, y_val = digits(32)
    net = NETWORKS[name](width)
    text = net.key == "input_ids"  # type: ignore[attr-defined]
    if text:
        x, x_val = token_ids(x), token_ids(x_val)
    _train(net, x, y, steps, False, qat=False)
    fp32, start = copy.deepcopy(net), copy.deepcopy(net)
    example = (x[:8],)
    prepared = prepare_model(net, "x86", "auto", [], example)
    _train(prepared.module, x, y, steps, False, qat=True)
    qat = prepared.module.eval()
    int8 = to_int8(qat, prepared.engine, "x86", example)
    package = save_pt2(int8, workdir / f"{len(list(workdir.iterdir()))}.pt2", example)
    ours = load_quantized(package.path)
    # the other artifact activations="dynamic" ships: QAT of the same start for dynamic int8, its own package
    dynamic = prepare_model(start, "x86", "auto", [], example, needs=Needs(dynamic=True))
    _train(dynamic.module, x, y, steps, False, qat=True)
    int8_dynamic = to_int8(dynamic.module.eval(), dynamic.engine, "x86", example, dynamic=True)
    ours_dynamic = load_quantized(save_pt2(int8_dynamic, workdir / f"{len(list(workdir.iterdir()))}.pt2", example).path)
    _train(fp32, x, y, steps, False, qat=False)  # the float network trained as long as QAT's: the peers' start
    fp32.eval()
    peers: dict[str, nn.Module | str] = {"ours dynamic": ours_dynamic}
    with ao.quiet():
        peers["torch dynamic"] = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(fp32), {nn.Linear}, dtype=torch.qint8
        )
    try:
        peers["ORT dynamic"] = _ort_dynamic(fp32, x[:2], workdir)
    except Exception as err:  # noqa: BLE001 - reported in the table
        peers["ORT dynamic"] = f"fails: {type(err).__name__}"
    networks = {"float": fp32, "ours": ours} | {k: v for k, v in peers.items() if isinstance(v, nn.Module)}
    accuracy = {k: (_predict(v, x_val) == y_val).float().mean().item() for k, v in networks.items()}
    accuracy["qat"] = (_predict(qat, x_val) == y_val).float().mean().item()
    speed = {}
    for batch in (1, 8):
        with pinned_threads(1):
            ms = measure_latency(networks, (x_val[:batch],), "x86", repeats)
        speed[batch] = {k: ms["float"] / ms[k] for k in ms}
    float_size = sum(p.numel() * p.element_size() for p in fp32.parameters())
    size = float_size / package.path.stat().st_size
    left = sum(float_parameters(int8).values()) / sum(p.numel() for p in fp32.parameters())
    ops = ", ".join(f"{op} {count}" for op, count in float_ops(int8).items())

    def cell(key: str) -> str:
        if key not in networks:
            return str(peers[key])
        return f"{accuracy[key]:.1%}, {speed[1][key]:.2f}x / {speed[8][key]:.2f}x"

    line = (
        f"| {name} | {accuracy['float']:.1%} / {accuracy['qat']:.1%} / {accuracy['ours']:.1%} | "
        f"{speed[1]['ours']:.2f}x / {speed[8]['ours']:.2f}x | {size:.2f}x | {left:.1%} | {ops} | "
        f"{cell('ours dynamic')} | {cell('torch dynamic')} | {cell('ORT dynamic')} |"
    )
    print(line, flush=True)
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one small network, a few steps: a smoke test")
    parser.add_argument("--steps", type=int, default=300, help="float steps, then as many QAT steps")
    parser.add_argument("--out", type=Path, default=None, help="markdown file (default benchmarks/hugging_face.md)")
    args = parser.parse_args()
    lines = [
        "| network | accuracy float / QAT / ours int8 (as many steps) | ours: speed-up b1 / b8 | size ratio (float "
        "weights / .pt2 file) | params left float | ops left float (per forward) | ours, dynamic activations: "
        "accuracy, speed-up b1 / b8 | torch dynamic | ORT dynamic |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    width = QUICK_WIDTH if args.quick else WIDTH
    with tempfile.TemporaryDirectory() as tmp:
        for name in NETWORKS:
            if not args.quick or name in QUICK:
                lines.append(row(name, width, 4 if args.quick else args.steps, 3 if args.quick else 30, Path(tmp)))
    notes = [] if importlib.util.find_spec("onnxruntime") else ["onnxruntime is not installed: ORT dynamic not run."]
    out = args.out or Path(__file__).with_name("hugging_face_quick.md" if args.quick else "hugging_face.md")
    import transformers

    intro = (
        f"torch {torch.__version__}, transformers {transformers.__version__}; x86 backend; width "
        f"{width['hidden_size']}, {width['num_hidden_layers']} layers; 1 thread."
    )
    title = f"Hugging Face models through lightning-qat ({'quick' if args.quick else 'full'} mode)"
    write_table(out, title, intro, lines, notes)


if __name__ == "__main__":
    main()
