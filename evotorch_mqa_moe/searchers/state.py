"""Searcher state as plain tensors and numbers, so checkpoints load with ``weights_only=True``.

Pickling an EvoTorch searcher would make every checkpoint a pickle (unsafe to
load from anyone else). Instead :func:`capture` walks the searcher's object
graph (the searcher, its problem, populations, distributions, optimisers,
operators) and keeps only data leaves: tensors, numbers, strings, and the
states of ``torch.Generator`` objects. :func:`restore` writes those leaves back
into a searcher built the same way, which resumes exactly where the captured
one stopped (tests pin this for every supported searcher).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from evotorch_mqa_moe._internal.evotorch_compat import (
    CALLBACK_ATTRIBUTES,
    NETWORK_ATTRIBUTES,
    RAY_ATTRIBUTES,
    STATUS_CACHES,
)

__all__ = ["capture", "restore"]

_PRIMITIVES = (bool, int, float, str, type(None))
_OBJ, _GEN, _LIST, _TUPLE = "__object__", "__generator__", "__list__", "__tuple__"
_NDARRAY = "__ndarray__"
_CLASS = "__class__"
_SKIP_ATTRS = {
    # callbacks and their containers, Ray handles, the task (stateless by contract),
    # the network template (rebuilt from the config)
    *CALLBACK_ATTRIBUTES, *RAY_ATTRIBUTES, *NETWORK_ATTRIBUTES,
    "task", "instantiated_network", "config",
}
# caches derived from the rest of the state: emptied on restore, not saved
_CACHES = set(STATUS_CACHES)


def _is_ours(obj: Any) -> bool:
    module = type(obj).__module__ or ""
    return module.startswith(("evotorch", "evotorch_mqa_moe"))


def _leaf(value: Any, seen: dict[int, str], path: str) -> Any:
    """A weights_only-safe encoding of ``value``, or ``NotImplemented`` to skip it."""
    if isinstance(value, torch.Generator):
        return {_GEN: value.get_state(), "device": str(value.device)}
    if isinstance(value, torch.Tensor):
        return value.detach().as_subclass(torch.Tensor).clone()
    if isinstance(value, np.generic):  # before _PRIMITIVES: np.float64 is a float
        return value.item()
    if isinstance(value, _PRIMITIVES):
        return value
    if isinstance(value, np.ndarray) and value.dtype != object:
        return {_NDARRAY: torch.from_numpy(value.copy())}
    if isinstance(value, torch.dtype | torch.device):
        return NotImplemented  # configuration, identical in a rebuilt searcher
    if isinstance(value, list | tuple):
        items = [_leaf(v, seen, f"{path}[{i}]") for i, v in enumerate(value)]
        if any(item is NotImplemented for item in items):
            return NotImplemented
        return {_LIST if isinstance(value, list) else _TUPLE: items}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            return NotImplemented
        items = {k: _leaf(v, seen, f"{path}.{k}") for k, v in value.items()}
        return {k: v for k, v in items.items() if v is not NotImplemented}
    if _is_ours(value) and hasattr(value, "__dict__"):
        if id(value) in seen:  # shared object (e.g. the problem): captured once
            return NotImplemented
        seen[id(value)] = path
        return {_OBJ: _walk(value, seen, path)}
    return NotImplemented


def _walk(obj: Any, seen: dict[int, str], path: str) -> dict[str, Any]:
    state: dict[str, Any] = {_CLASS: type(obj).__qualname__}
    for name, value in vars(obj).items():
        if name in _SKIP_ATTRS or name in _CACHES or callable(value) and not _is_ours(value):
            continue
        encoded = _leaf(value, seen, f"{path}.{name}")
        if encoded is not NotImplemented:
            state[name] = encoded
    return state


def capture(searcher: Any) -> dict[str, Any]:
    """The searcher's mutable state: nested dicts of tensors, numbers and strings."""
    return _walk(searcher, {id(searcher): ""}, "")


