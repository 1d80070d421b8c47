"""Deployment runtimes side by side: every int8 path a user could ship, timed interleaved in one process.

Rows of one model share the float network (torchvision, ``weights=None``, seed 0), the input batch and the thread
count. Every QAT path starts from that network, sees the same few training batches (QAT speed does not depend on
how long it trained), freezes and converts the way its own documentation says, and is timed as it ships:

- ``ours TorchScript``: the callback's ``model_int8.pt``, loaded with ``load_quantized`` (PyTorch x86 int8 kernels).
- ``ours ONNX Runtime``: the callback's ``model_int8.onnx`` (``export=["torchscript", "onnx"]``) in onnxruntime.
- ``ours ONNX in OpenVINO``: the same ONNX file compiled by OpenVINO (optional: ``pip install openvino``).
- ``hand recipe``: torchvision's quantizable model, ``fuse_model`` + ``prepare_qat`` + ``convert``, traced and frozen
  to TorchScript exactly as our artifact is.
- ``torchao PT2E + inductor``: ``torch.export(strict=True)``, ``prepare_qat_pt2e`` with the X86InductorQuantizer,
  ``convert_pt2e``, ``torch.compile`` with inductor freezing (optional: ``pip install torchao``).
- ``NNCF -> OpenVINO``: ``nncf.quantize`` (QAT-ready torch model), ``openvino.convert_model``, compiled for the CPU
  (optional: ``pip install nncf openvino``).

A path whose package is absent is skipped with a note; the others still run.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from lightning_qat import load_quantized
from lightning_qat.export.onnx import OnnxRuntimeNetwork, export_onnx
from lightning_qat.export.torchscript import save_torchscript, to_torchscript
from lightning_qat.quantization import ao
from lightning_qat.quantization.convert import to_int8
from lightning_qat.quantization.measure import measure_latency
from lightning_qat.quantization.prepare import prepare_model

BACKEND = "x86"


class Skipped(Exception):
    """A path that cannot run here (its package is not installed); the message says why."""


def _needs(*packages: str) -> None:
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        raise Skipped(f"not installed: {', '.join(missing)}")


def _float(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(arch, weights=None).eval()


def _train_batches(model: Callable[..., Any], image: int) -> None:
    """The same few forward passes every QAT path sees before it freezes (observers and BN statistics move)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad(), ao.quiet():
        for _ in range(2):
            model(torch.randn(4, 3, image, image, generator=generator))


