"""The PT2E int8 network as an AOTInductor package, ``model_int8.pt2``: compiled C++ that torch alone loads.

Compiled with inductor's freezing on and gradients off, so torchao's x86 passes replace each quantize / dequantize /
layer pattern with a oneDNN int8 kernel (``_qconv_pointwise``, ``_qlinear_pointwise``); without freezing the layers
compile to float kernels, silently (pytorch/ao#4566). :func:`int8_kernels` reads the compiled package to check it.
Loading needs neither torchao nor the training code: ``torch._inductor.aoti_load_package(path)``.

**The package takes the example input's shapes only** (its batch size too). Compiled with a dynamic batch dimension,
torch 2.14's int8 convolutions return wrong outputs: the int8 convolution writes channels-last memory where the code
around it reads contiguous (``torch.compile(dynamic=True)`` stops on that stride assertion; the AOT package has none
and computes wrong outputs: the manual's PT2E page has the measurement). So it is compiled static, and every package is
checked against the quantize / dequantize graph it was compiled from before it is written (:data:`TOLERANCE`).
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_qat.exceptions import ArtifactError, ConversionError, first_line
from lightning_qat.files import write_atomic
from lightning_qat.quantization import pt2e
from lightning_qat.quantization.inputs import cpu_inputs

TOLERANCE = 0.05  # largest relative error of the package's output against the graph's: int8 rounding is far below
KERNELS = ("_qconv_pointwise", "_qlinear_pointwise")  # oneDNN's int8 convolution and linear, as inductor calls them


SHAPES_KEY = "lightning_qat.input_shapes"  # the package's metadata: the input shapes it was compiled for (JSON)


class CompiledNetwork(nn.Module):
    """A loaded AOTInductor package as a module, refusing inputs of other shapes than it was compiled for.

    (The compiled code does not check them: a package for batches of 64 returns 64 rows of garbage for 7.)
    """

    def __init__(self, compiled: Any, path: Path) -> None:
        super().__init__()
        self.compiled = compiled
        self.path = path
        metadata = compiled.get_metadata() if hasattr(compiled, "get_metadata") else {}
        shapes = metadata.get(SHAPES_KEY)
        self.input_shapes: list[list[int]] | None = json.loads(shapes) if shapes else None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The compiled network on inputs of the shapes it was compiled for.

        Raises:
            ValueError: naming both shapes, for inputs of other shapes.
        """
        if self.input_shapes is not None:
            shapes = _shapes((args, kwargs))
            if shapes != self.input_shapes:
                raise ValueError(
                    f"{self.path.name} was compiled for inputs of shapes {self.input_shapes} and got {shapes}: "
                    "an AOTInductor int8 package takes the shapes of the example input it was compiled with."
                )
        return self.compiled(*args, **kwargs)


def _shapes(value: Any) -> list[list[int]]:
    return [list(t.shape) for t in torch.utils._pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]


def int8_kernels(path: str | os.PathLike) -> int:
    """How many int8 convolution / linear kernel calls the compiled package's generated code makes."""
    with zipfile.ZipFile(path) as archive:
        sources = [archive.read(name).decode(errors="replace") for name in archive.namelist() if name.endswith(".cpp")]
    return sum(source.count(kernel) for source in sources for kernel in KERNELS)


def save_pt2(quantized: nn.Module, path: str | os.PathLike, example_inputs: tuple[Any, ...]) -> tuple[Path, int]:
    """Compile the int8 PT2E graph ``quantized`` for the CPU into the package ``path`` (written atomically).

    Compiled for the shapes of ``example_inputs`` (see the module's note). Returns the path and how many int8
    kernels the package calls.

    Raises:
        ConversionError: if inductor cannot compile the graph, the package calls no int8 kernel while the graph has
            int8 layers, or its output differs from the graph's by more than :data:`TOLERANCE`.
    """
    pt2e.require("a .pt2 artifact")
    inputs = cpu_inputs(example_inputs)
    exported = quantized.exported if pt2e.is_exported(quantized) else quantized
    layers = pt2e.int8_layers(quantized)
    kernels = 0

    def compile_into(tmp: Path) -> None:
        nonlocal kernels
        try:
            with pt2e.quiet(), torch.no_grad():  # without no_grad inductor skips freezing: float kernels
                program = torch.export.export(exported, inputs)
                metadata = {SHAPES_KEY: json.dumps(_shapes((inputs, {})))}
                torch._inductor.aoti_compile_and_package(
                    program,
                    package_path=str(tmp),
                    inductor_configs={"freezing": True, "aot_inductor.metadata": metadata},
                )
        except Exception as err:
            raise ConversionError(f"AOTInductor cannot compile the int8 PT2E network: {first_line(err)[:300]}") from err
        kernels = int8_kernels(tmp)
        if layers and not kernels:
            raise ConversionError(
                f"the compiled package calls no int8 kernel for the {layers} int8 layers of the graph: inductor's "
                "int8 passes did not run (torchao's x86 quantizer registers them; freezing must be on)."
            )
        error = output_error(load_pt2(tmp), quantized, inputs)
        if error > TOLERANCE:
            raise ConversionError(
                f"the compiled package computes {error:.1%} away from the int8 graph it was compiled from (relative "
                f"error on the example input; tolerated: {TOLERANCE:.0%}): inductor miscompiled it. The trained QAT "
                "model and its int8 graph are unchanged."
            )

    return write_atomic(path, compile_into), kernels


def output_error(package: nn.Module, quantized: nn.Module, inputs: tuple[Any, ...]) -> float:
    """Relative error (L2 norm over every output tensor) of ``package``'s output against ``quantized``'s."""
    with torch.no_grad():
        got = [t.float() for t in torch.utils._pytree.tree_leaves(package(*inputs)) if isinstance(t, torch.Tensor)]
        want = [t.float() for t in torch.utils._pytree.tree_leaves(quantized(*inputs)) if isinstance(t, torch.Tensor)]
    if len(got) != len(want) or any(g.shape != w.shape for g, w in zip(got, want, strict=True)):
        return float("inf")
    diff = sum(float((g - w).pow(2).sum()) for g, w in zip(got, want, strict=True)) ** 0.5
    norm = sum(float(w.pow(2).sum()) for w in want) ** 0.5
    return diff / max(norm, 1e-12)


def load_pt2(path: str | os.PathLike) -> CompiledNetwork:
    """Load a ``.pt2`` int8 package for the CPU, with torch alone.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ArtifactError: if it is not a loadable AOTInductor package.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No int8 artifact at {str(path)!r}.")
    try:
        compiled = torch._inductor.aoti_load_package(str(path))
    except Exception as err:
        raise ArtifactError(f"{str(path)!r} is not a loadable AOTInductor package: {first_line(err)}") from err
    return CompiledNetwork(compiled, path).eval()
