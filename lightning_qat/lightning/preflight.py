"""Checks run in ``setup``, before the first optimizer step, so that what fails at the end of fit fails in seconds.

Each check raises :class:`~lightning_qat.PreflightError` (a ``ValueError``) naming what to change.
"""

from __future__ import annotations

import inspect
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn

from lightning_qat import files
from lightning_qat.exceptions import ConversionError, EvaluationInterrupted, PreflightError, first_line
from lightning_qat.export.onnx import onnx_bytes
from lightning_qat.export.pte import save_pte
from lightning_qat.export.torchscript import to_torchscript
from lightning_qat.lightning import internals
from lightning_qat.lightning.evaluate import EvalData, Stage, module_with_network, run_evaluation
from lightning_qat.lightning.peers import check_averaging
from lightning_qat.lightning.sigterm import sigterm_raises
from lightning_qat.lightning.state import QATState
from lightning_qat.quantization import ao
from lightning_qat.quantization.convert import cpu_eval_copy, to_int8
from lightning_qat.quantization.engines import Engine, Prepared
from lightning_qat.quantization.measure import count_weight_layers

SUPPORTED_PRECISIONS = ("32-true", "32", 32)
ARTIFACT_NAMES = ("model_int8.pt", "model_int8.pt2", "model_int8.pte", "model_int8.onnx", "qat_report.json")


@dataclass
class Checked:
    """What the preflight made of the freshly prepared network, kept for the choices in ``setup`` that time it.

    ``probe``: a throw-away QAT copy whose observers saw the example; ``quantized``: its int8 conversion;
    ``scripted``: that traced to TorchScript, the artifact of an engine that does not compile (``None`` for one that
    does), so the timings after the preflight do not trace it again.
    """

    probe: nn.Module
    quantized: nn.Module
    scripted: nn.Module | None


def check_fit(
    trainer: pl.Trainer, pl_module: pl.LightningModule, target: str, network: nn.Module, evaluate: Stage | None
) -> nn.Module:
    """The checks that need only the trainer and the float network; returns the network QAT prepares.

    That is ``network`` itself, or the original module of a ``torch.compile``d one.

    Raises:
        ValueError: if ``network`` is QAT-prepared already.
        PreflightError: for a precision QAT cannot train, weight averaging beside it, a missing evaluation step or
            data, or a call to a method of the network from the LightningModule.
    """
    if ao.fake_quant_modules(network):
        raise ValueError(
            f"`{target}` is already QAT-prepared (it has fake-quant modules); preparing it again would "
            "quantize it twice. To continue a QAT run, give `trainer.fit` a float model and the checkpoint: "
            "`trainer.fit(MyModule(), ckpt_path=...)`."
        )
    check_precision(trainer)
    check_averaging(trainer)
    check_evaluation(trainer, pl_module, evaluate)
    network = unwrap_compiled(network, target)
    check_network_calls(pl_module, target, network)
    return network


def run_preflight(
    pl_module: pl.LightningModule,
    state: QATState,
    backend: str,
    evaluate: Stage | None,
    data: EvalData,
    export: Sequence[str] = ("torchscript",),
    monitor: str | None = None,
    dynamic: bool = False,
) -> Checked:
    """What would fail at the end of fit, checked now: determinism, conversion, tracing, ONNX, one int8 batch.

    Every rank runs it (the same checks on the same network), so a failure stops every rank in ``setup``. Also says,
    on rank 0, when the int8 network would hold no quantized layer. ``state``: the freshly prepared network;
    ``export``: the artifact formats the end of fit will write (TorchScript and ONNX are checked now). A
    SIGTERM meanwhile raises :class:`~lightning_qat.EvaluationInterrupted`. Returns what it converted and traced.
    """
    target, prepared, float_network, example_inputs = (
        state.target,
        state.prepared,
        state.float_network,
        state.example_inputs,
    )
    assert target is not None
    assert prepared is not None
    assert float_network is not None
    with sigterm_raises("the QAT preflight"):
        start = time.perf_counter()
        checked = check_network(float_network, prepared, backend, example_inputs, target, export, dynamic)
        if evaluate is not None:
            step = "validation_step" if evaluate == "val" else "test_step"
            clone = module_with_network(pl_module, target, checked.quantized)
            try:
                metrics = run_evaluation(clone, evaluate, backend, data, limit=1)
            except EvaluationInterrupted:
                raise
            except Exception as err:
                raise PreflightError(
                    f"Your `{step}` fails on the int8 network, as the final evaluation would run it: "
                    f"{type(err).__name__}: {err}. Reach the network only through its forward (e.g. `self(x)`), or "
                    "pass evaluate=None."
                ) from err
            if monitor is not None and monitor not in metrics:
                raise PreflightError(
                    f"monitor={monitor!r} is not among the metrics your `{step}` logs for the final evaluation "
                    f"({sorted(metrics) or 'none'}): the evaluation collects what is logged per epoch, so log it with "
                    f"`self.log({monitor!r}, ..., on_epoch=True)` (on_step=True alone is not collected), or set "
                    "monitor to one of those."
                )
        rank_zero_info(
            f"QAT: preflight passed in {time.perf_counter() - start:.2f} s (int8 conversion and evaluation)."
        )
    return checked


