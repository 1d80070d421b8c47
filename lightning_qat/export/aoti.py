"""The PT2E int8 network as an AOTInductor package, ``model_int8.pt2``: compiled C++ that torch alone loads.

Compiled with inductor's freezing on and gradients off, so torchao's x86 passes replace each quantize / dequantize /
layer pattern with a oneDNN int8 kernel (``_qconv_pointwise``, ``_qlinear_pointwise``); without freezing the layers
compile to float kernels, silently (pytorch/ao#4566). :func:`int8_kernels` reads the compiled package to check it.
Loading needs neither torchao nor the training code: ``torch._inductor.aoti_load_package(path)``.

**Any batch size and sequence length.** The package is compiled with a dynamic batch dimension and, for token ids
and masks, a dynamic length (:func:`~lightning_qat.quantization.pt2e.dynamic_dims`), after :mod:`.layout`'s pass
(which works around torch 2.14's wrong layout for one-channel int8 convolutions). It is checked against the quantize
/ dequantize graph it was compiled from at batch 1, the example's, a larger one and a sequence one token shorter
(:data:`TOLERANCE`). Where that fails (the network fixes its batch, or inductor miscompiles it), it is compiled for
the example's shapes, checked the same way, says why in :attr:`Package.static`, and refuses other shapes with both
named. Its outputs are plain containers (:class:`Plain`): a ``ModelOutput`` comes back as a dict.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_qat.exceptions import ArtifactError, ConversionError, first_line
from lightning_qat.export.layout import contiguous_linear_inputs, pad_single_channel, separate_prepacks
from lightning_qat.files import write_atomic
from lightning_qat.quantization import pt2e
from lightning_qat.quantization.inputs import batch_size, cpu_inputs, map_tensors, plain, shorter, with_batch

TOLERANCE = 0.05  # largest relative error of the package's output against the graph's: int8 rounding is far below
KERNELS = ("_qconv_pointwise", "_qlinear_pointwise")  # oneDNN's int8 convolution and linear, as inductor calls them
SHAPES_KEY = "lightning_qat.input_shapes"  # the package's metadata: its input shapes (JSON; null: any size)

Shapes = list[list[int | None]]


@dataclass
class Package:
    """A written ``.pt2``: where, how many int8 kernels it calls, the input shapes it takes (``None``: any size)."""

    path: Path
    kernels: int
    shapes: Shapes
    static: str = ""  # why it takes the example's batch size only ("" when it takes any)


class CompiledNetwork(nn.Module):
    """A loaded AOTInductor package as a module, refusing inputs of other shapes than it was compiled for.

    (The compiled code does not check them: a package for batches of 64 returns 64 rows of garbage for 7.) Inputs are
    made contiguous first: the compiled code reads them with the example's strides, so a slice (``ids[:, :64]`` of
    a 65-token batch) or a channels-last image gave a wrong output, silently (BERT: 5% off in float).
    """

    def __init__(self, compiled: Any, path: Path) -> None:
        super().__init__()
        self.compiled = compiled
        self.path = path
        metadata = compiled.get_metadata() if hasattr(compiled, "get_metadata") else {}
        shapes = metadata.get(SHAPES_KEY)
        self.input_shapes: Shapes | None = json.loads(shapes) if shapes else None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The compiled network on inputs of the shapes it was compiled for.

        Raises:
            ValueError: naming both shapes, for inputs of other shapes.
        """
        if self.input_shapes is not None:
            shapes = shapes_of((args, kwargs))
            if not fits(shapes, self.input_shapes):
                raise ValueError(
                    f"{self.path.name} was compiled for inputs of shapes {show(self.input_shapes)} and got "
                    f"{show(shapes)}: an AOTInductor package takes the shapes it was compiled for (any: any size)."
                )
        args, kwargs = map_tensors(torch.Tensor.contiguous, (args, kwargs))
        return self.compiled(*args, **kwargs)


def show(shapes: Shapes) -> str:
    """Shapes as ``[[any, 1, 8, 8]]``."""
    return "[" + ", ".join("[" + ", ".join("any" if d is None else str(d) for d in s) + "]" for s in shapes) + "]"


def fits(shapes: Shapes, compiled: Shapes) -> bool:
    """Whether inputs of ``shapes`` are of the ``compiled`` ones (``None``: any size)."""
    return len(shapes) == len(compiled) and all(
        len(got) == len(want) and all(w is None or g == w for g, w in zip(got, want, strict=True))
        for got, want in zip(shapes, compiled, strict=True)
    )


def shapes_of(value: Any) -> Shapes:
    """The shapes of the tensors in ``value`` (a pytree), in order."""
    return [list(t.shape) for t in torch.utils._pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]


def int8_kernels(path: str | os.PathLike) -> int:
    """How many int8 convolution / linear kernel calls the compiled package's generated code makes."""
    with zipfile.ZipFile(path) as archive:
        sources = [archive.read(name).decode(errors="replace") for name in archive.namelist() if name.endswith(".cpp")]
    return sum(source.count(kernel) for source in sources for kernel in KERNELS)


