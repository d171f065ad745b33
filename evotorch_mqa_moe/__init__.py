"""Evolve multi-query-attention / mixture-of-experts transformers with EvoTorch.

The model (:class:`MQAMoETransformer`) and its population pass
(:func:`population_forward`) share one implementation; :class:`TransformerProblem`
turns a :class:`Task` into an EvoTorch ``NEProblem`` that evaluates the whole
population at once.

The names below are imported on first use (PEP 562), so that importing a light
submodule (the command line's ``--help`` and ``list``) does not load torch and
EvoTorch; ``from evotorch_mqa_moe import X`` works as usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._internal import moved as _moved

__version__ = "0.1.0"

# the 0.1 module paths (evotorch_mqa_moe.run, .functional, ...) stay importable
_moved.install()

# public name -> the submodule that defines it
_EXPORTS: dict[str, str] = {
    "SelfAdaptiveStepSize": "evolution.adaptive", "SuccessRule": "evolution.adaptive",
    "per_tensor_stdev": "evolution.adaptive",
    "PRESETS": "model.config", "TransformerConfig": "model.config", "preset": "model.config",
    "gaussian_mutation": "evolution.functional", "uniform_cross_over": "evolution.functional",
    "SeedGeneticAlgorithm": "evolution.ga", "seed_genetic_algorithm": "evolution.ga",
    "EncoderLayer": "model", "MixtureOfExperts": "model", "MQAMoETransformer": "model",
    "MultiQueryAttention": "model", "PopulationModel": "model", "num_parameters": "model",
    "population_forward": "model",
    "GaussianMutation": "evolution.operators", "UniformCrossOver": "evolution.operators",
    "TransformerProblem": "problem",
    "SEARCHERS": "searchers", "Searcher": "searchers", "SearcherSpec": "searchers",
    "make_searcher": "searchers", "register": "searchers",
    "SupervisedTask": "problem.task", "Task": "problem.task",
}

__all__ = [
    "PRESETS", "TransformerConfig", "preset",
    "EncoderLayer", "MixtureOfExperts", "MQAMoETransformer", "MultiQueryAttention",
    "PopulationModel", "num_parameters", "population_forward",
    "SupervisedTask", "Task", "TransformerProblem",
    "SEARCHERS", "Searcher", "SearcherSpec", "make_searcher", "register",
    "uniform_cross_over", "gaussian_mutation", "UniformCrossOver", "GaussianMutation",
    "SeedGeneticAlgorithm", "seed_genetic_algorithm",
    "SelfAdaptiveStepSize", "SuccessRule", "per_tensor_stdev",
]  # = the keys of _EXPORTS (tests/test_cli_startup.py checks)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # static analysers and IDEs see the eager imports
    from evotorch_mqa_moe.evolution.adaptive import (
        SelfAdaptiveStepSize,
        SuccessRule,
        per_tensor_stdev,
    )
    from evotorch_mqa_moe.evolution.crossover import uniform_cross_over
    from evotorch_mqa_moe.evolution.ga import SeedGeneticAlgorithm, seed_genetic_algorithm
    from evotorch_mqa_moe.evolution.mutation import gaussian_mutation
    from evotorch_mqa_moe.evolution.operators import GaussianMutation, UniformCrossOver
    from evotorch_mqa_moe.model import (
        PRESETS,
        EncoderLayer,
        MixtureOfExperts,
        MQAMoETransformer,
        MultiQueryAttention,
        PopulationModel,
        TransformerConfig,
        num_parameters,
        population_forward,
        preset,
    )
    from evotorch_mqa_moe.problem import SupervisedTask, Task, TransformerProblem
    from evotorch_mqa_moe.searchers import (
        SEARCHERS,
        Searcher,
        SearcherSpec,
        make_searcher,
        register,
    )