def check_network(
    float_network: nn.Module,
    prepared: Prepared,
    backend: str,
    example_inputs: tuple[Any, ...],
    name: str,
    export: Sequence[str] = ("torchscript",),
    dynamic: bool = False,
) -> Checked:
    """The preflight's checks of the network alone (no trainer, no metric): what the end of fit would do to it.

    Determinism in ``eval()``, the example through the prepared network, int8 conversion and a forward pass, the
    artifacts of ``export`` that are traced. Returns the calibrated QAT copy, its int8 conversion (the dynamic one
    with ``dynamic``: the artifact ``activations="dynamic"`` ships) and that traced.
    """
    check_eval_is_deterministic(float_network, prepared.module, example_inputs, name)
    if "torchscript" in export:
        check_outputs(float_network, example_inputs, name)
    probe = check_example(prepared.module, example_inputs, name, prepared=True)
    quantized, scripted = check_conversion(probe, prepared.engine, backend, example_inputs, name, dynamic)
    if count_weight_layers(quantized) == 0:
        rank_zero_warn(
            f"QAT: nothing in `{name}` is quantizable (no Conv, Linear or Embedding outside `skip`): its "
            "int8 model would be no smaller and no faster than the float one."
        )
    if "onnx" in export:
        check_onnx_export(probe, example_inputs, name)
    if "pte" in export:
        check_pte_export(quantized, example_inputs, name)
    return Checked(probe, quantized, scripted)


def check_outputs(float_network: nn.Module, example_inputs: tuple[Any, ...], name: str) -> None:
    """Refuse an output the TorchScript artifact would change silently: a namedtuple (it returns a plain tuple)."""
    with ao.quiet(), torch.no_grad():
        output = float_network(*example_inputs)
    named = _namedtuple_in(output)
    if named is not None:
        fields = ", ".join(f"{field!r}: ..." for field in named._fields)
        raise PreflightError(
            f"`{name}` returns a {type(named).__name__} (a namedtuple): the TorchScript int8 artifact would return a "
            f"plain tuple and `.{named._fields[0]}` would be gone. Return a dict instead ({{{fields}}}), which the "
            "artifact keeps, or pass export=['onnx'] / export=[]."
        )


def _namedtuple_in(value: Any) -> Any:
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return value
    children = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    return next((found for child in children if (found := _namedtuple_in(child)) is not None), None)


def output_dir(trainer: pl.Trainer, save_dir: str | None, overwrite: bool) -> Path:
    """Where the artifact and report go, checked writable and free of an earlier run's files; same on all ranks.

    Not claimed yet: :func:`claim_output_dir` does that.

    ``save_dir``, else the logger's ``log_dir``, else (no logger) a fresh ``default_root_dir/qat/version_N``.

    Raises:
        ValueError: if the directory is not writable.
        PreflightError: if it holds an earlier run's artifact or report and ``overwrite`` is off.
    """
    if save_dir is not None:
        out_dir, what = Path(save_dir), "save_dir"
    elif trainer.logger is not None:
        out_dir, what = Path(trainer.log_dir or trainer.default_root_dir), "the logger's log_dir"
    else:  # no logger: a fresh versioned directory, as Lightning's loggers make
        fresh = str(files.next_version_dir(Path(trainer.default_root_dir) / "qat")) if trainer.is_global_zero else ""
        out_dir, what = Path(trainer.strategy.broadcast(fresh, src=0)), "default_root_dir"
    files.check_writable(out_dir, what)
    in_the_way = [name for name in ARTIFACT_NAMES if (out_dir / name).exists() and not (out_dir / name).is_file()]
    if in_the_way:
        raise PreflightError(
            f"{out_dir} has {in_the_way} that is not a file, where the run writes its artifact or report: move it, "
            "or pass another save_dir (overwrite=True replaces files only)."
        )
    earlier = [name for name in ARTIFACT_NAMES if (out_dir / name).exists()]
    if earlier and not overwrite:
        raise PreflightError(
            f"{out_dir} already holds an earlier run's {earlier}: pass another save_dir, or overwrite=True."
        )
    return out_dir


