"""QAT checkpoints: finding the callback's state in a Lightning checkpoint and loading it into a fresh module.

A checkpoint written during a QAT fit holds the *prepared* network's weights (fused modules, fake-quant state) and the
QATCallback's state (backend, mode, skip list, the float weights QAT started from, a small example input). A fresh
LightningModule holds the float network, so its keys differ: the network must be prepared the same way first.
:class:`~lightning_qat.QATCallback` does that in every stage with ``ckpt_path``; :func:`load_qat_checkpoint` does it
without a Trainer. The checkpoint's ``state_dict`` also carries :data:`MARKER`, a key that only lightning-qat removes,
so loading a QAT checkpoint without lightning-qat fails with a message that says how to load it.
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_qat.exceptions import CheckpointError, NotAQATCheckpointError, first_line
from lightning_qat.lightning import example_input
from lightning_qat.lightning.install import install
from lightning_qat.quantization import ao
from lightning_qat.quantization.engines import Needs, Prepared

MARKER = (
    "lightning_qat: this is a QAT checkpoint; load it with lightning_qat.load_qat_checkpoint(YourModule, path), "
    "or give a Trainer with QATCallback() the ckpt_path"
)
STATE_KEY = "QATCallback"  # QATCallback.state_key, subclasses included: checkpoint["callbacks"][STATE_KEY]


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a Lightning checkpoint (or a ``torch.save``d dict) on the CPU with ``weights_only=True``.

    No code from the file runs.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        CheckpointError: naming the file, if it is truncated or corrupted, is not a checkpoint, or holds Python objects
            besides tensors and containers.
    """
    path = Path(path)
    check_readable(path)
    try:
        with ao.quiet():
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{str(path)!r} holds Python objects besides tensors, and loading it would run code from the file; "
            "lightning-qat only loads weights (torch.load(weights_only=True) refused it: "
            f"{first_line(err)}). Re-save it with torch.save(model.state_dict(), path)."
        ) from err
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise CheckpointError(f"{str(path)!r} is not a readable checkpoint: {first_line(err)}") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{str(path)!r} holds a {type(data).__name__}, not a checkpoint (a dict).")
    return data


def check_readable(path: str | os.PathLike) -> None:
    """Check, without loading it, that ``path`` is a whole ``torch.save`` archive (its zip directory reads).

    Cheap for any size: a truncated or overwritten file fails here, naming itself, before any work.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        CheckpointError: if it is not a readable ``torch.save`` archive.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint file {str(path)!r} does not exist.")
    with path.open("rb") as f:
        if f.read(1) == b"\x80":  # torch's legacy (pre-1.6) format is a pickle: torch.load tells
            return
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as err:
        size = path.stat().st_size
        raise CheckpointError(
            f"{str(path)!r} ({size} bytes) is not a readable checkpoint, truncated or corrupted ({err}); "
            "re-copy it, or pick another checkpoint."
        ) from err
    if not any(name.endswith("data.pkl") for name in names):
        raise CheckpointError(f"{str(path)!r} is a zip archive but not a torch.save checkpoint (no data.pkl).")


def qat_state(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The QATCallback state stored in ``checkpoint`` (under :data:`STATE_KEY`), or ``None`` for a float checkpoint."""
    state = checkpoint.get("callbacks", {}).get(STATE_KEY)
    return state if isinstance(state, dict) else None


def check_version(saved_state: dict[str, Any], supported: int) -> None:
    """Raise ``CheckpointError`` for QAT state of a newer version than ``supported`` (a newer lightning-qat's)."""
    version = saved_state.get("version", supported)
    if version > supported:
        raise CheckpointError(
            f"This checkpoint's QATCallback state has version {version}, newer than this lightning-qat understands "
            f"({supported}); upgrade lightning-qat to resume from it."
        )


def check_same_preparation(saved_state: dict[str, Any], current: dict[str, Any]) -> None:
    """Raise ``CheckpointError`` naming the first setting of ``current`` the checkpoint was prepared with differently.

    ``None`` in ``current`` means not chosen yet (found from the checkpoint); a setting the state lacks is not compared.
    """
    for key, value in current.items():
        saved = saved_state.get(key, value)
        if value is not None and saved != value:
            raise CheckpointError(
                f"This checkpoint was QAT-prepared with {key}={saved!r}, but the QATCallback now has "
                f"{key}={value!r}. Resume with the same {key}, or start a new fit from the float weights."
            )


