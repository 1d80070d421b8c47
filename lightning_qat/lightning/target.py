"""Which submodule of the LightningModule is the network to quantize."""

from __future__ import annotations

import difflib

from torch import nn
from torchmetrics import Metric, MetricCollection


def _is_excluded(module: nn.Module) -> bool:
    return isinstance(module, (Metric, MetricCollection, nn.modules.loss._Loss))


def find_target(root: nn.Module, name: str | None) -> str:
    """The qualified name of the network to quantize inside ``root`` (a LightningModule).

    ``name`` may be a dotted path (``"backbone.encoder"``); ``None`` picks the single top-level child that is not
    a metric or a loss.

    Raises:
        ValueError: if ``name`` names no submodule, names a metric/loss, or ``None`` finds zero or several candidates.
    """
    children = {n: m for n, m in root.named_children() if not _is_excluded(m)}
    if name is None:
        if len(children) == 1:
            return next(iter(children))
        if not children:
            raise ValueError(
                f"QATCallback found no network to quantize on {type(root).__name__}: it has no submodule other "
                "than metrics and losses. Create the network in `__init__` (not in `setup`/`configure_model`), "
                "or pass `module=` naming it."
            )
        raise ValueError(
            f"QATCallback found several networks on {type(root).__name__}: {sorted(children)}. "
            "Pass `module=` with the one to quantize (a dotted path such as 'backbone.encoder' is allowed)."
        )
    try:
        target = root.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in root.named_modules() if n]
        close = difflib.get_close_matches(name, names, n=5) or sorted(children)
        raise ValueError(
            f"module={name!r} is not a submodule of {type(root).__name__}; did you mean one of {close}?"
        ) from None
    if _is_excluded(target):
        raise ValueError(
            f"module={name!r} is a {type(target).__name__}; metrics and losses are never quantized. "
            f"Candidates: {sorted(children)}."
        )
    return name