def claim_output_dir(trainer: pl.Trainer, out_dir: Path) -> Path | None:
    """Claim ``out_dir`` for this run on global rank 0 (:func:`lightning_qat.files.claim`); every rank learns how.

    Returns the claim to release at the end (``None`` on the other ranks).

    Raises:
        PreflightError: on every rank, naming the run that is writing into ``out_dir``.
    """
    claimed, refused = None, None
    if trainer.is_global_zero:
        try:
            claimed = files.claim(out_dir)
        except FileExistsError as err:
            refused = str(err)
    refused = trainer.strategy.broadcast(refused, src=0)
    if refused:
        raise PreflightError(refused)
    return claimed


def check_precision(trainer: pl.Trainer) -> None:
    """Fake quantization and the fused Conv-BN QAT modules run in float32 only."""
    precision = trainer.precision
    if precision not in SUPPORTED_PRECISIONS:
        raise PreflightError(
            f"Trainer(precision={precision!r}) cannot train a QAT network: fake quantization and the fused Conv-BN "
            "QAT modules run in float32 only. Use Trainer(precision='32-true') for the QAT fit (the int8 model "
            "is as fast either way)."
        )


def unwrap_compiled(network: nn.Module, name: str) -> nn.Module:
    """The original module of a ``torch.compile``d network (QAT prepares that one), else ``network`` itself."""
    original = getattr(network, "_orig_mod", None)
    if isinstance(network, torch._dynamo.eval_frame.OptimizedModule) and isinstance(original, nn.Module):
        rank_zero_warn(
            f"QAT: `{name}` is torch.compile'd; QAT prepares and trains its original module uncompiled (the "
            "fake-quant network changes the graph). Compile after QAT, or compile the int8 artifact's consumer."
        )
        return original
    return network


def check_evaluation(trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str | None) -> None:
    """The final evaluation the user asked for has its step method and data."""
    if stage is None:
        return
    step, hook = ("validation_step", "val_dataloader") if stage == "val" else ("test_step", "test_dataloader")
    if not is_overridden(step, pl_module):
        raise PreflightError(
            f"QATCallback(evaluate={stage!r}) evaluates float / QAT / int8 with your `{step}`, but "
            f"{type(pl_module).__name__} has none: define `{step}`, or pass evaluate="
            f"{'test' if stage == 'val' else 'val'!r} or evaluate=None."
        )
    datamodule = trainer.datamodule  # type: ignore[attr-defined]  # set by Lightning's data connector
    has_data = (
        (datamodule is not None and is_overridden(hook, datamodule))
        or is_overridden(hook, pl_module)
        or (stage == "val" and internals.eval_data_source(trainer, "val") is not None)
    )
    if not has_data:
        raise PreflightError(
            f"QATCallback(evaluate={stage!r}) needs {stage} data for the final evaluation, but the datamodule, the "
            f"module and `fit` give no `{hook}`: add one, or pass evaluate=None."
        )


def check_network_calls(pl_module: pl.LightningModule, target: str, network: nn.Module) -> None:
    """Refuse a LightningModule that calls a method or submodule of the network (``self.net.features(x)``).

    QAT replaces the network by a prepared one that keeps only its ``forward`` (FX) or wraps it (eager), so such a
    call would fail at the first training step or in the int8 evaluation. Read from the LightningModule's source.
    """
    calls: set[str] = set()
    pattern = re.compile(rf"self\.{re.escape(target)}\.(\w+)\s*\(")
    for cls in type(pl_module).__mro__:
        if cls.__module__.startswith(("lightning.", "pytorch_lightning.", "torch.")) or cls is object:
            continue
        try:
            calls |= set(pattern.findall(inspect.getsource(cls)))
        except (OSError, TypeError):  # no source (a REPL, a compiled module): nothing to read
            continue
    bad = sorted(name for name in calls if name != "forward" and not hasattr(nn.Module, name))
    if not bad:
        return
    name = bad[0]
    submodule = isinstance(getattr(network, name, None), nn.Module)
    fix = f"call `self.{target}(...)` and do that work in its forward"
    if submodule:
        fix += f", or quantize the submodule you call: QATCallback(module='{target}.{name}')"
    raise PreflightError(
        f"Your LightningModule calls `self.{target}.{name}(...)`"
        + (f" (and {', '.join(bad[1:])})" if len(bad) > 1 else "")
        + f": QAT replaces `{target}` by a prepared network that keeps only its forward, so the call would fail in "
        f"training or in the int8 evaluation. To fix it, {fix}."
    )


