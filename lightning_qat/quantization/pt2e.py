"""The PT2E engine: ``torch.export`` capture, torchao's ``prepare_qat_pt2e`` / ``convert_pt2e``; the one torchao seam.

torchao is an optional extra (``pip install 'lightning-qat[pt2e]'``); nothing here imports it before it is asked
for. What torchao does not do, this module does:

- **train / eval switching**: :class:`~lightning_qat.quantization.exported.ExportedQAT` (torch only).
- **BatchNorm arguments.** ``prepare_qat_pt2e``'s Conv-BN rewrite itself drops ``eps`` and ``momentum`` (1e-5 and 0.1
  for every BatchNorm, whatever the network used): they are put back from the captured graph.
- **convert speed.** ``convert_pt2e`` exports the same small pattern graphs on every call, whatever the network:
  they are built once per process and reused (:func:`_cached_patterns`; the cost is in the manual's PT2E page).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import importlib.util
import logging
import warnings
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any, TypeGuard

import torch
from torch import nn

from lightning_qat.exceptions import NotTraceable, PT2EUnavailable, first_line
from lightning_qat.quantization import xnnpack
from lightning_qat.quantization.exported import BATCH_NORM, LAYER_CALLS, ExportedQAT
from lightning_qat.quantization.fallback import dropped_quantizers
from lightning_qat.quantization.symmetric import SymmetricWeights

INSTALL_HINT = "pip install 'lightning-qat[pt2e]'  (torchao >= 0.18)"
MIN_TORCH = (2, 11)  # torchao 0.18's own lower bound
BACKENDS = ("x86", "fbgemm")  # torchao's X86InductorQuantizer; XNNPACK's is ExecuTorch's (quantization.xnnpack)

_SILENCED = (
    r".*is an Enum subclass and is now natively supported",  # torchao's import, on torch 2.14
    r"torch\.tensor\(w_zp_tensor",
    r"To copy construct from a tensor",
    r".*erase_node\(.*\) on an already erased node",
    r"While compiling, we found certain side effects",  # dynamo, on Hugging Face's output-capturing globals
)


def missing() -> str | None:
    """Why the PT2E engine cannot run here (torchao not installed, torch too old), or ``None``."""
    have = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    if have < MIN_TORCH:
        return f"torchao's PT2E flow needs torch >= {'.'.join(map(str, MIN_TORCH))} (this is {torch.__version__})"
    if importlib.util.find_spec("torchao") is None:
        return f"torchao is not installed: {INSTALL_HINT}"
    return None


def require(what: str = "engine='pt2e'") -> None:
    """Raise :class:`~lightning_qat.PT2EUnavailable` naming the fix unless the PT2E engine can run."""
    reason = missing()
    if reason is not None:
        raise PT2EUnavailable(f"{what} cannot run: {reason}.")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence what torch.export, torchao and inductor say on every call (their warnings and info logs)."""
    names = ("torch._dynamo", "torch._inductor", "torch.export", "torch.utils._pytree", "torch.utils.cpp_extension")
    loggers = [logging.getLogger(name) for name in (*names, "torchao")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        for message in _SILENCED:
            warnings.filterwarnings("ignore", message=message)
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


def is_exported(network: nn.Module) -> TypeGuard[ExportedQAT]:
    """Whether ``network`` is a PT2E-prepared :class:`ExportedQAT` (or its int8 conversion's wrapper)."""
    return isinstance(network, ExportedQAT)


def dynamic_dims(example_inputs: tuple[Any, ...]) -> Any:
    """``torch.export``'s ``dynamic_shapes`` for ``example_inputs``: the batch, and the length of token sequences.

    Every tensor's first dimension (the batch), and the second of a 2-D integer or boolean tensor (token ids and
    attention masks: a text model takes any length; an integer image keeps its size). ``AUTO`` leaves a dimension
    static where the code fixes it (a learned position table of one size).
    """

    def dims(value: Any) -> dict[int, Any] | None:
        if not isinstance(value, torch.Tensor) or not value.dim():
            return None
        sequence = value.dim() == 2 and not (value.is_floating_point() or value.is_complex())
        return dict.fromkeys(range(2 if sequence else 1), torch.export.Dim.AUTO)

    return torch.utils._pytree.tree_map(dims, example_inputs)


def capture(network: nn.Module, example_inputs: tuple[Any, ...], strict: bool) -> torch.fx.GraphModule:
    """``network`` captured by ``torch.export`` in training mode, its batch and sequence lengths dynamic."""
    network.train()
    with quiet():
        return torch.export.export(
            network, example_inputs, dynamic_shapes=dynamic_dims(example_inputs), strict=strict
        ).module()


def _quantizer(backend: str, qat: bool, skip: Sequence[str], dynamic: bool = False) -> Any:
    if backend in xnnpack.BACKENDS:  # ExecuTorch's, for phones; static activations (the engine has no dynamic ones)
        return _Quantizer(xnnpack.quantizer(qat, skip))
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (  # registers inductor's int8 passes
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} has no PT2E quantizer here; valid values are {list(BACKENDS)}.")
    quantizer = X86InductorQuantizer()
    if dynamic:  # Linears only, activations quantized per batch (as torch.ao's dynamic artifact); the rest float
        quantizer.set_module_type_qconfig(nn.Linear, get_default_x86_inductor_quantization_config(qat, True))
    else:
        quantizer.set_global(get_default_x86_inductor_quantization_config(is_qat=qat))
    for name in skip:
        quantizer.set_module_name_qconfig(name, None)
    return _Quantizer(quantizer)


def outside(skip: Sequence[str]) -> Callable[[torch.fx.Node], bool]:
    """Whether a captured graph's node comes from no module of ``skip`` (a quantizer's filter), by torchao's reading."""
    from torchao.quantization.pt2e.quantizer.utils import get_module_name_filter

    inside = [get_module_name_filter(name) for name in skip]
    return lambda node: not any(within(node) for within in inside)


class _Quantizer:
    """torchao's x86 quantizer (or ExecuTorch's XNNPACK one), with four corrections to what it annotates.

    - **Every linear call is a linear.** It finds linears by the source ``torch.export`` records for each call, and
      the capture records the ``F.linear`` calls inside ``nn.MultiheadAttention`` (torchvision's ViT, the zoo's text
      encoder) as the attention module's: their in- and out-projections stayed float, and were stored float in the
      compiled package (a ViT's package twice the TorchScript artifact's size). They are marked as linear calls.
    - **Integer tensors are not quantized.** It annotates ``mul`` / ``add`` whatever their dtype, so integer
      arithmetic on token ids (RoBERTa's position ids: ``cumsum(mask) * mask``) got a fake-quant in training and a
      float-only ``quantize_per_tensor`` on an int32 tensor at conversion, which raises: those annotations are
      taken back.
    - **A skipped convolution carries no annotation.** ``skip=`` leaves it an empty one, and torchao's QAT Conv-BN
      fusion reads the first input spec of every annotated convolution: ``IndexError`` in ``prepare``, so
      ``skip=["conv1"]`` refused every network whose conv1 has a BatchNorm.
    - **Weights train on the grid they ship on.** torchao's fused weight fake-quant has torch's faults (a channel of
      one sign trained on an affine grid of half the scale, every channel converted on a finer one than trained):
      its weight specs take :func:`weight_fake_quant` instead.
    """

    def __init__(self, quantizer: Any) -> None:
        self.quantizer = quantizer

    def __getattr__(self, name: str) -> Any:  # transform_for_annotation, validate, prepare_obs_or_fq_callback
        return getattr(self.quantizer, name)

    def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
        from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

        for node in model.graph.nodes:
            stack = node.meta.get("source_fn_stack")
            if str(node.target) == "aten.linear.default" and stack and stack[-1][1] is nn.MultiheadAttention:
                node.meta["source_fn_stack"] = [*stack, (node.name, nn.functional.linear)]
        model = self.quantizer.annotate(model)
        for node in model.graph.nodes:
            annotation = node.meta.get(Q_ANNOTATION_KEY)
            if annotation is None:
                continue
            skipped = not annotation.input_qspec_map and annotation.output_qspec is None
            if skipped and str(node.target).startswith("aten.conv"):
                del node.meta[Q_ANNOTATION_KEY]
                continue
            for source in [source for source in annotation.input_qspec_map if not _is_float(source)]:
                del annotation.input_qspec_map[source]
            for source, spec in annotation.input_qspec_map.items():
                annotation.input_qspec_map[source] = _symmetric(spec)
            if not _is_float(node):
                annotation.output_qspec = None
        return model


def _symmetric(spec: Any) -> Any:
    """``spec`` with :func:`weight_fake_quant` if it makes torchao's fused fake-quant for symmetric weights."""
    from torchao.quantization.pt2e.fake_quantize import FusedMovingAvgObsFakeQuantize

    partial = getattr(getattr(spec, "observer_or_fake_quant_ctr", None), "p", None)  # torchao's `with_args` wrapper
    symmetric = getattr(spec, "qscheme", None) in (torch.per_channel_symmetric, torch.per_tensor_symmetric)
    if not symmetric or not isinstance(partial, functools.partial) or partial.func is not FusedMovingAvgObsFakeQuantize:
        return spec
    make = weight_fake_quant().with_args(*partial.args, **partial.keywords)  # type: ignore[attr-defined]
    return dataclasses.replace(spec, observer_or_fake_quant_ctr=make)


@functools.cache
def weight_fake_quant() -> type[nn.Module]:
    """Torchao's fused fake-quant with :class:`~lightning_qat.quantization.symmetric.SymmetricWeights`' forward.

    Made on first use: torchao is imported only when the PT2E engine runs.
    """
    from torchao.quantization.pt2e.fake_quantize import FusedMovingAvgObsFakeQuantize

    class WeightFakeQuantize(SymmetricWeights, FusedMovingAvgObsFakeQuantize):
        """torchao's fused weight fake-quant, symmetric in every channel, converted with the scale it trained with."""

    return WeightFakeQuantize


def _is_float(node: Any) -> bool:
    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return not isinstance(value, torch.Tensor) or value.dtype.is_floating_point


def _batch_norm_args(graph_module: torch.fx.GraphModule) -> dict[str, tuple[Any, Any]]:
    """``(momentum, eps)`` of each batch-norm call, by its running mean's buffer name."""
    found = {}
    for node in graph_module.graph.nodes:
        if node.op == "call_function" and str(node.target) == BATCH_NORM and node.args[3] is not None:
            found[str(node.args[3].target)] = (node.args[6], node.args[7])
    return found


def restore_batch_norm_args(graph_module: torch.fx.GraphModule, saved: dict[str, tuple[Any, Any]]) -> int:
    """Put back each batch norm's ``momentum`` and ``eps`` that ``prepare_qat_pt2e``'s Conv-BN rewrite reset.

    Also the ``eps`` of the rewrite's weight scaling (``gamma / sqrt(running_var + eps)``). Returns how many batch
    norms had lost theirs.
    """
    fixed = 0
    for node in graph_module.graph.nodes:
        if node.op != "call_function" or str(node.target) != BATCH_NORM or node.args[3] is None:
            continue
        momentum, eps = saved.get(str(node.args[3].target), (node.args[6], node.args[7]))
        if (node.args[6], node.args[7]) == (momentum, eps):
            continue
        fixed += 1
        node.update_arg(6, momentum)
        node.update_arg(7, eps)
        running_var = node.args[4]
        for user in list(running_var.users):
            if (
                str(user.target) == "aten.add.Tensor"
                and user.args[0] is running_var
                and isinstance(user.args[1], float)
            ):
                user.update_arg(1, eps)
    graph_module.recompile()
    return fixed


def prepare(
    network: nn.Module,
    example_inputs: tuple[Any, ...],
    backend: str,
    skip: Sequence[str] = (),
    qat: bool = True,
    dynamic: bool = False,
) -> ExportedQAT:
    """Capture ``network`` and insert torchao's fake-quant (``qat``) or observers (post-training calibration).

    Strict capture first (torchao's x86 quantizer fails on a non-strict capture of a network that calls one ReLU
    module at several places, as torchvision's ResNets do), then non-strict.

    Raises:
        NotTraceable: naming both attempts' errors, when neither can be captured and prepared.
    """
    require()
    with quiet():
        from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e, prepare_qat_pt2e

        quantizer = _quantizer(backend, qat, skip, dynamic)
    errors = []
    for strict in (True, False):
        how = "strict" if strict else "non-strict"
        try:
            graph_module = capture(network, example_inputs, strict)
        except Exception as err:  # noqa: BLE001 - both attempts are reported together
            errors.append(f"{how}: {type(err).__name__}: {first_line(err)[:200]}")
            continue
        saved = _batch_norm_args(graph_module)
        try:
            with quiet():
                prepared = (prepare_qat_pt2e if qat else prepare_pt2e)(graph_module, quantizer)
        except Exception as err:  # noqa: BLE001 - both attempts are reported together
            errors.append(f"{how}, then torchao's prepare: {type(err).__name__}: {first_line(err)[:200]}")
            continue
        restore_batch_norm_args(prepared, saved)
        wrapped = ExportedQAT(prepared, backend)
        wrapped.train(qat)
        return wrapped
    cache = " (a decoder's key/value cache: build it with use_cache=False)" if "Cache" in str(errors) else ""
    raise NotTraceable(f"torch.export cannot capture {type(network).__name__} for torchao ({'; '.join(errors)}){cache}")


def conv_bn_count(network: ExportedQAT) -> int:
    """How many batch norms torchao's QAT rewrite fused with the convolution before them."""
    count = 0
    for node in network.exported.graph.nodes:
        if node.op == "call_function" and str(node.target) == BATCH_NORM:
            producer = node.args[0]
            for _ in range(3):  # batch_norm(add(div(conv, scale), bias)): the rewrite's pattern
                if not isinstance(producer, torch.fx.Node) or not producer.args:
                    break
                if "conv" in str(producer.target):
                    count += 1
                    break
                producer = producer.args[0]
    return count


def convert(network: ExportedQAT, float_nodes: Collection[str] = ()) -> ExportedQAT:
    """The int8 (quantize / dequantize) graph of a copy of ``network``, BatchNorm folded; ``network`` untouched.

    ``float_nodes`` (:func:`~lightning_qat.quantization.fallback.float_nodes`) stay float: the fake-quants that keeping
    them float drops are taken out of the copy's graph first, so conversion writes no quantize / dequantize there.
    """
    model = copy.deepcopy(network).cpu().eval()
    if float_nodes:
        _bypass(model.exported, dropped_quantizers(model.exported, float_nodes))
    _relink_annotations(model.exported)
    with quiet(), _cached_patterns():
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

        converted = convert_pt2e(model.exported)
    result = ExportedQAT(converted, network.backend)
    result.eval()
    return result


def _bypass(graph_module: torch.fx.GraphModule, fake_quants: Collection[str]) -> None:
    """Take the calls of the ``fake_quants`` modules out of the graph: their readers read what they were given."""
    for node in list(graph_module.graph.nodes):
        if node.op == "call_module" and str(node.target) in fake_quants:
            node.replace_all_uses_with(node.args[0])
            graph_module.graph.erase_node(node)
    graph_module.recompile()


def _relink_annotations(graph_module: torch.fx.GraphModule) -> None:
    """Point the copied quantizer annotations at the copy's nodes (a deep copy keeps them on copies of the old ones).

    Conversion follows them to port metadata, and for dynamic activations to find each ``choose_qparams``: on stale
    nodes it raises "No chose qparams node found".
    """
    from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

    nodes = {node.name: node for node in graph_module.graph.nodes}
    for node in graph_module.graph.nodes:
        annotation = node.meta.get(Q_ANNOTATION_KEY)
        if annotation is not None:
            annotation.input_qspec_map = {nodes.get(k.name, k): v for k, v in annotation.input_qspec_map.items()}


def _graph(network: nn.Module) -> torch.fx.GraphModule:
    graph_module = network.exported if isinstance(network, ExportedQAT) else network
    assert isinstance(graph_module, torch.fx.GraphModule)
    return graph_module


def int8_layers(quantized: nn.Module) -> int:
    """Convolutions and linear layers of a converted PT2E graph whose weight is int8 (dequantized in the graph)."""
    exported = _graph(quantized)
    count = 0
    for node in exported.graph.nodes:
        if node.op == "call_function" and str(node.target) in LAYER_CALLS and len(node.args) > 1:
            weight = node.args[1]
            count += isinstance(weight, torch.fx.Node) and "dequantize" in str(weight.target)
    return count


def float_parameters(quantized: nn.Module) -> dict[str, int]:
    """Weights of the convolutions and linear layers a converted PT2E graph keeps float, by op (``{"linear": n}``)."""
    exported = _graph(quantized)
    counts: dict[str, int] = {}
    for node in exported.graph.nodes:
        if node.op == "call_function" and str(node.target) in LAYER_CALLS and len(node.args) > 1:
            weight = node.args[1]
            if not isinstance(weight, torch.fx.Node) or "dequantize" in str(weight.target):
                continue
            # a plain weight, or one computed from constants (an unquantized Conv-BN pair of the QAT rewrite)
            tensor: Any = weight.meta.get("val")
            if weight.op == "get_attr":
                tensor = functools.reduce(getattr, str(weight.target).split("."), exported)
            if isinstance(tensor, torch.Tensor):
                name = str(node.target).split(".")[1]
                counts[name] = counts.get(name, 0) + tensor.numel()
    return counts


def fake_quant_base() -> type[nn.Module] | None:
    """Torchao's fake-quant base class, once torchao is imported (``None`` before: no network can hold one)."""
    import sys

    module = sys.modules.get("torchao.quantization.pt2e.fake_quantize")
    return getattr(module, "FakeQuantizeBase", None)


@contextlib.contextmanager
def _cached_patterns() -> Iterator[None]:
    """Reuse the pattern graphs ``convert_pt2e`` exports (the same 96 on every call) within this process.

    A private torchao function is wrapped for the block only (``tests/test_pt2e.py`` fails when torchao renames it or
    changes its parameters): when it is gone, conversion runs as torchao ships it, only slower.
    """
    from torchao.quantization.pt2e import qat_utils

    original = getattr(qat_utils, "_get_aten_graph_module_for_pattern", None)
    if original is None:
        yield
        return
    qat_utils._get_aten_graph_module_for_pattern = functools.partial(_pattern, original)
    try:
        yield
    finally:
        qat_utils._get_aten_graph_module_for_pattern = original


_PATTERNS: dict[Any, torch.fx.GraphModule] = {}
_MOST_PATTERNS = 1024  # a bound, so a long process converting many networks does not grow without end


def _pattern(original: Any, pattern: Any, example_inputs: Any, is_cuda: bool = False, **kwargs: Any) -> Any:
    try:
        function = getattr(pattern, "fn", pattern)  # torchao wraps each pattern function in a module
        cells = tuple(cell.cell_contents for cell in function.__closure__ or ())
        inputs = tuple(_signature(value) for value in example_inputs)
        key = (function.__code__, cells, inputs, is_cuda, tuple((k, _signature(v)) for k, v in sorted(kwargs.items())))
        hash(key)
    except (AttributeError, TypeError, ValueError):
        return original(pattern, example_inputs, is_cuda, **kwargs)
    if key not in _PATTERNS:
        if len(_PATTERNS) >= _MOST_PATTERNS:
            _PATTERNS.clear()
        _PATTERNS[key] = original(pattern, example_inputs, is_cuda, **kwargs)
    return copy.deepcopy(_PATTERNS[key])


def _signature(value: Any) -> Any:
    """What a pattern graph depends on: a tensor's shape and dtype (its values are random examples)."""
    return (tuple(value.shape), value.dtype) if isinstance(value, torch.Tensor) else value
