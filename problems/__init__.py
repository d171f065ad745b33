"""Example problems, one module each (installed as ``evotorch_mqa_moe.problems``).

Every problem is a :class:`~evotorch_mqa_moe.task.Task` with a default
:class:`~evotorch_mqa_moe.config.TransformerConfig`, a fitness for search and
held-out metrics (see ``docs/problems.md``)::

    from evotorch_mqa_moe.problems import make_task, task_names
    task = make_task("reverse", seq_len=10)

Task modules are imported on first use, so optional dependencies of one
problem (e.g. ``cartpole``) cost nothing to the others.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

__all__ = ["make_task", "task_names", "get_task_class"]

# name -> (module relative to this package, class name)
_REGISTRY: dict[str, tuple[str, str]] = {
    "reverse": (".reverse", "ReverseTask"),
    "sort": (".sort", "SortTask"),
    "addition": (".addition", "AdditionTask"),
    "majority": (".majority", "MajorityTask"),
    "language": (".language", "LanguageTask"),
    "multitask": (".multitask", "MultitaskTask"),
    "cartpole": (".cartpole", "CartPoleTask"),
    "g2p": (".g2p", "G2PTask"),
}


def task_names() -> list[str]:
    """The names :func:`make_task` accepts, in registry order."""
    return list(_REGISTRY)


def get_task_class(name: str) -> type:
    """The task class registered as ``name`` (its module is imported now)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(_REGISTRY)}")
    module, cls = _REGISTRY[name]
    return getattr(importlib.import_module(module, __name__), cls)


def make_task(name: str, **options: Any):
    """Build the task ``name`` with keyword ``options`` (validated by the task).

    Raises:
        ValueError: unknown ``name`` (the message lists the known ones), an option
            the task does not take (the message lists those it does), or a bad
            option value (the task's message names the option and value).
    """
    cls = get_task_class(name)
    parameters = inspect.signature(cls).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    unknown = sorted(set(options) - set(parameters))
    if unknown and not takes_any:
        accepted = [n for n, p in parameters.items()
                    if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
        raise ValueError(f"task {name!r} takes no option {', '.join(map(repr, unknown))}; "
                         f"its options: {', '.join(accepted) or '(none)'}")
    return cls(**options)


def __getattr__(attr: str):
    """Task classes by class name, imported lazily (e.g. ``problems.ReverseTask``)."""
    for name, (_, cls) in _REGISTRY.items():
        if cls == attr:
            return get_task_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