def check_example(network: nn.Module, example_inputs: tuple[Any, ...], name: str, prepared: bool = False) -> nn.Module:
    """Run the example input through a CPU copy of ``network``; ``network`` itself is not touched.

    Returns the copy, in eval mode, which has seen the example once (a prepared copy's observers too).
    """
    probe = cpu_eval_copy(network)
    shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in example_inputs]
    try:
        with ao.quiet(), torch.no_grad():
            probe(*example_inputs)
    except Exception as err:
        raise PreflightError(
            f"The example input (shapes {shapes}) does not run through the {'prepared ' if prepared else ''}`{name}`: "
            f"{type(err).__name__}: {err}. Set `example_input_array` on your LightningModule to the network's input "
            "(a tuple for several positional inputs), or pass `module=` naming the network your batch feeds."
        ) from err
    return probe


def check_eval_is_deterministic(
    float_network: nn.Module, prepared: nn.Module, example_inputs: tuple[Any, ...], name: str
) -> None:
    """A float network that is deterministic in ``eval()`` stays so once prepared (observers off).

    Tracing runs in training mode: a function that takes ``self.training`` as an argument and is traced *into*
    (instead of called as a module) keeps ``training=True`` in the graph, and the QAT and int8 networks would drop
    activations at random in evaluation.
    """
    networks = {"float": cpu_eval_copy(float_network), "prepared": cpu_eval_copy(prepared)}
    same = {}
    with ao.quiet(), torch.no_grad():
        networks["prepared"](*example_inputs)  # the observers see data once, else fake-quant rounds much to zero
        ao.set_observers(networks["prepared"], False)
        for key, network in networks.items():
            torch.manual_seed(0)
            first = network(*example_inputs)
            torch.manual_seed(1)
            same[key] = _equal(first, network(*example_inputs))
    if same["float"] and not same["prepared"]:
        raise PreflightError(
            f"The prepared `{name}` is random in eval() though the float one is not: a dropout-like function traced "
            "with training=True (e.g. torchvision.ops.stochastic_depth or F.dropout called through a helper). Use "
            "the module (torchvision.ops.StochasticDepth, nn.Dropout) in forward, or engine='eager'."
        )


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_equal, a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return a == b


def check_conversion(
    probe: nn.Module, engine: Engine, backend: str, example_inputs: tuple[Any, ...], name: str, dynamic: bool = False
) -> tuple[nn.Module, nn.Module | None]:
    """Convert ``probe`` to int8 and trace it; returns the int8 network and its trace, ``probe`` is not touched.

    ``probe``: the copy of the freshly prepared network that :func:`check_example` returns; its observers have seen
    the example once, as after a first training step.
    """
    try:
        quantized = to_int8(probe, engine, backend, example_inputs, dynamic=dynamic)
    except ConversionError as err:
        raise PreflightError(
            f"`{name}` trains, but its int8 conversion would fail at the end of fit: {err} Fix it before training "
            "(see the hint), or `skip=` the submodule that cannot be quantized."
        ) from err
    if engine.compiled:
        return quantized, None  # its artifact is compiled at the end of fit, not traced
    try:
        scripted = to_torchscript(quantized, backend, example_inputs)
    except Exception as err:
        raise PreflightError(
            f"The int8 `{name}` cannot be traced to TorchScript for the artifact: {type(err).__name__}: {err}. "
            "Return tensors (or tuples of tensors) from the network, or pass export=[]."
        ) from err
    return quantized, scripted


def check_onnx_export(probe: nn.Module, example_inputs: tuple[Any, ...], name: str) -> None:
    """Export ``probe`` (as for :func:`check_conversion`) to ONNX in memory: a layer ONNX cannot take fails now.

    Its observers must have seen data: per-channel scales get their shape from the first batch.
    """
    try:
        onnx_bytes(probe, example_inputs)
    except Exception as err:
        raise PreflightError(
            f"`{name}` cannot be exported to ONNX for the int8-onnx artifact: {type(err).__name__}: "
            f"{_short(err)} Remove 'onnx' from export=, or `skip=` the submodule that cannot be exported."
        ) from err


def check_pte_export(quantized: nn.Module, example_inputs: tuple[Any, ...], name: str) -> None:
    """Lower the int8 ``quantized`` to an ExecuTorch program in a temporary folder and run it, as the end of fit will.

    What XNNPACK's partitioner or ExecuTorch's emitter cannot take fails now, not after training. Its outputs are not
    compared with the graph's: a network not trained yet can be far from its int8 form; the end of fit compares them.
    """
    with tempfile.TemporaryDirectory() as folder:
        try:
            save_pte(quantized, Path(folder) / "model_int8.pte", example_inputs, check=False)
        except ConversionError as err:
            raise PreflightError(
                f"`{name}` converts to int8, but not to the ExecuTorch program of the end of fit: {err} `skip=` the "
                "submodule it names, or use backend='x86' (a TorchScript or .pt2 artifact)."
            ) from err


def _short(err: BaseException) -> str:
    return first_line(err).rstrip(".") + "."
