"""The model layer: the MQA/MoE transformer, written once for one network and for a
whole population.

Every layer is a function over weights that may carry one leading population axis
(:mod:`.layers`, :mod:`.forward`); the ``nn.Module`` (:mod:`.modules`) and the
population pass (:mod:`.population`) call the same functions, the first with its own
parameters, the second with views sliced out of a flat ``(P, N)`` matrix
(:mod:`.layout`). :mod:`.lowrank` stands a population in as shared weights plus
low-rank factors; :mod:`.genes` groups genes for group-wise operators;
:mod:`.memory` sizes the population chunks; :mod:`.cache`, :mod:`.decoding` and :mod:`.generate`
decode text incrementally, for one network or a population.

This package's names below are the interface the layers above (evolution, problem,
searchers) use; they import nothing from its modules directly.
"""

from __future__ import annotations

from .cache import KVCache, LayerCache
from .config import PRESETS, TransformerConfig, preset, preset_overrides
from .decoding import check_generation
from .dtypes import COMPUTE_DTYPES, resolve_dtype
from .forward import encoder_layer, transformer_forward
from .generate import cache_nbytes, population_generate
from .genes import GENE_GROUP_LEVELS, gene_groups
from .inputs import check_inputs, prepare_inputs
from .layers import (
    attention,
    gate_logits,
    gate_weights,
    layer_norm,
    linear,
    mixture_of_experts,
    moe_gates,
    sinusoidal_positions,
)
from .layout import init_parameters, num_parameters, parameter_layout
from .lowrank import (
    MODES,
    Block,
    LowRankPopulation,
    LowRankWeight,
    check_rank,
    lowrank_layout,
    lowrank_population_forward,
    num_vector_genes,
)
from .memory import bytes_per_individual, default_chunk_size
from .modules import EncoderLayer, MixtureOfExperts, MQAMoETransformer, MultiQueryAttention
from .population import PopulationModel, population_forward

__all__ = [
    "PRESETS", "TransformerConfig", "preset", "preset_overrides",
    "COMPUTE_DTYPES", "resolve_dtype",
    "linear", "layer_norm", "attention", "gate_weights", "gate_logits", "moe_gates",
    "mixture_of_experts", "sinusoidal_positions", "encoder_layer", "transformer_forward",
    "GENE_GROUP_LEVELS", "gene_groups",
    "check_inputs", "prepare_inputs",
    "init_parameters", "num_parameters", "parameter_layout",
    "MODES", "Block", "LowRankPopulation", "LowRankWeight", "check_rank", "lowrank_layout",
    "lowrank_population_forward", "num_vector_genes",
    "bytes_per_individual", "default_chunk_size",
    "EncoderLayer", "MixtureOfExperts", "MQAMoETransformer", "MultiQueryAttention",
    "PopulationModel", "population_forward",
    "KVCache", "LayerCache", "cache_nbytes", "check_generation", "population_generate",
]
