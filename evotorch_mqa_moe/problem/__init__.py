"""The problem layer: the :class:`Task` protocol that example problems implement, and
:class:`TransformerProblem`, which makes a task an EvoTorch ``NEProblem`` evaluated a
whole population at a time.

Names are imported on first use (PEP 562): a task module imports
:mod:`evotorch_mqa_moe.problem.task` without loading EvoTorch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Task": "task", "SupervisedTask": "task",
    "TransformerProblem": "transformer_problem", "DATA_REFRESH": "transformer_problem",
    "worst_for_nonfinite": "nonfinite", "replace_nonfinite": "nonfinite",
}
__all__ = ["Task", "SupervisedTask", "TransformerProblem", "DATA_REFRESH",
           "worst_for_nonfinite", "replace_nonfinite"]  # = the keys of _EXPORTS


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from .nonfinite import replace_nonfinite, worst_for_nonfinite
    from .task import SupervisedTask, Task
    from .transformer_problem import DATA_REFRESH, TransformerProblem
