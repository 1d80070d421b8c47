"""What differs between the supported torch versions, in one place (the range is in pyproject.toml and the README)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


def set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    """Replace the submodule ``target`` (a dotted name) of ``root`` with ``module`` (torch < 2.5 has no method)."""
    parent_name, _, attr = target.rpartition(".")
    setattr(root.get_submodule(parent_name), attr, module)


def register_load_state_dict_pre_hook(module: nn.Module, hook: Callable[..., Any]) -> RemovableHandle:
    """``module.register_load_state_dict_pre_hook(hook)``; ``hook(module, state_dict, prefix, ...)`` on torch < 2.5."""
    register = getattr(module, "register_load_state_dict_pre_hook", None)
    if register is not None:
        return register(hook)
    return module._register_load_state_dict_pre_hook(hook, with_module=True)


def torchscript_onnx_exporter() -> dict[str, Any]:
    """``torch.onnx.export`` keyword arguments that pick the TorchScript-based exporter.

    ``dynamo=False`` where the argument exists (torch >= 2.5); before, that exporter is the only one.
    """
    return {"dynamo": False} if "dynamo" in torch.onnx.export.__code__.co_varnames else {}
