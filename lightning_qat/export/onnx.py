"""The QAT network as a QDQ ONNX graph for ONNX Runtime (and OpenVINO), an optional extra: ``lightning-qat[onnx]``.

torch's ONNX exporters cannot export a QAT network as it trains (``fused_moving_avg_obs_fake_quant`` has no ONNX
symbolic) nor the converted int8 model (its ``qscheme`` constants). So a copy is rewritten first: every BatchNorm
fused into a convolution or linear layer is folded into its weight and bias, and every fake-quant module becomes a
fixed ``torch.fake_quantize_per_{tensor,channel}_affine`` with its frozen scale and zero point, which the exporter
writes as a QuantizeLinear/DequantizeLinear pair. ONNX Runtime fuses those pairs with the layers they surround into
int8 kernels. Without the BN fold it would run the convolutions in float.
"""

from __future__ import annotations

import importlib.util
import io
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_qat.exceptions import OnnxExtraMissing
from lightning_qat.export.qdq_graph import for_runtimes
from lightning_qat.files import write_atomic
from lightning_qat.quantization import ao, compat
from lightning_qat.quantization.convert import cpu_eval_copy
from lightning_qat.quantization.inputs import cpu_inputs

INSTALL_HINT = "pip install 'lightning-qat[onnx]'  (onnx and onnxruntime)"
OPSET = 17


