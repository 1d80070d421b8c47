"""The XNNPACK engine's int8 network as an ExecuTorch program, ``model_int8.pte``: what a phone's runtime loads.

The one seam to ExecuTorch's export and runtime. The converted quantize / dequantize graph is exported again,
lowered with ExecuTorch's ``XnnpackPartitioner`` (each quantize / dequantize / layer pattern becomes an XNNPACK int8
operator inside the delegate) and written as a flatbuffer that ExecuTorch's Android, iOS, C++ and Python runtimes load
(``docs/deployment.md``). :class:`PteNetwork` runs it from Python (ExecuTorch's wheel links the XNNPACK delegate), so
the report evaluates and times the file that ships, not the graph it came from.

**Batch sizes.** ExecuTorch plans the program's memory for its largest inputs and a runtime allocates that plan when it
loads the program, so the batch dimension is dynamic up to a bound (:data:`MAX_BATCH`, or the example's batch if
larger), stored in the program as the constant method ``max_batch``. :class:`PteNetwork` runs a larger batch in
chunks. Where the network fixes its batch size (``torch.export`` cannot make it dynamic), the program takes the
example's shapes only, ``max_batch`` is 0, and other shapes are refused with both named.

**First call at the bound.** With ExecuTorch 1.5, a dynamic program first run with fewer rows than its bound computes
garbage when later run with more (torchvision's mobilenet_v3_small: relative error 4e8 at 8 rows after a first call
with 1; fine after a first call with 8). :class:`PteNetwork` makes its first call at the bound; a phone app must too.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_qat.exceptions import ArtifactError, ConversionError, first_line
from lightning_qat.export.aoti import Shapes, fits, output_error, program_shapes, shapes_of, show
from lightning_qat.export.pt2e_graph import float_bias_where_int32_misses
from lightning_qat.files import write_atomic
from lightning_qat.quantization import pt2e, xnnpack
from lightning_qat.quantization.exported import inference_only
from lightning_qat.quantization.inputs import batch_size, cpu_inputs, with_batch

MAX_BATCH = 8  # the default bound of the batch dimension: a phone app pays the memory plan of the largest batch
# largest relative error of the program's output against the graph's: XNNPACK requantizes between its int8 operators
# in integer arithmetic, torch's reference graph in float, and the difference adds up over the layers (resnet18 after
# 4 QAT steps: 5.7%); a program that computes something else is far beyond it
TOLERANCE = 0.15
BATCH_METHOD = "max_batch"  # the program's constant method: the largest batch it takes (0: the example's only)
# what ExecuTorch's portable kernels run outside the delegate without arithmetic (shape reads, reshapes, memory-format
# copies): not counted as float compute
_LAYOUT = (
    "sym_size",
    "view_copy",
    "squeeze_copy",
    "unsqueeze_copy",
    "_to_dim_order_copy",
    "getitem",
    "executorch_call_delegate",
)


@dataclass
class Program:
    """A written ``.pte``: where, what runs in the XNNPACK delegate and what outside it, the shapes it takes.

    ``delegated``: operators inside the XNNPACK delegate; ``outside``: the others, by name (ExecuTorch's portable
    kernels, float), reshapes and memory-format copies (``_LAYOUT``) apart in ``layout``; ``shapes``: the input
    shapes, ``None`` for the dynamic batch dimension (up to ``max_batch``); ``static``: why it takes the example's
    batch only; ``float_bias``: the layers lowered in float because XNNPACK's int32 bias would miss theirs.
    """

    path: Path
    delegated: int
    outside: dict[str, int]
    shapes: Shapes
    max_batch: int
    layout: int = 0
    static: str = ""
    out_spec: Any = field(default=None, repr=False)
    float_bias: list[str] = field(default_factory=list)

    @property
    def share(self) -> float:
        """The share of the program's arithmetic operators that run inside the XNNPACK delegate."""
        total = self.delegated + sum(self.outside.values())
        return self.delegated / total if total else 1.0


