"""The module paths of the flat layout (0.1), kept importable after the move into
subpackages: ``import evotorch_mqa_moe.run`` or ``from evotorch_mqa_moe.functional import
uniform_cross_over`` still work.

Each old path is a re-export, made on first import, of the module(s) its contents moved
to (the first of them wins a name both define); nothing here is imported before it is
asked for. :data:`DROPPED` lists the few names that went away, with what replaces them.
New code should import from the new paths (CONTRIBUTING.md has the layout).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType

__all__ = ["MOVED", "DROPPED", "install"]

_P = "evotorch_mqa_moe."
MOVED: dict[str, tuple[str, ...]] = {_P + old: tuple(_P + n for n in new) for old, new in {
    "_files": ("_internal.files",),
    "_validate": ("_internal.validate",),
    "_evotorch_compat": ("_internal.evotorch_compat",),
    "_catalog": ("workflow.catalog",),
    "config": ("model.config",),
    "genes": ("model.genes",),
    "lowrank": ("model.lowrank", "searchers.lowrank_es"),
    "task": ("problem.task",),
    "functional": ("evolution.functional",),
    "operators": ("evolution.operators",),
    "adaptive": ("evolution.adaptive",),
    "ga": ("evolution.ga",),
    "safe_mutation": ("evolution.safe_mutation", "evolution.sensitivity"),
    "state": ("searchers.state",),
    "backprop": ("searchers.backprop",),
    "hybrid": ("searchers.hybrid", "searchers.gradients", "searchers.population_optim",
               "searchers.lamarck", "searchers.pbt"),
    "lamarck": ("searchers.lamarck",),
    "pbt": ("searchers.pbt",),
    "run": ("workflow.run", "workflow.settings", "workflow.checkpoint"),
    "compare": ("workflow.compare",),
    "tune": ("workflow.tune",),
    "loggers": ("workflow.loggers",),
    "cli": ("workflow.cli",),
}.items()}
"""Old module -> the modules that now hold its contents."""

DROPPED: dict[str, str] = {
    _P + "lowrank.Adam": "torch.optim.Adam (lowrank-es now uses it)",
    _P + "lowrank.ClipUp": "evotorch.optimizers.ClipUp (lowrank-es now uses it)",
    _P + "hybrid.SEARCH_SPACES": "evotorch_mqa_moe.searchers.SEARCHERS[name].search_space",
}
"""Names of the old modules that no longer exist -> what to use instead."""


class _OldPathFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old paths of :data:`MOVED` and fills each with its new modules' names."""

    def find_spec(self, fullname, path, target=None):
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None  # an ordinary module object

    def exec_module(self, module: ModuleType) -> None:
        targets = MOVED[module.__name__]
        exported: set[str] = set()
        for name in reversed(targets):  # the first target's names win
            new = importlib.import_module(name)
            module.__dict__.update({k: v for k, v in vars(new).items()
                                    if not (k.startswith("__") and k.endswith("__"))})
            exported |= set(getattr(new, "__all__", ()))
        module.__all__ = sorted(exported)
        module.__doc__ = f"Moved to {', '.join(targets)} (a re-export kept for old imports)."


def install() -> None:
    """Put the finder on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _OldPathFinder) for f in sys.meta_path):
        sys.meta_path.append(_OldPathFinder())