def mark(state_dict: dict[str, Any]) -> OrderedDict[str, Any]:
    """``state_dict`` with :data:`MARKER` first, so a plain ``load_state_dict`` names lightning-qat in its error.

    The modules' versions (``state_dict._metadata``) stay: without them torchao's observers load as version 1 and
    reset their ``eps`` to float32's (2**-12 in torchao's x86 QAT configuration).
    """
    marked = OrderedDict([(MARKER, torch.zeros(())), *state_dict.items()])
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        marked._metadata = metadata  # type: ignore[attr-defined]  # torch's convention for state dicts
    return marked


def unmark(state_dict: dict[str, Any]) -> None:
    """Remove :data:`MARKER` from ``state_dict`` in place (a no-op for unmarked state dicts)."""
    state_dict.pop(MARKER, None)


def network_state(state_dict: dict[str, Any], target: str) -> dict[str, Any]:
    """The entries of a LightningModule ``state_dict`` below the submodule ``target``, with that prefix removed.

    The modules' versions (``_metadata``) come along, re-rooted at ``target`` (see :func:`mark`).
    """
    prefix = f"{target}."
    below = OrderedDict((key[len(prefix) :], value) for key, value in state_dict.items() if key.startswith(prefix))
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        below._metadata = OrderedDict(  # type: ignore[attr-defined]  # torch's convention for state dicts
            ("" if key == target else key[len(prefix) :], value)
            for key, value in metadata.items()
            if key == target or key.startswith(prefix)
        )
    return below


def load_qat_checkpoint(
    module_class: type[pl.LightningModule], path: str | os.PathLike, **init_kwargs: Any
) -> pl.LightningModule:
    """A QAT checkpoint loaded into a fresh ``module_class``: the network prepared as in the run, then its weights.

    The result is ready for ``trainer.test`` / ``validate`` / ``predict`` (with a ``QATCallback`` in the Trainer,
    which keeps observers still in evaluation loops), for more QAT training, or for :func:`~lightning_qat.convert`.

    Example::

        model = load_qat_checkpoint(MyModule, "checkpoints/best.ckpt")

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        NotAQATCheckpointError: if the checkpoint holds no QAT state (use ``module_class.load_from_checkpoint``).
    """
    checkpoint = read_checkpoint(path)
    state = require_qat_state(checkpoint, path, f"load it with {module_class.__name__}.load_from_checkpoint")
    with warnings.catch_warnings():  # the float module does not have the QAT keys yet: loaded strictly below
        warnings.filterwarnings("ignore", message=r".*(keys|Found keys).*")
        model = module_class.load_from_checkpoint(str(path), map_location="cpu", strict=False, **init_kwargs)
    load_into(model, checkpoint, state)
    return model.eval()


def require_qat_state(checkpoint: dict[str, Any], path: str | os.PathLike, fix: str) -> dict[str, Any]:
    """:func:`qat_state`, or :class:`~lightning_qat.NotAQATCheckpointError` naming ``path`` and ``fix``."""
    state = qat_state(checkpoint)
    if state is None:
        raise NotAQATCheckpointError(
            f"{str(path)!r} holds no QATCallback state, so its network is float: {fix}({str(path)!r})."
        )
    return state


def load_into(
    model: pl.LightningModule, checkpoint: dict[str, Any], state: dict[str, Any]
) -> tuple[Prepared, tuple[Any, ...]]:
    """Prepare ``model``'s float network as the checkpoint's was, then load all of the checkpoint's weights, strictly.

    Returns what the preparation did and the example input it used (the checkpoint's, else ``example_input_array``).
    """
    network = model.get_submodule(state["module"])
    inputs = example_input.stored(state) or example_input.module_example_inputs(model)
    prepared = install(
        model,
        state["module"],
        network,
        state["backend"],
        state["mode"],
        state["skip"],
        inputs,
        state["relu6_to_relu"],
        state.get("kernels"),  # the writing run's decision, on its CPU (older checkpoints: timed here)
        Needs(dynamic=state.get("activations") == "dynamic"),  # an engine that captures them (PT2E) needs to know
    )
    weights = dict(checkpoint["state_dict"])
    unmark(weights)
    model.load_state_dict(weights, strict=True)
    return prepared, inputs