@contextlib.contextmanager
def quiet_native() -> Iterator[None]:
    """Silence what ExecuTorch's C++ prints to stderr while loading (its CPU probe's lines) for the block."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class PteNetwork(nn.Module):
    """A ``.pte`` program in ExecuTorch's runtime, as a module: tensors in, the program's outputs out.

    ``threads``: ExecuTorch's thread pool size (default: torch's, so that timings compare like with like); the pool
    is the process's, and is set before the program loads (resetting it under a loaded XNNPACK program hangs).
    ``out_spec``: the pytree of the network's outputs (a dict, a tuple...), known where the program was written;
    without it one output is returned as a tensor and several as a tuple.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None, out_spec: Any = None) -> None:
        super().__init__()
        xnnpack.require("a .pte artifact")
        with xnnpack.quiet():
            from executorch.extension.pybindings import portable_lib
            from executorch.runtime import Runtime

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"No int8 artifact at {str(self.path)!r}.")
        wanted = threads or torch.get_num_threads()
        try:
            with quiet_native():  # the thread pool's creation and the first load probe the CPU, loudly
                if portable_lib._threadpool_get_thread_count() != wanted:
                    portable_lib._unsafe_reset_threadpool(wanted)
                program = Runtime.get().load_program(self.path)
                self.method = program.load_method("forward")
                names = program.method_names
                self.max_batch = int(program.load_method(BATCH_METHOD).execute([])[0]) if BATCH_METHOD in names else 0
        except Exception as err:
            raise ArtifactError(f"{str(self.path)!r} is not a loadable ExecuTorch program: {first_line(err)}") from err
        meta = self.method.metadata
        self.planned: Shapes = [list(meta.input_tensor_meta(i).sizes()) for i in range(meta.num_inputs())]
        if self.max_batch and self.planned and self.planned[0]:  # never more rows than ExecuTorch planned memory for
            self.max_batch = min(self.max_batch, int(self.planned[0][0] or 1))
        self.out_spec = out_spec
        self._warm = not self.max_batch

    def forward(self, *args: Any) -> Any:
        """The program on ``args`` (batches above ``max_batch`` in chunks).

        Raises:
            ValueError: naming both shapes, for inputs of other shapes than the program takes.
        """
        inputs = [t.detach().contiguous() for t in torch.utils._pytree.tree_leaves(args) if isinstance(t, torch.Tensor)]
        shapes = shapes_of(inputs)
        takes = [[None, *s[1:]] for s in self.planned] if self.max_batch else self.planned
        if not fits(shapes, takes):
            bound = f" (batch up to {self.max_batch}, larger in chunks)" if self.max_batch else ""
            raise ValueError(
                f"{self.path.name} takes inputs of shapes {show(takes)}{bound} and got {show(shapes)}: an ExecuTorch "
                "program takes the shapes it was exported for."
            )
        batch = int(inputs[0].shape[0]) if inputs and inputs[0].dim() else 1
        if not self._warm:  # the first call at the bound: see the module's note
            self.method.execute([t[torch.arange(self.max_batch) % batch] for t in inputs])
            self._warm = True
        step = self.max_batch or batch
        chunks = [self.method.execute([t[i : i + step] for t in inputs]) for i in range(0, batch, step)]
        outputs = [torch.cat(parts) if len(chunks) > 1 else parts[0] for parts in zip(*chunks, strict=True)]
        if self.out_spec is not None:
            return torch.utils._pytree.tree_unflatten(outputs, self.out_spec)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def save_pte(
    quantized: nn.Module,
    path: str | os.PathLike,
    example_inputs: tuple[Any, ...],
    max_batch: int = MAX_BATCH,
    check: bool = True,
) -> Program:
    """Lower the int8 graph ``quantized`` (the XNNPACK engine's) to the ExecuTorch program ``path`` (atomically).

    For batches up to ``max_batch`` (at least the example's) where ``torch.export`` can make the batch dynamic, else
    for the example's shapes (see the module's note). Checked against the graph at batch 1, the example's and the
    bound (:data:`TOLERANCE`); ``check=False`` (the preflight, on a network not trained yet) runs it there unchecked.

    Raises:
        ConversionError: if ExecuTorch cannot lower or run the graph, or its outputs differ from the graph's.
    """
    xnnpack.require("a .pte artifact")
    inputs = cpu_inputs(example_inputs)
    graph = copy.deepcopy(quantized.exported if pt2e.is_exported(quantized) else quantized)
    moved = []
    if isinstance(graph, torch.fx.GraphModule):
        inference_only(graph)
        moved = float_bias_where_int32_misses(graph)
    upper = max(max_batch, batch_size(inputs), 2)
    written: list[Program] = []

    def lower_into(tmp: Path) -> None:
        # one row more than the bound, when the bound fails: ExecuTorch 1.5 plans some programs traced at exactly 16
        # rows with an intermediate of 16 rows fixed (docs/deployment.md), and 17 works
        errors: list[str] = []
        for bound in (upper, upper + 1, 0):
            try:
                program = _lower(graph, quantized, tmp, inputs, bound, check)
            except ConversionError as err:
                if not bound:
                    raise
                errors.append(first_line(err))
                continue
            program.static = "" if bound else errors[0]
            written.append(program)
            return

    final = write_atomic(path, lower_into)
    written[-1].path, written[-1].float_bias = final, moved
    return written[-1]


