"""The error every configuration problem raises, and the type checks configs run before their range checks."""

from __future__ import annotations

import importlib
import math
import types
import typing
from typing import Any, Literal, Union


class ConfigError(ValueError):
    """A configuration or input problem the user can fix; the message says how."""


def raise_problems(problems: list[str], what: str) -> None:
    """Raise one :class:`ConfigError` listing all ``problems`` (no-op when empty)."""
    if problems:
        bullet = "\n  - "
        raise ConfigError(f"invalid {what}:{bullet}{bullet.join(problems)}")


def matches_type(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits the type hint ``hint`` (the hints configs use; floats must be finite).

    A ``Literal`` checks only the type of its values; the value itself is each config's own check.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is None or hint is type(None):
        return value is None
    if origin is Union or origin is types.UnionType:
        return any(matches_type(value, a) for a in args)
    if origin is Literal:
        return any(isinstance(value, type(a)) for a in args)
    if origin is list:
        return isinstance(value, list) and all(matches_type(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(matches_type(k, args[0]) for k in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:  # bool is an int subclass, but `r: true` is a mistake, not a rank
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:  # NaN/inf would pass or fail the range checks silently and poison training
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, origin or hint)


def type_problems(config: Any, prefix: str, hints: dict[str, Any] | None = None) -> list[str]:
    """One problem per attribute of ``config`` named in ``hints`` whose value does not fit its hint.

    ``hints`` defaults to the annotations of ``config``'s dataclass. Range checks compare values
    (``streams < 2``); on a wrong type they would raise TypeError instead of naming the field, so
    configs return these problems before running them.
    """
    hints = typing.get_type_hints(type(config)) if hints is None else hints
    return [
        f"{prefix}.{name} must be {_describe(hint)}, got {type(value).__name__} {value!r}"
        for name, hint in hints.items()
        if not matches_type(value := getattr(config, name), hint)
    ]


def _describe(hint: Any) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if hint is float:
        return "a finite number"
    return str(hint).replace("typing.", "") if args else getattr(hint, "__name__", str(hint))


def import_class(class_path: str, field: str) -> Any:
    """The object ``module.Name`` names, imported; a :class:`ConfigError` naming ``field`` when it
    cannot be (a config's ``class_path`` for something the package builds itself)."""
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(
            f"{field}: cannot import {class_path!r} ({err}); put its module on PYTHONPATH"
        ) from None
