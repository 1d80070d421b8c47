"""From the trained QAT model to a real int8 CPU model, and the reloadable TorchScript artifact."""

from __future__ import annotations

import copy
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins import TorchSyncBatchNorm
from torch import nn

from lightning_qat import ao
from lightning_qat.backends import resolve_backend
from lightning_qat.inputs import cpu_inputs

ARTIFACT_META = "lightning_qat.json"
ARTIFACT_VERSION = 1


class ConversionError(RuntimeError):
    """The int8 conversion failed; the trained QAT model is untouched."""


def cpu_eval_copy(network: nn.Module) -> nn.Module:
    """A deep copy of ``network`` on the CPU in eval mode; ``network`` itself is not touched.

    ``SyncBatchNorm`` layers (``Trainer(sync_batchnorm=True)``) become plain batch norms again: they only run on GPUs.
    """
    return TorchSyncBatchNorm().revert(copy.deepcopy(network)).cpu().eval()


def freeze_for_inference(network: nn.Module) -> None:
    """Stop observers from updating so a QAT model can be evaluated without moving its quantization parameters."""
    ao.set_observers(network, False)


def to_int8(prepared: nn.Module, mode: str, backend: str, example_inputs: tuple[Any, ...]) -> nn.Module:
    """Convert a CPU copy of the QAT model ``prepared`` to int8 and check that it runs on ``example_inputs``.

    Raises:
        ConversionError: if conversion or the first int8 forward pass fails. ``prepared`` is left as it was.
    """
    model = cpu_eval_copy(prepared)
    inputs = cpu_inputs(example_inputs)
    with ao.engine(backend), ao.quiet():
        try:
            quantized = ao.convert_fx(model) if mode == "fx" else ao.convert_eager(model)
        except Exception as err:
            raise ConversionError(
                f"int8 conversion ({mode} mode, backend {backend!r}) failed: {err}. The trained QAT model is unchanged."
            ) from err
        try:
            with torch.no_grad():
                quantized(*inputs)
        except Exception as err:
            hint = (
                " In eager mode every op between QuantStub and DeQuantStub must accept quantized tensors: "
                "replace `x + y` with torch.ao.nn.quantized.FloatFunctional, make the network symbolically "
                "traceable (FX mode places quant/dequant for you), or `skip=` the offending submodule."
                if mode == "eager"
                else ""
            )
            raise ConversionError(
                f"the int8 model ({mode} mode) fails on an example batch: {err}.{hint} "
                "The trained QAT model is unchanged."
            ) from err
    return quantized


def save_torchscript(
    quantized: nn.Module, path: str | os.PathLike, backend: str, example_inputs: tuple[Any, ...], **meta: Any
) -> Path:
    """Trace and freeze ``quantized`` to TorchScript and write it with its metadata to ``path``.

    The artifact reloads with :func:`load_quantized` (or ``torch.jit.load``) without any training code.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    inputs = cpu_inputs(example_inputs)
    info = {"format_version": ARTIFACT_VERSION, "backend": backend, "torch": torch.__version__, **meta}
    with ao.engine(backend), ao.quiet(), torch.no_grad():
        scripted = torch.jit.freeze(torch.jit.trace(quantized.eval(), inputs, check_trace=False).eval())
        tmp = path.with_name(path.name + ".tmp")
        torch.jit.save(scripted, str(tmp), _extra_files={ARTIFACT_META: json.dumps(info)})
    os.replace(tmp, path)
    return path


def read_artifact_info(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata stored in an artifact (backend, torch version, ...), read without loading the model.

    Raises:
        ValueError: if ``path`` is not a TorchScript archive or carries no lightning-qat metadata.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith(f"/extra/{ARTIFACT_META}")]
            raw = archive.read(names[0]) if names else b""
    except (zipfile.BadZipFile, OSError) as err:
        raise ValueError(f"{str(path)!r} is not a readable TorchScript int8 artifact: {err}") from err
    if not raw:
        raise ValueError(f"{str(path)!r} is not a lightning-qat artifact (no {ARTIFACT_META} metadata).")
    return json.loads(raw)


def load_quantized(path: str | os.PathLike) -> torch.jit.ScriptModule:
    """Load an int8 artifact written by :class:`~lightning_qat.QATCallback`, ready to run on the CPU.

    Sets ``torch.backends.quantized.engine`` to the backend the model was converted for *before* loading: the
    int8 weights are packed for the engine active at load time, and weights packed for another engine run slowly
    and give different outputs.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file is not a lightning-qat artifact, or its backend cannot run on this CPU.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No int8 artifact at {str(path)!r}.")
    info = read_artifact_info(path)
    try:
        torch.backends.quantized.engine = resolve_backend(info.get("backend"))
    except ValueError as err:
        raise ValueError(f"Cannot run the artifact {str(path)!r} here: {err}") from err
    try:
        with ao.quiet():
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as err:
        raise ValueError(f"{str(path)!r} is not a readable TorchScript int8 artifact: {err}") from err
    return module.eval()