def _lower(
    graph: nn.Module, quantized: nn.Module, tmp: Path, inputs: tuple[Any, ...], upper: int, check: bool
) -> Program:
    with xnnpack.quiet():
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower

    batch = batch_size(inputs)
    # traced at the bound: ExecuTorch plans the memory of a program traced at fewer than 16 rows for 15 at most,
    # whatever the bound (measured on TinyNet: traced at 2 with a bound of 128, batch 16 fails)
    traced = with_batch(inputs, upper) if upper else inputs
    dims = _batch_dims(traced, upper) if upper else None
    try:
        with xnnpack.quiet(), torch.no_grad():
            exported = torch.export.export(graph, traced, dynamic_shapes=dims)
            shapes = program_shapes(exported)
            edge = to_edge_transform_and_lower(
                exported, partitioner=[XnnpackPartitioner()], constant_methods={BATCH_METHOD: upper}
            )
            delegated, outside, layout = _delegation(edge.exported_program())
            tmp.write_bytes(edge.to_executorch().buffer)
    except Exception as err:
        raise ConversionError(f"ExecuTorch cannot lower the int8 network to XNNPACK: {first_line(err)[:300]}") from err
    if upper and all(None not in shape for shape in shapes):
        raise ConversionError("torch.export fixed the batch size: the network's code depends on it")
    network = PteNetwork(tmp, out_spec=exported.call_spec.out_spec)
    for size in dict.fromkeys((1, batch, upper) if upper else (batch,)):
        rows = with_batch(inputs, size)
        try:
            with torch.no_grad(), quiet_native():  # a failed call prints its instruction; the error says it
                if check:
                    error = output_error(network, quantized, rows)
                else:
                    network(*rows)  # it runs; its outputs are not compared (see save_pte)
                    error = 0.0
        except RuntimeError as err:
            raise ConversionError(f"ExecuTorch cannot run the program at batch {size}: {first_line(err)}") from err
        if error > TOLERANCE:
            raise ConversionError(
                f"the ExecuTorch program computes {error:.1%} away from the int8 graph it was lowered from at batch "
                f"{size} (relative error; tolerated: {TOLERANCE:.0%}). The trained QAT model and its int8 graph are "
                "unchanged."
            )
    return Program(tmp, delegated, outside, shapes, upper, layout, out_spec=exported.call_spec.out_spec)


def _batch_dims(inputs: tuple[Any, ...], upper: int) -> Any:
    """``torch.export``'s ``dynamic_shapes``: every tensor's first dimension is the batch, from 1 to ``upper``."""
    batch = torch.export.Dim("batch", min=1, max=upper)
    return torch.utils._pytree.tree_map(
        lambda value: {0: batch} if isinstance(value, torch.Tensor) and value.dim() else None, inputs
    )


def _delegation(program: torch.export.ExportedProgram) -> tuple[int, dict[str, int], int]:
    """Operators inside the XNNPACK delegates; those outside by name; how many of those are reshapes or shape reads."""
    delegated, outside, layout = 0, Counter[str](), 0
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        name = _op_name(node.target)
        if name == "executorch_call_delegate":
            lowered = getattr(program.graph_module, str(node.args[0].target))
            graph = lowered.original_module.graph
            delegated += sum(1 for inner in graph.nodes if inner.op == "call_function")
        elif any(kind in name for kind in _LAYOUT):
            layout += 1
        else:
            outside[name] += 1
    return delegated, dict(outside.most_common()), layout


def _op_name(target: Any) -> str:
    """``aten.view_copy`` for an edge operator, the function's name otherwise."""
    name = getattr(target, "__name__", None) or str(target)
    return name.removesuffix(".default")


def load_pte(path: str | os.PathLike, threads: int | None = None) -> PteNetwork:
    """Load a ``.pte`` int8 program in ExecuTorch's runtime (see :class:`PteNetwork`).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ArtifactError: if it is not a loadable ExecuTorch program.
    """
    return PteNetwork(path, threads).eval()
