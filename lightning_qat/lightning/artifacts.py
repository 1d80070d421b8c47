"""The int8 artifacts of a run: written in the order that keeps the most on disk, and each loaded as it ships.

:class:`Artifacts` writes the formats of ``export`` (the engine's own first: TorchScript, the ``.pt2`` package or the
``.pte`` program; then the QDQ ONNX file) and gives the final evaluation and the timing each file in the runtime
that loads it: TorchScript in torch, the ``.pt2`` in AOTInductor's loader, the ``.pte`` in ExecuTorch's runtime,
the ONNX file in ONNX Runtime.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_qat.export.aoti import save_pt2, show
from lightning_qat.export.onnx import OnnxRuntimeNetwork, export_onnx, onnxruntime_version
from lightning_qat.export.pte import PteNetwork, save_pte
from lightning_qat.export.torchscript import load_quantized, save_torchscript, to_torchscript
from lightning_qat.lightning.report import QATReport
from lightning_qat.lightning.run import QATRun
from lightning_qat.lightning.settings import FinishSettings
from lightning_qat.quantization.convert import cpu_eval_copy
from lightning_qat.quantization.fallback import Group, train_float
from lightning_qat.quantization.measure import serialized_size


class Artifacts:
    """The files a run writes (``path``: the engine's artifact; ``onnx_path``) and the networks that run them.

    ``shipped``: the engine's artifact loaded in its runtime, where the final evaluation runs it instead of the
    int8 graph it came from (the ``.pte``: ExecuTorch's XNNPACK kernels round otherwise than torch's reference
    quantize / dequantize graph).
    """

    def __init__(self, settings: FinishSettings, run: QATRun) -> None:
        self.settings = settings
        self.run = run
        self.path: Path | None = None
        self.onnx_path: Path | None = None
        self.shipped: nn.Module | None = None
        self._onnx_session: OnnxRuntimeNetwork | None = None

    def write(
        self, report: QATReport, quantized: nn.Module, trained: nn.Module, float_groups: Sequence[Group], out_dir: Path
    ) -> None:
        """Save the artifacts of ``export`` to ``out_dir``: the engine's first, then ONNX (written from ``trained``)."""
        export, run = self.settings.export, self.run
        if "pt2" in export:
            self._write_pt2(report, quantized, out_dir)
        if "pte" in export:
            self._write_pte(report, quantized, out_dir)
        if "torchscript" in export:
            self.path = save_torchscript(
                quantized,
                out_dir / "model_int8.pt",
                self.settings.backend,
                run.example_inputs,
                mode=run.prepared.mode,
                skipped=run.skip,
                activations=report.activations,
            )
            report.artifact = str(self.path)
        if "onnx" in export:
            network = trained
            if float_groups:  # the QDQ graph keeps them float too: their fake-quants off, on a copy
                network = cpu_eval_copy(network)
                train_float(network, float_groups)
            self.onnx_path = export_onnx(network, out_dir / "model_int8.onnx", run.example_inputs)
            self._onnx_session = None  # a new file: a new session, opened once for evaluation and timing
            report.onnx_artifact = str(self.onnx_path)

    def _write_pt2(self, report: QATReport, quantized: nn.Module, out_dir: Path) -> None:
        package = save_pt2(quantized, out_dir / "model_int8.pt2", self.run.example_inputs)
        self.path, kernels = package.path, package.kernels
        report.artifact = str(self.path)
        layers = report.quantized_layers  # counted by convert_network (pt2e.int8_layers)
        report.int8_kernels = kernels
        report.package_shapes = show(package.shapes) + (f" only ({package.static})" if package.static else "")
        if kernels < layers:
            rank_zero_warn(
                f"QAT: the AOTInductor package calls {kernels} int8 kernels for {layers} int8 layers: the others "
                "run in float there."
            )

    def _write_pte(self, report: QATReport, quantized: nn.Module, out_dir: Path) -> None:
        program = save_pte(quantized, out_dir / "model_int8.pte", self.run.example_inputs)
        self.path = program.path
        self.shipped = PteNetwork(program.path, out_spec=program.out_spec)
        report.artifact = str(program.path)
        report.package_shapes = show(program.shapes) + (
            f" (batch up to {program.max_batch})" if program.max_batch else f" only ({program.static})"
        )
        report.delegated = {"xnnpack": program.delegated, "layout": program.layout, **program.outside}
        report.float_bias = program.float_bias
        if program.float_bias:
            count, names = len(program.float_bias), ", ".join(program.float_bias[:3])
            rank_zero_info(
                f"QAT: the .pte runs {count} layer{'s' if count > 1 else ''} in float ({names}"
                f"{', ...' if count > 3 else ''}): XNNPACK's int32 bias would miss the bias QAT trained (a channel "
                "whose input never opened folds a large weight scale; docs/deployment.md)."
            )
        if program.outside:
            rank_zero_warn(
                f"QAT: {sum(program.outside.values())} operators of the .pte run outside the XNNPACK delegate, in "
                f"ExecuTorch's portable (float) kernels: {program.outside}."
            )

    def onnx_network(self) -> OnnxRuntimeNetwork:
        """The ONNX artifact in one ONNX Runtime session, shared by the evaluation and the timing."""
        assert self.onnx_path is not None
        if self._onnx_session is None:
            self._onnx_session = OnnxRuntimeNetwork(self.onnx_path)
        return self._onnx_session

    def timed(self, report: QATReport, quantized: nn.Module) -> dict[str, Any]:
        """The int8 networks to time, each as it ships, with their sizes and runtimes in ``report``."""
        run, backend = self.run, self.settings.backend
        networks: dict[str, Any] = {}
        if self.shipped is not None:
            networks["int8"] = self.shipped
            report.latency_runtime["int8"] = "ExecuTorch runtime (XNNPACK delegate)"
        elif self.path is not None:
            networks["int8"] = load_quantized(self.path)
            report.latency_runtime["int8"] = (
                "AOTInductor package" if self.path.suffix == ".pt2" else "TorchScript artifact"
            )
        if self.path is not None:
            report.size_bytes["int8"] = self.path.stat().st_size
        elif run.prepared.engine.compiled:
            networks["int8"] = quantized
            report.size_bytes["int8"] = serialized_size(quantized)
            report.latency_runtime["int8"] = f"{run.prepared.mode} quantize/dequantize graph (not compiled: export=[])"
        else:
            networks["int8"] = to_torchscript(quantized, backend, run.example_inputs)
            report.size_bytes["int8"] = serialized_size(quantized)
            report.latency_runtime["int8"] = "TorchScript (not saved)"
        if self.onnx_path is not None:
            networks["int8-onnx"] = self.onnx_network()
            report.size_bytes["int8-onnx"] = self.onnx_path.stat().st_size
            report.latency_runtime["int8-onnx"] = f"ONNX Runtime {onnxruntime_version()}"
        return networks
