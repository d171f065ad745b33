"""Evolve multi-query-attention / mixture-of-experts transformers with EvoTorch.

The model (:class:`MQAMoETransformer`) and its population pass
(:func:`population_forward`) share one implementation; :class:`TransformerProblem`
turns a :class:`Task` into an EvoTorch ``NEProblem`` that evaluates the whole
population at once.
"""

from .config import PRESETS, TransformerConfig, preset
from .model import (
    EncoderLayer,
    MixtureOfExperts,
    MQAMoETransformer,
    MultiQueryAttention,
    PopulationModel,
    num_parameters,
    population_forward,
)
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
]
