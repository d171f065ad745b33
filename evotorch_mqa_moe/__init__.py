"""Evolve multi-query-attention / mixture-of-experts transformers with EvoTorch.

The model (:class:`MQAMoETransformer`) and its population pass
(:func:`population_forward`) share one implementation; :class:`TransformerProblem`
turns a :class:`Task` into an EvoTorch ``NEProblem`` that evaluates the whole
population at once.
"""

from .adaptive import SelfAdaptiveStepSize, SuccessRule, per_tensor_stdev
from .config import PRESETS, TransformerConfig, preset
from .functional import gaussian_mutation, uniform_cross_over
from .ga import SeedGeneticAlgorithm, seed_genetic_algorithm
from .model import (
    EncoderLayer,
    MixtureOfExperts,
    MQAMoETransformer,
    MultiQueryAttention,
    PopulationModel,
    num_parameters,
    population_forward,
)
from .operators import GaussianMutation, UniformCrossOver
from .problem import TransformerProblem
from .searchers import SEARCHERS, Searcher, SearcherSpec, make_searcher, register
from .task import SupervisedTask, Task

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "TransformerConfig",
    "preset",
    "EncoderLayer",
    "MixtureOfExperts",
    "MQAMoETransformer",
    "MultiQueryAttention",
    "PopulationModel",
    "num_parameters",
    "population_forward",
    "SupervisedTask",
    "Task",
    "TransformerProblem",
    "SEARCHERS",
    "Searcher",
    "SearcherSpec",
    "make_searcher",
    "register",
    "uniform_cross_over",
    "gaussian_mutation",
    "UniformCrossOver",
    "GaussianMutation",
    "SeedGeneticAlgorithm",
    "seed_genetic_algorithm",
    "SelfAdaptiveStepSize",
    "SuccessRule",
    "per_tensor_stdev",
]