def check_onnx_available(what: str = "export=['onnx']") -> None:
    """Raise :class:`OnnxExtraMissing` naming the install command unless onnx and onnxruntime are importable."""
    missing = [name for name in ("onnx", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise OnnxExtraMissing(f"{what} needs {' and '.join(missing)}, which are not installed: {INSTALL_HINT}.")


def onnxruntime_version() -> str:
    """The installed onnxruntime's version."""
    import onnxruntime

    return onnxruntime.__version__


class QDQ(nn.Module):
    """A frozen fake-quant: quantize and dequantize with a fixed scale and zero point (QuantizeLinear/DequantizeLinear).

    ``axis`` is the channel axis of a per-channel quantizer, ``None`` for per-tensor.
    """

    scale: torch.Tensor
    zero_point: torch.Tensor

    def __init__(
        self, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int, quant_max: int, axis: int | None
    ) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().float().clone())
        self.register_buffer("zero_point", zero_point.detach().clone().to(torch.int32))
        self.quant_min, self.quant_max, self.axis = quant_min, quant_max, axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` rounded to the quantization grid, in float."""
        if self.axis is None:
            return torch.fake_quantize_per_tensor_affine(
                x, float(self.scale.reshape(-1)[0]), int(self.zero_point.reshape(-1)[0]), self.quant_min, self.quant_max
            )
        return torch.fake_quantize_per_channel_affine(
            x, self.scale, self.zero_point, self.axis, self.quant_min, self.quant_max
        )


def _qdq(fake_quant: ao.FakeQuantizeBase) -> nn.Module:
    """The frozen :class:`QDQ` equivalent of a torch fake-quant module (identity when fake-quant is off)."""
    grid = ao.quant_grid(fake_quant)
    if grid is None:
        return nn.Identity()
    if grid.float_qparams:
        raise _unsupported(fake_quant, "float-qparams (embedding) weight quantization has no ONNX QDQ form")
    # ONNX's QuantizeLinear clamps to the full 8-bit range; so do the int8 model and our QAT activations
    # (ao.Int8RangeFakeQuantize): a narrower clamp has no QDQ form that ONNX Runtime still fuses into int8 kernels.
    if (grid.quant_min, grid.quant_max) not in ((0, 255), (-128, 127)):
        raise _unsupported(fake_quant, f"quantization range [{grid.quant_min}, {grid.quant_max}] is not 8-bit")
    return QDQ(grid.scale, grid.zero_point, grid.quant_min, grid.quant_max, grid.axis)


def _unsupported(module: nn.Module, why: str) -> ValueError:
    return ValueError(f"ONNX export: {type(module).__name__}: {why}; export=['torchscript'] still works.")


class QDQLayer(nn.Module):
    """A convolution or linear layer with its BatchNorm folded in and a frozen weight quantizer (ONNX export form)."""

    def __init__(
        self,
        layer: nn.Linear | nn.modules.conv._ConvNd,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        weight_qdq: nn.Module,
        relu: bool,
        output_qdq: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.output_qdq = output_qdq if output_qdq is not None else nn.Identity()
        self.layer = layer
        self.layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.layer.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.weight_qdq = weight_qdq
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer with its quantized weight."""
        weight = self.weight_qdq(self.layer.weight)
        if isinstance(self.layer, nn.Linear):
            out = F.linear(x, weight, self.layer.bias)
        else:
            out = self.layer._conv_forward(x, weight, self.layer.bias)
        return self.output_qdq(F.relu(out) if self.relu else out)


_LAYER_TYPES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _export_layer(module: nn.Module) -> nn.Module | None:
    """The :class:`QDQLayer` for a QAT conv/linear module (BN folded), None for other modules."""
    weight_fake_quant = ao.weight_fake_quant(module)
    if weight_fake_quant is None or not isinstance(getattr(module, "weight", None), torch.Tensor):
        return None
    if isinstance(module, nn.Embedding):
        raise _unsupported(module, "quantized embeddings have no ONNX QDQ form")
    if not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
        raise _unsupported(module, "no ONNX export form for this QAT layer type")
    weight: torch.Tensor = module.weight
    bias: torch.Tensor | None = module.bias if isinstance(module.bias, torch.Tensor) else None
    bn = ao.fused_batch_norm(module)
    if bn is not None:
        assert bn.running_var is not None  # fused BNs track statistics
        assert bn.running_mean is not None
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        shape = [-1] + [1] * (weight.dim() - 1)
        weight = weight * scale.reshape(shape)
        bias = ((bias if bias is not None else torch.zeros_like(bn.running_mean)) - bn.running_mean) * scale + bn.bias
    layer: nn.Linear | nn.modules.conv._ConvNd
    if isinstance(module, nn.Linear):
        layer = nn.Linear(module.in_features, module.out_features, bias=bias is not None)
    elif not module.transposed:
        layer = _LAYER_TYPES[weight.dim() - 2](
            module.in_channels,
            module.out_channels,
            module.kernel_size,  # type: ignore[arg-type]  # a tuple, as every _ConvNd takes
            stride=module.stride,  # type: ignore[arg-type]
            padding=module.padding,  # type: ignore[arg-type]
            dilation=module.dilation,  # type: ignore[arg-type]
            groups=module.groups,
            bias=bias is not None,
            padding_mode=module.padding_mode,
        )
    else:
        raise _unsupported(module, "no ONNX export form for this QAT layer type")
    # eager mode: the layer's output quantizer is its child, called by a forward hook that does not carry over
    output = ao.output_fake_quant(module)
    return QDQLayer(
        layer, weight, bias, _qdq(weight_fake_quant), ao.has_fused_relu(module), _qdq(output) if output else None
    )


def to_export_form(prepared: nn.Module) -> nn.Module:
    """A copy of the QAT network ``prepared`` (eval, CPU) with folded BNs and frozen :class:`QDQ` quantizers.

    Modules reachable under several names (FX reuses one fake-quant module at several places) are replaced once
    and stay shared.
    """
    network = cpu_eval_copy(prepared)
    replaced: dict[int, nn.Module] = {}
    with ao.quiet():
        for parent in list(network.modules()):
            for name, child in list(parent._modules.items()):
                if child is None:
                    continue
                if id(child) not in replaced:
                    if ao.is_fake_quant(child):
                        replaced[id(child)] = _qdq(child)
                    else:
                        layer = _export_layer(child)
                        if layer is None:
                            continue
                        replaced[id(child)] = layer
                parent._modules[name] = replaced[id(child)]
    return network.eval()


def _flat_names(prefix: str, count: int) -> list[str]:
    return [prefix] if count == 1 else [f"{prefix}_{i}" for i in range(count)]


def onnx_bytes(prepared: nn.Module, example_inputs: tuple[Any, ...]) -> bytes:
    """The QAT network ``prepared`` as a QDQ ONNX graph (opset 17, dynamic batch axis, int8 weights), in memory.

    Raises:
        OnnxExtraMissing: without onnx / onnxruntime.
        ValueError: for a layer with no ONNX QDQ form, or a network whose inputs are not tensors.
    """
    check_onnx_available()
    inputs = cpu_inputs(example_inputs)
    if not all(isinstance(x, torch.Tensor) for x in inputs):
        raise ValueError("ONNX export needs tensor inputs (positional); export=['torchscript'] still works.")
    network = to_export_form(prepared)
    with torch.no_grad():
        outputs = network(*inputs)
    n_out = len(outputs) if isinstance(outputs, (tuple, list)) else 1
    input_names = _flat_names("input", len(inputs))
    output_names = _flat_names("output", n_out)
    buffer = io.BytesIO()
    with ao.quiet(), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation notices
        torch.onnx.export(
            network,
            inputs,
            buffer,  # type: ignore[arg-type]  # the TorchScript-based exporter writes to file-like objects
            input_names=input_names,
            output_names=output_names,
            dynamic_axes={name: {0: "batch"} for name in input_names + output_names},
            opset_version=OPSET,
            **compat.torchscript_onnx_exporter(),
        )
    return for_runtimes(buffer.getvalue())


def export_onnx(prepared: nn.Module, path: str | os.PathLike, example_inputs: tuple[Any, ...]) -> Path:
    """Write :func:`onnx_bytes` of the QAT network ``prepared`` to ``path``, atomically; returns the path.

    Raises:
        OnnxExtraMissing: without onnx / onnxruntime.
        ValueError: for a layer with no ONNX QDQ form, or a network whose inputs are not tensors.
    """
    data = onnx_bytes(prepared, example_inputs)
    return write_atomic(path, lambda tmp: tmp.write_bytes(data))


class OnnxRuntimeNetwork(nn.Module):
    """An ONNX file run by ONNX Runtime behind an ``nn.Module`` interface (tensors in, tensors out), for evaluation."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        super().__init__()
        check_onnx_available("running an ONNX artifact")
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.path = str(path)
        self._options = options
        self.session = ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
        self._inputs = [i.name for i in self.session.get_inputs()]

    def __deepcopy__(self, memo: dict[int, Any]) -> OnnxRuntimeNetwork:
        return self  # the session is read-only; Lightning's evaluation copies the module around it

    def forward(self, *inputs: torch.Tensor) -> Any:
        """Run the session; one tensor out, or a tuple for several outputs."""
        feeds = {name: x.detach().cpu().numpy() for name, x in zip(self._inputs, inputs, strict=True)}
        outputs = [torch.from_numpy(o) for o in self.session.run(None, feeds)]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)
