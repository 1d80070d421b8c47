"""The TorchScript int8 artifact: traced and frozen, written atomically with its metadata and sha256, reloaded alone."""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_qat.exceptions import ArtifactError
from lightning_qat.export.aoti import load_pt2
from lightning_qat.export.pte import load_pte
from lightning_qat.files import write_atomic
from lightning_qat.quantization import ao
from lightning_qat.quantization.backends import resolve_backend
from lightning_qat.quantization.inputs import cpu_inputs

ARTIFACT_META = "lightning_qat.json"
ARTIFACT_VERSION = 1
# The x86 engine's int8 convolutions (oneDNN) keep the kernel they build for the input shape (and thread count) of
# their first call, one per packed weight (torch's PrimitiveCache); any other shape builds its kernel anew on every
# call. A loaded copy is fastest at the shape of its first calls: timm's ghostnet_100 at 64 px ran batch 1 at 2.57x
# float when batch 1 came first, at 0.42x after batch 8 (docs/performance.md). So an x86 artifact is loaded once
# per input shape it meets, up to this many copies (each holds its int8 weights); later shapes share the first.
COPIES = 8
_CACHED = ("x86", "onednn")  # the engines whose packed weights cache one shape's kernel


def to_torchscript(quantized: nn.Module, backend: str, example_inputs: tuple[Any, ...]) -> torch.jit.ScriptModule:
    """``quantized`` traced on ``example_inputs`` and frozen: the form the artifact ships in."""
    with ao.engine(backend), ao.quiet(), torch.no_grad(), warnings.catch_warnings():
        # the trace reads every attribute of every module, deprecated properties too (transformers' 5.x
        # `is_gradient_checkpointing` warns on each read)
        warnings.filterwarnings("ignore", message=r".* is deprecated and will be removed", category=FutureWarning)
        # strict=False: outputs may be dicts or lists (of tensors), whose structure the trace keeps
        traced = torch.jit.trace(quantized.eval(), cpu_inputs(example_inputs), check_trace=False, strict=False)
        return torch.jit.freeze(traced.eval())


def save_torchscript(
    quantized: nn.Module, path: str | os.PathLike, backend: str, example_inputs: tuple[Any, ...], **meta: Any
) -> Path:
    """Trace and freeze ``quantized`` to TorchScript and write it with its metadata to ``path``, atomically.

    The metadata carries a sha256 of the archive's other entries, which :func:`load_quantized` checks. The artifact
    reloads with :func:`load_quantized` (or ``torch.jit.load``) without any training code.
    """
    scripted = to_torchscript(quantized, backend, example_inputs)
    info = {"format_version": ARTIFACT_VERSION, "backend": backend, "torch": torch.__version__, **meta}
    with ao.engine(backend), ao.quiet():
        unsigned = io.BytesIO()
        torch.jit.save(scripted, unsigned)
        info["sha256"] = _payload_digest(unsigned)

        def write(tmp: Path) -> None:
            torch.jit.save(scripted, str(tmp), _extra_files={ARTIFACT_META: json.dumps(info)})
            if _payload_digest(tmp) != info["sha256"]:  # the second serialization must be the first one
                raise RuntimeError(f"TorchScript serialization of {path} is not deterministic; nothing written.")

        return write_atomic(path, write)


def _payload_digest(archive_file: str | os.PathLike | io.BytesIO) -> str:
    """sha256 over every archive entry but the metadata and ``.data/``, names taken below the archive's root folder.

    torch names the root folder after the file, and ``.data/serialization_id`` is new at every save.
    """
    digest = hashlib.sha256()
    with zipfile.ZipFile(archive_file) as archive:
        for name in sorted(archive.namelist()):
            inner = name.split("/", 1)[-1]
            if inner == f"extra/{ARTIFACT_META}" or inner.startswith(".data/"):
                continue
            digest.update(inner.encode())
            digest.update(archive.read(name))
    return digest.hexdigest()


