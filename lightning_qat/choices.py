"""Checking arguments: each choice set is one ``Literal`` alias, read by the signature and by the check alike."""

from __future__ import annotations

import types
from typing import Any, Literal, Union, get_args, get_origin


def choices_of(alias: Any) -> list[Any]:
    """The values a ``Literal`` alias admits, in order; ``None`` included for ``Literal[...] | None``."""
    origin = get_origin(alias)
    if origin is Literal:
        return list(get_args(alias))
    if origin in (Union, types.UnionType):
        return [value for arg in get_args(alias) for value in ([None] if arg is type(None) else choices_of(arg))]
    raise TypeError(f"{alias!r} is not a Literal choice set.")


def check_choice(name: str, value: Any, alias: Any) -> None:
    """Raise ``ValueError`` naming ``name``, ``value`` and the valid values unless ``value`` is one of ``alias``."""
    valid = choices_of(alias)
    if value not in valid:
        raise ValueError(f"{name}={value!r} is invalid; valid values are {valid}.")


def check_flag(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be True or False.")


def check_count(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is an int >= 1."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be an int >= 1.")
