"""Argument checks shared by the whole package: each raises ``ValueError`` naming the
argument and the value it got, and returns the value in its canonical type.

``bool`` is never accepted as a number (``True`` is an ``int`` in Python, so
``isinstance(v, int)`` and ``int(v) == v`` both let it through), NaN and (unless
asked) infinities are never accepted, and NumPy scalars count as the Python
numbers they hold. No torch import: the command line uses these before torch loads.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence

__all__ = ["check_int", "check_float", "check_choice", "check_bool", "check_threads",
           "max_threads", "MAX_SEED"]

MAX_SEED = 2**63 - 1
"""The largest seed: torch's generators take a signed 64-bit integer."""


def max_threads() -> int:
    """The most torch CPU threads accepted: 4 per CPU core here (torch segfaults or fails
    to allocate with tens of thousands)."""
    return 4 * max(1, os.cpu_count() or 1)


def _describe_int(minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f"an integer in [{minimum}, {maximum}]"
    if maximum is not None:
        return f"an integer <= {maximum}"
    if minimum is None:
        return "an integer"
    if minimum == 1:
        return "a positive integer"
    if minimum == 0:
        return "a non-negative integer"
    return f"an integer >= {minimum}"


def check_int(name: str, value: object, minimum: int | None = 1, maximum: int | None = None,
              *, none_ok: bool = False, integral_float: bool = False) -> int | None:
    """``value`` as an ``int`` in ``[minimum, maximum]`` (``None`` bounds: open).

    Args:
        name: the argument's name, for the message.
        value: what was given. ``bool`` is refused; NumPy integers are accepted.
        minimum, maximum: inclusive bounds (default: a positive integer).
        none_ok: accept ``None`` (returned as is).
        integral_float: also accept floats with an integral value (``3.0``).
    Raises:
        ValueError: ``"{name} must be a positive integer, got {value!r}"`` and the like.
    """
    if value is None and none_ok:
        return None
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if (not ok and integral_float and isinstance(value, float) and math.isfinite(value)
            and value == int(value)):
        ok = True
    if ok:
        value = int(value)  # type: ignore[arg-type]
        ok = (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
    if not ok:
        what = _describe_int(minimum, maximum) + (" or None" if none_ok else "")
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return value  # type: ignore[return-value]


def _describe_float(low: float | None, high: float | None, low_open: bool,
                    high_open: bool) -> str:
    if high is None and low == 0:
        return "a positive number" if low_open else "a non-negative number"
    if low is None and high is None:
        return "a finite number"
    left = "(-inf" if low is None else ("(" if low_open else "[") + f"{low:g}"
    right = "inf)" if high is None else f"{high:g}" + (")" if high_open else "]")
    return f"a number in {left}, {right}"


def check_float(name: str, value: object, low: float | None = 0.0, high: float | None = None,
                *, low_open: bool = True, high_open: bool = False, none_ok: bool = False,
                finite: bool = True) -> float | None:
    """``value`` as a ``float`` between ``low`` and ``high`` (default: positive, finite).

    Args:
        name: the argument's name, for the message.
        value: what was given: an ``int`` or ``float`` (not a ``bool``), NumPy scalars
            included. NaN is always refused, infinities unless ``finite=False``.
        low, high: bounds (``None``: unbounded); ``low_open`` / ``high_open`` exclude them.
        none_ok: accept ``None`` (returned as is).
    Raises:
        ValueError: ``"{name} must be a positive number, got {value!r}"``,
            ``"{name} must be a number in (0, 1], got ..."`` and the like.
    """
    if value is None and none_ok:
        return None
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok:
        x = float(value)  # type: ignore[arg-type]
        ok = not math.isnan(x) and (math.isfinite(x) or not finite)
        if ok and low is not None:
            ok = x > low if low_open else x >= low
        if ok and high is not None:
            ok = x < high if high_open else x <= high
    if not ok:
        what = _describe_float(low, high, low_open, high_open) + (" or None" if none_ok else "")
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return x


def check_choice(name: str, value: object, choices: Sequence[object]) -> object:
    """``value`` if it is one of ``choices``; ValueError listing them otherwise."""
    try:
        known = value in choices
    except TypeError:  # unhashable value against a set, ...
        known = False
    if not known:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_bool(name: str, value: object) -> bool:
    """``value`` if it is a ``bool`` (``1`` / ``"yes"`` are refused)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return value


def check_threads(name: str, value: object, *, none_ok: bool = False) -> int | None:
    """``value`` as a thread count in ``[1, max_threads()]``; ValueError naming the bound."""
    limit = max_threads()
    try:
        return check_int(name, value, 1, limit, none_ok=none_ok)
    except ValueError:
        raise ValueError(f"{name} must be an integer in [1, {limit}] (4 x the "
                         f"{limit // 4} CPU core(s) here), got {value!r}") from None