def save_pt2(
    quantized: nn.Module, path: str | os.PathLike, example_inputs: tuple[Any, ...], any_batch: bool = True
) -> Package:
    """Compile the int8 PT2E graph ``quantized`` for the CPU into the package ``path`` (written atomically).

    For any batch size where that compiles correctly, else (or with ``any_batch=False``) for the example's shapes
    (see the module's note).

    Raises:
        ConversionError: if inductor cannot compile the graph, the package calls no int8 kernel while the graph has
            int8 layers, or its output differs from the graph's by more than :data:`TOLERANCE`.
    """
    pt2e.require("a .pt2 artifact")
    inputs = cpu_inputs(example_inputs)
    graph = copy.deepcopy(quantized.exported if pt2e.is_exported(quantized) else quantized)
    if isinstance(graph, torch.fx.GraphModule):
        pad_single_channel(graph)
        contiguous_linear_inputs(graph)
    graph = Plain(graph)
    written: list[Package] = []

    def compile_into(tmp: Path) -> None:
        if not any_batch:
            written.append(_compile(graph, quantized, tmp, inputs, dynamic=False))
        else:
            try:
                written.append(_compile(graph, quantized, tmp, inputs, dynamic=True))
            except ConversionError as err:
                package = _compile(graph, quantized, tmp, inputs, dynamic=False)
                package.static = first_line(err)
                written.append(package)
        slim(tmp, inputs)

    final = write_atomic(path, compile_into)
    written[-1].path = final
    return written[-1]


class Plain(nn.Module):
    """``network`` returning :func:`~lightning_qat.quantization.inputs.plain` containers: the package loads anywhere."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The network's output, mappings as dicts and named tuples as tuples."""
        return plain(self.network(*args, **kwargs))


def _compile(graph: nn.Module, quantized: nn.Module, tmp: Path, inputs: tuple[Any, ...], dynamic: bool) -> Package:
    batch = batch_size(inputs)
    # a dimension of size 1 is never exported dynamic (torch.export specializes it): export a batch of 2
    traced = with_batch(inputs, 2) if dynamic and batch == 1 else inputs
    try:
        with pt2e.quiet(), torch.no_grad():  # without no_grad inductor skips freezing: float kernels
            program = torch.export.export(
                graph, traced, dynamic_shapes={"args": pt2e.dynamic_dims(traced)} if dynamic else None
            )
            shapes = program_shapes(program)
            metadata = {SHAPES_KEY: json.dumps(shapes)}
            with separate_prepacks():
                torch._inductor.aoti_compile_and_package(
                    program,
                    package_path=str(tmp),
                    inductor_configs={"freezing": True, "aot_inductor.metadata": metadata},
                )
    except Exception as err:
        raise ConversionError(f"AOTInductor cannot compile the int8 PT2E network: {first_line(err)[:300]}") from err
    if dynamic and all(None not in shape for shape in shapes):
        raise ConversionError("torch.export fixed the batch size: the network's code depends on it")
    kernels = int8_kernels(tmp)
    layers = pt2e.int8_layers(quantized)
    if layers and not kernels:
        raise ConversionError(
            f"the compiled package calls no int8 kernel for the {layers} int8 layers of the graph: inductor's "
            "int8 passes did not run (torchao's x86 quantizer registers them; freezing must be on)."
        )
    package = load_pt2(tmp)
    checks = {
        f"batch {size}": with_batch(inputs, size) for size in ((1, batch, 2 * batch + 1) if dynamic else (batch,))
    }
    if any(None in shape[1:] for shape in shapes):  # token sequences of any length
        checks["a sequence one token shorter"] = shorter(inputs)
    for where, checked in checks.items():
        error = output_error(package, quantized, checked)
        if error > TOLERANCE:
            raise ConversionError(
                f"the compiled package computes {error:.1%} away from the int8 graph it was compiled from at "
                f"{where} (relative error; tolerated: {TOLERANCE:.0%}): inductor miscompiled it. The trained QAT "
                "model and its int8 graph are unchanged."
            )
    return Package(tmp, kernels, shapes)


def slim(path: Path, inputs: tuple[Any, ...]) -> int:
    """Drop from the package at ``path`` what loading it does not use; returns the bytes saved.

    The generated C++ sources (read by :func:`int8_kernels` before) and the shared library's debug sections (with
    binutils' ``strip``, where the machine has it: inductor's compiler does); the rest is deflated (AOTInductor
    writes it stored: its compiled code, which weighs most in a small model, deflates about 3x; the loader extracts
    the library either way). The package stays as it was when the slim one does not load or computes anything else
    on ``inputs``.
    """
    strip, before = shutil.which("strip"), path.stat().st_size
    slimmed = path.with_name(f"slim-{path.name}")
    try:
        with zipfile.ZipFile(path) as source, zipfile.ZipFile(slimmed, "w") as target:
            for info in source.infolist():
                if not info.filename.endswith(".cpp"):
                    data = source.read(info)
                    data = _stripped(data, strip) if strip and info.filename.endswith(".so") else data
                    target.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
        if output_error(load_pt2(slimmed), load_pt2(path), inputs) != 0.0:
            return 0
        os.replace(slimmed, path)
    except (OSError, ArtifactError, subprocess.CalledProcessError):
        return 0
    finally:
        slimmed.unlink(missing_ok=True)
    return before - path.stat().st_size


def _stripped(library: bytes, strip: str) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        file = Path(folder) / "library.so"
        file.write_bytes(library)
        subprocess.run([strip, "--strip-debug", str(file)], check=True, capture_output=True)
        return file.read_bytes()


def program_shapes(program: torch.export.ExportedProgram) -> Shapes:
    """The user inputs' shapes in ``program``, ``None`` for each dimension exported dynamic."""
    users = set(program.graph_signature.user_inputs)
    shapes: Shapes = []
    for node in program.graph.nodes:
        value = node.meta.get("val")
        if node.op == "placeholder" and node.name in users and isinstance(value, torch.Tensor):
            shapes.append([d if isinstance(d, int) else None for d in value.shape])
    return shapes


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
