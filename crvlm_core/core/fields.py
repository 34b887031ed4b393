"""Field checks shared by every frozen config dataclass: each reads ``obj.name``, normalises it in place (frozen
dataclasses included) and raises one line naming the field (``prefix`` + name) and the value it got."""

from __future__ import annotations

import math
import operator
from typing import Any

from crvlm_core.core.errors import InputError

__all__ = ["index_list", "int_field", "layers_field", "number_field", "set_field"]


def set_field(obj: Any, name: str, value: Any) -> None:
    """Set ``obj.name`` on a frozen dataclass (to normalise a value once, in ``__post_init__``)."""
    object.__setattr__(obj, name, value)


def index_list(name: str, values: Any, error: type[Exception] = InputError) -> tuple[int, ...]:
    """``values`` as a tuple of ints (numpy / 0-d torch ints accepted; bools and strings refused)."""
    try:
        if isinstance(values, (str, bytes, int)) or any(isinstance(v, bool) for v in values):
            raise TypeError
        return tuple(operator.index(v) for v in values)
    except TypeError:
        raise error(f"{name} must be a list of ints (layer numbers), got {values!r}") from None


def int_field(obj: Any, name: str, minimum: int = 1, prefix: str = "", error: type[Exception] = InputError) -> int:
    """``obj.name`` as an int ≥ ``minimum`` (bools and non-integral numbers refused)."""
    value = getattr(obj, name)
    try:
        if isinstance(value, bool):
            raise TypeError
        checked = operator.index(value)
    except TypeError:
        checked = None
    if checked is None or checked < minimum:
        raise error(f"{prefix}{name} must be an integer >= {minimum}, got {value!r}")
    set_field(obj, name, checked)
    return checked


def number_field(obj: Any, name: str, minimum: float | None = None, strict: bool = False, prefix: str = "",
                 error: type[Exception] = InputError) -> float:
    """``obj.name`` as a finite float (a numeric string such as YAML's ``3e-4`` is read), ≥ ``minimum`` (> with
    ``strict``)."""
    value = getattr(obj, name)
    try:
        if isinstance(value, bool):
            raise TypeError
        number = float(value)
    except (TypeError, ValueError):
        raise error(f"{prefix}{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise error(f"{prefix}{name} must be a finite number, got {value!r}")
    if minimum is not None and (number <= minimum if strict else number < minimum):
        bound = "a positive number" if (strict and minimum == 0) else f"{'>' if strict else '>='} {minimum}"
        raise error(f"{prefix}{name} must be {bound}, got {value!r}")
    set_field(obj, name, number)
    return number


def layers_field(obj: Any, name: str, prefix: str = "", error: type[Exception] = InputError,
                 unique: bool = True, optional: bool = True) -> tuple[int, ...] | None:
    """``obj.name`` as a non-empty tuple of layer numbers ≥ 0 (order kept; no duplicates unless ``unique`` is
    false); None stays None when ``optional`` (the method's default layers)."""
    value = getattr(obj, name)
    if value is None and optional:
        return None
    layers = index_list(prefix + name, value, error)
    if not layers:
        raise error(f"{prefix}{name} must be a non-empty list of layer numbers, got {list(value)!r}")
    if any(layer < 0 for layer in layers):
        raise error(f"{prefix}{name} must be >= 0, got {list(layers)}")
    if unique and len(set(layers)) != len(layers):
        raise error(f"{prefix}{name} contains duplicates: {list(layers)}")
    set_field(obj, name, layers)
    return layers