def _ov_compile(model: Any, batch: int, image: int, threads: int) -> Callable[[torch.Tensor], Any]:
    import openvino as ov

    core = ov.Core()
    if isinstance(model, (str, os.PathLike)):
        model = core.read_model(str(model))
    model.reshape([batch, 3, image, image])
    compiled = core.compile_model(
        model, "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    )
    request = compiled.create_infer_request()
    return lambda x: request.infer([x.numpy()])


class Paths:
    """Builds each path once per model (QAT + conversion), then per batch what must be compiled per shape."""

    def __init__(self, arch: str, image: int, workdir: Path) -> None:
        self.arch, self.image, self.workdir = arch, image, workdir
        self.example = (torch.randn(1, 3, image, image),)
        self.sizes: dict[str, int] = {}
        self._built: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------ ours
    def _ours(self) -> tuple[Path, Path]:
        if "ours" not in self._built:
            prepared = prepare_model(_float(self.arch), BACKEND, "auto", [], self.example, relu6_to_relu=True).module
            prepared.train()
            _train_batches(prepared, self.image)
            ao.freeze_bn_stats(prepared)
            ao.set_observers(prepared, False)
            prepared.eval()
            int8 = to_int8(prepared, "fx", BACKEND, self.example)
            ts = save_torchscript(int8, self.workdir / f"{self.arch}.pt", BACKEND, self.example)
            onnx_path = export_onnx(prepared, self.workdir / f"{self.arch}.onnx", self.example)
            self.sizes["ours TorchScript"] = ts.stat().st_size
            self.sizes["ours ONNX Runtime"] = self.sizes["ours ONNX in OpenVINO"] = onnx_path.stat().st_size
            self._built["ours"] = (ts, onnx_path)
        return self._built["ours"]

    def ours_torchscript(self, batch: int, threads: int) -> Callable:
        with ao.engine(BACKEND):
            return load_quantized(self._ours()[0])

    def ours_onnx_runtime(self, batch: int, threads: int) -> Callable:
        _needs("onnxruntime")
        return OnnxRuntimeNetwork(self._ours()[1], threads=threads)

    def ours_onnx_in_openvino(self, batch: int, threads: int) -> Callable:
        _needs("openvino")
        return _ov_compile(self._ours()[1], batch, self.image, threads)

    # ------------------------------------------------------------------------------------------ hand recipe
    def hand_recipe(self, batch: int, threads: int) -> Callable:
        if "hand" not in self._built:
            torch.manual_seed(0)
            model = getattr(torchvision.models.quantization, self.arch)(weights=None, quantize=False).train()
            with ao.quiet(), ao.engine(BACKEND):
                model.fuse_model(is_qat=True)
                model.qconfig = torch.ao.quantization.get_default_qat_qconfig(BACKEND)
                torch.ao.quantization.prepare_qat(model, inplace=True)
                _train_batches(model, self.image)
                model.apply(torch.ao.quantization.disable_observer)
                int8 = torch.ao.quantization.convert(model.eval())
            traced = to_torchscript(int8, BACKEND, self.example)
            buffer = io.BytesIO()
            torch.jit.save(traced, buffer)
            self.sizes["hand recipe (TorchScript)"] = buffer.getbuffer().nbytes
            self._built["hand"] = traced
        return self._built["hand"]

    # ------------------------------------------------------------------------------------------ torchao
    def _torchao_model(self) -> nn.Module:
        if "torchao" not in self._built:
            _needs("torchao")
            from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e
            from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

            model = _float(self.arch).train()
            batch = torch.export.Dim("batch", min=1, max=1024)
            exported = torch.export.export(
                model, (torch.randn(4, 3, self.image, self.image),), dynamic_shapes=({0: batch},), strict=True
            ).module()
            quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config(True))
            prepared = prepare_qat_pt2e(exported, quantizer)
            move_exported_model_to_train(prepared)
            _train_batches(prepared, self.image)
            move_exported_model_to_eval(prepared)
            converted = convert_pt2e(prepared)
            buffer = io.BytesIO()
            torch.export.save(torch.export.export(converted, self.example, strict=False), buffer)
            self.sizes["torchao PT2E + inductor"] = buffer.getbuffer().nbytes
            self._built["torchao"] = converted
        return self._built["torchao"]

    def torchao_pt2e_inductor(self, batch: int, threads: int) -> Callable:
        converted = self._torchao_model()
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        compiled = torch.compile(copy.deepcopy(converted), dynamic=False)
        with torch.no_grad():
            compiled(torch.randn(batch, 3, self.image, self.image))  # compile now, not in the timed loop
        return compiled

    # ------------------------------------------------------------------------------------------ NNCF -> OpenVINO
    def nncf_openvino(self, batch: int, threads: int) -> Callable:
        if "nncf" not in self._built:
            _needs("nncf", "openvino")
            os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "600")
            import nncf
            import openvino as ov

            model = _float(self.arch)
            generator = torch.Generator().manual_seed(1)
            calibration = [torch.randn(4, 3, self.image, self.image, generator=generator) for _ in range(2)]
            with contextlib.redirect_stdout(io.StringIO()):
                quantized = nncf.quantize(model, nncf.Dataset(calibration), subset_size=8)
            quantized.train()
            _train_batches(quantized, self.image)
            quantized.eval()
            ov_model = ov.convert_model(quantized, example_input=self.example[0])
            with tempfile.TemporaryDirectory() as tmp:
                ov.save_model(ov_model, f"{tmp}/m.xml")
                self.sizes["NNCF -> OpenVINO"] = sum(f.stat().st_size for f in Path(tmp).iterdir())
            self._built["nncf"] = ov_model
        return _ov_compile(self._built["nncf"].clone(), batch, self.image, threads)


PATHS = (
    ("ours TorchScript", Paths.ours_torchscript),
    ("ours ONNX Runtime", Paths.ours_onnx_runtime),
    ("ours ONNX in OpenVINO", Paths.ours_onnx_in_openvino),
    ("hand recipe (TorchScript)", Paths.hand_recipe),
    ("torchao PT2E + inductor", Paths.torchao_pt2e_inductor),
    ("NNCF -> OpenVINO", Paths.nncf_openvino),
)


def runtimes(
    models: tuple[str, ...], batches: tuple[int, ...], threads: int, image: int, repeats: int, workdir: Path
) -> tuple[list[str], list[str], dict[str, str]]:
    """The side-by-side latency table (ms and fraction of fp32 eager), the artifact-size table, skip notes."""
    names = [name for name, _ in PATHS]
    latency = [
        "| model | batch | fp32 eager ms | " + " | ".join(names) + " |",
        "|---" * (3 + len(names)) + "|",
    ]
    sizes = ["| model | " + " | ".join(names) + " |", "|---" * (1 + len(names)) + "|"]
    notes: dict[str, str] = {}
    with pinned_threads(threads):
        for arch in models:
            paths = Paths(arch, image, workdir)
            for batch in batches:
                networks: dict[str, Any] = {"fp32": _float(arch)}
                for name, build in PATHS:
                    try:
                        networks[name] = build(paths, batch, threads)
                    except Skipped as why:
                        notes[name] = str(why)
                    except Exception as err:  # noqa: BLE001 - a peer failing is a row note, not a failed run
                        notes[name] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
                x = (torch.randn(batch, 3, image, image),)
                ms = measure_latency(networks, x, BACKEND, repeats=repeats, warmup=2)
                cells = [f"{ms[n]:.1f} ({ms[n] / ms['fp32']:.3f})" if n in ms else "skipped" for n in names]
                latency.append(f"| {arch} | {batch} | {ms['fp32']:.1f} | " + " | ".join(cells) + " |")
                print(latency[-1], flush=True)
            sizes.append(
                f"| {arch} | "
                + " | ".join(f"{paths.sizes[n] / 2**20:.1f} MiB" if n in paths.sizes else "-" for n in names)
                + " |"
            )
    return latency, sizes, notes


@contextlib.contextmanager
def pinned_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` inside the block, and back after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