def _decode(current: Any, saved: Any, path: str = "") -> Any:
    if isinstance(saved, dict) and _GEN in saved:
        gen = current if isinstance(current, torch.Generator) else torch.Generator(
            device=saved["device"])
        gen.set_state(saved[_GEN])
        return gen
    if isinstance(saved, dict) and _NDARRAY in saved:
        return saved[_NDARRAY].numpy()
    if isinstance(current, np.generic):
        return type(current)(saved)
    if isinstance(saved, dict) and _OBJ in saved:
        if current is None or not hasattr(current, "__dict__"):
            raise ValueError(f"checkpoint holds an object at {path or '.'} where the rebuilt "
                             "searcher has none; was it built with other settings?")
        _restore_into(current, saved[_OBJ], path)
        return current
    if isinstance(saved, dict) and (_LIST in saved or _TUPLE in saved):
        items = saved.get(_LIST, saved.get(_TUPLE))
        cur = list(current) if isinstance(current, list | tuple) else [None] * len(items)
        cur += [None] * (len(items) - len(cur))
        decoded = [_decode(c, s, f"{path}[{i}]")
                   for i, (c, s) in enumerate(zip(cur, items, strict=False))]
        if _LIST in saved:
            return decoded
        if hasattr(current, "_fields") and len(current) == len(decoded):  # a NamedTuple
            return type(current)(*decoded)
        return tuple(decoded)
    if isinstance(saved, dict):
        base = current if isinstance(current, dict) else {}
        return {**base, **{k: _decode(base.get(k), v, f"{path}.{k}") for k, v in saved.items()}}
    if isinstance(saved, torch.Tensor) and isinstance(current, torch.Tensor):
        if saved.shape != current.shape and current.numel() > 0:
            raise ValueError(f"checkpoint holds a tensor of shape {tuple(saved.shape)} at "
                             f"{path or '.'}, but the rebuilt searcher has shape "
                             f"{tuple(current.shape)} there; was it built with other settings?")
        if saved.dtype != current.dtype:
            raise ValueError(f"checkpoint holds a {saved.dtype} tensor at {path or '.'}, "
                             f"but the rebuilt searcher has a {current.dtype} there")
        return saved.to(current.device).as_subclass(type(current))
    return saved


def _restore_into(obj: Any, state: dict[str, Any], path: str = "") -> None:
    saved_class = state.get(_CLASS, type(obj).__qualname__)
    if saved_class != type(obj).__qualname__:
        raise ValueError(f"checkpoint holds a {saved_class} at {path or '.'}, "
                         f"but the rebuilt searcher has a {type(obj).__qualname__} there")
    for name in _CACHES & set(vars(obj)):
        setattr(obj, name, type(getattr(obj, name))())
    for name, saved in state.items():
        if name == _CLASS:
            continue
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"checkpoint holds a field {name!r} at {path or '.'}, not an "
                             "attribute name")
        held = getattr(type(obj), name, None)
        if name not in vars(obj) and (callable(held) or isinstance(held, property)):
            raise ValueError(f"checkpoint holds a field {path}.{name} that would replace "
                             f"the {type(obj).__name__}.{name} method; refusing it")
        current = getattr(obj, name, None)
        value = _decode(current, saved, f"{path}.{name}")
        # an equal number or string is left alone: frozen dataclasses (a GA's
        # SelfAdaptiveStepSize) refuse even an equal assignment
        if value is not current and not (_is_scalar(value) and type(value) is type(current)
                                         and value == current):
            setattr(obj, name, value)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, int | float | str | bool | type(None))


def restore(searcher: Any, state: dict[str, Any]) -> None:
    """Write a :func:`capture`\\ d state back into an identically built ``searcher``.

    Objects that the captured searcher had created lazily (populations made in
    its first step, ...) must exist in ``searcher`` too: step it once first.
    """
    _restore_into(searcher, state)