def read_artifact_info(path: str | os.PathLike, data: bytes | None = None) -> dict[str, Any]:
    """The metadata stored in an artifact (backend, torch version, ...), read without loading the model.

    ``data``: the file's bytes, already read (``path`` then only names it in errors).

    Raises:
        ArtifactError: if ``path`` is not a TorchScript archive or carries no lightning-qat metadata.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(data) if data is not None else path) as archive:
            names = [n for n in archive.namelist() if n.endswith(f"/extra/{ARTIFACT_META}")]
            raw = archive.read(names[0]) if names else b""
    except (zipfile.BadZipFile, OSError) as err:
        raise ArtifactError(f"{str(path)!r} is not a readable TorchScript int8 artifact: {err}") from err
    if not raw:
        raise ArtifactError(f"{str(path)!r} is not a lightning-qat artifact (no {ARTIFACT_META} metadata).")
    try:
        info = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(f"{str(path)!r} is corrupted: its {ARTIFACT_META} metadata is not JSON ({err}).") from err
    if not isinstance(info, dict):
        raise ArtifactError(f"{str(path)!r} is corrupted: its {ARTIFACT_META} metadata is not a JSON object.")
    return info


def verify_artifact(path: str | os.PathLike, data: bytes | None = None) -> dict[str, Any]:
    """The artifact's metadata, after checking its sha256: a changed byte is an error, not different outputs.

    ``data``: the file's bytes, already read, so that a file replaced meanwhile cannot mix two versions.

    Raises:
        ArtifactError: if the archive is unreadable, carries no metadata, or its content does not match its sha256.
    """
    data = Path(path).read_bytes() if data is None else data
    info = read_artifact_info(path, data)
    expected = info.get("sha256")
    if expected is None:  # written before artifacts carried a digest
        return info
    try:
        actual = _payload_digest(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError) as err:
        raise ArtifactError(f"{str(path)!r} is corrupted: {err}") from err
    if actual != expected:
        raise ArtifactError(
            f"{str(path)!r} is corrupted: its content's sha256 is {actual[:16]}..., its metadata says "
            f"{expected[:16]}...; re-copy or re-create the artifact."
        )
    return info


def load_quantized(path: str | os.PathLike, copies: int = COPIES) -> nn.Module:
    """Load an int8 artifact written by :class:`~lightning_qat.QATCallback`, ready to run on the CPU.

    A ``.pt2`` file is the PT2E engine's AOTInductor package (:func:`~lightning_qat.export.aoti.load_pt2`: torch alone
    loads it); a ``.pte`` file the XNNPACK engine's ExecuTorch program (:func:`~lightning_qat.export.pte.load_pte`, in
    ExecuTorch's runtime); any other is the TorchScript artifact.

    Loads with ``torch.backends.quantized.engine`` set to the backend the model was converted for: the int8 weights
    are packed for the engine active at load time (packed for another engine, they run slowly and give different
    outputs). The packed weights keep their engine, so the process's setting is restored afterwards. An x86 artifact
    is loaded again for each input shape it meets, up to ``copies`` (:class:`PerShape`: its kernels are fast at one
    shape per copy); ``copies=1`` loads it once.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ArtifactError: if the file is not a lightning-qat artifact, is corrupted (sha256), or its backend cannot run
            here.
        ValueError: if ``copies`` is below 1.
    """
    if copies < 1:
        raise ValueError(f"copies={copies}: an artifact is loaded at least once (1: one copy for every shape).")
    path = Path(path)
    if path.suffix == ".pt2":
        return load_pt2(path)
    if path.suffix == ".pte":
        return load_pte(path)
    if not path.is_file():
        raise FileNotFoundError(f"No int8 artifact at {str(path)!r}.")
    data = path.read_bytes()  # once: checked and loaded from the same bytes, whatever replaces the file meanwhile
    info = verify_artifact(path, data)
    try:
        backend = resolve_backend(info.get("backend"))
    except ValueError as err:
        raise ArtifactError(f"Cannot run the artifact {str(path)!r} here: {err}") from err
    try:
        module = _load(data, backend)
    except Exception as err:
        raise ArtifactError(f"{str(path)!r} is not a readable TorchScript int8 artifact: {err}") from err
    if backend in _CACHED and copies > 1:
        return PerShape(module, data, backend, copies).eval()
    return module


def _load(data: bytes, backend: str) -> torch.jit.ScriptModule:
    with ao.engine(backend), ao.quiet():
        return torch.jit.load(io.BytesIO(data), map_location="cpu").eval()


class PerShape(nn.Module):
    """A TorchScript artifact loaded once per input shape it runs (see :data:`COPIES`), from the same bytes.

    ``module``: the first copy, also the one every shape beyond ``copies`` shares; it is the module's only child, so
    ``state_dict()`` and ``module.code`` are the artifact's. ``shapes``: the shapes that have their own copy.
    """

    def __init__(self, module: torch.jit.ScriptModule, data: bytes, backend: str, copies: int = COPIES) -> None:
        super().__init__()
        self.module = module
        self._data, self._backend, self._copies = data, backend, copies
        self._loaded: dict[tuple[Any, ...], torch.jit.ScriptModule] = {}

    @property
    def shapes(self) -> list[tuple[Any, ...]]:
        """The input shapes (with the thread count) that have a copy of their own, in the order they came."""
        return list(self._loaded)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The artifact on the inputs, run by the copy of their shape (loaded on its first call)."""
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        key = (*(tuple(t.shape) for t in leaves if isinstance(t, torch.Tensor)), torch.get_num_threads())
        module = self._loaded.get(key)
        if module is None:
            if not self._loaded:
                module = self.module
            elif len(self._loaded) < self._copies:
                module = _load(self._data, self._backend)
            else:
                return self.module(*args, **kwargs)
            self._loaded[key] = module
        return module(*args, **kwargs)
