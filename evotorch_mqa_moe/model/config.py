"""`TransformerConfig`: the shape of one MQA/MoE transformer, validated once."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from evotorch_mqa_moe._internal.validate import check_bool, check_choice, check_float, check_int

POSITIONAL = ("learned", "sinusoidal", "both", "none")
NORMS = ("pre", "post")
POOLINGS = (None, "mean", "first", "last")
ACTIVATIONS = ("gelu", "relu")
GATINGS = ("linear", "attention")

MAX_SEQ_LEN = 16384
"""Largest ``max_seq_len`` a config accepts. Attention here is dense: one float32
score matrix of a single head and sequence takes ``T * T * 4`` bytes, 1 GiB at
T = 16384 (half the default 2 GiB chunk budget on an accelerator), so longer
sequences cannot run even one individual at a time within budget."""


@dataclass(frozen=True)
class TransformerConfig:
    """Hyper-parameters of an :class:`~evotorch_mqa_moe.model.MQAMoETransformer`.

    Inputs are either tokens (``vocab_size`` set: integer tensors ``(B, T)``) or
    float vectors (``input_dim`` set: tensors ``(B, T, input_dim)``, e.g. a window
    of observations for a control policy). Exactly one of the two must be given.

    Attributes:
        vocab_size: number of token ids; inputs must lie in ``[0, vocab_size)``.
        input_dim: width of float-vector inputs (instead of tokens).
        embed_dim: model width ``D``; divisible by ``num_heads``.
        num_layers: encoder layers.
        num_heads: query heads ``H``; ``head_dim = D // H``.
        num_kv_heads: key/value heads; 1 = multi-query attention (the default),
            ``H`` = ordinary multi-head attention, in between = grouped-query.
            Query head ``h`` reads key/value head ``h // (H // num_kv_heads)``.
        expert_dim: hidden width ``F`` of each expert MLP.
        num_experts: experts ``E`` in every mixture-of-experts block.
        top_k: ``None`` = dense softmax gate over all experts (the seed's);
            ``k`` = the k largest gate logits, softmax renormalised over them.
        max_seq_len: longest sequence accepted (and size of learned positions);
            at most :data:`MAX_SEQ_LEN` (16384).
        causal: mask attention so position t sees only positions <= t.
        output_dim: width of the output head; defaults to ``vocab_size``.
        positional: ``"learned"``, ``"sinusoidal"`` (no parameters), ``"both"``
            or ``"none"`` (the seed's: it cannot tell positions apart).
        norm: ``"pre"`` (LayerNorm before each sub-layer, final LayerNorm) or
            ``"post"`` (the seed's: LayerNorm after each residual sum).
        pooling: ``None`` for per-position outputs ``(B, T, O)``; ``"mean"``,
            ``"first"`` or ``"last"`` pool over positions before the head,
            giving ``(B, O)`` for sequence classification.
        activation: expert nonlinearity, ``"relu"`` (default: a quarter of
            GELU's cost on the widest tensor, and it learned the example problems as
            well) or ``"gelu"``.
        norm_eps: LayerNorm epsilon, a finite positive number.
        gating: how the mixture-of-experts gate computes its logits.
            ``"linear"`` (default, the seed's): a linear map of each token alone.
            ``"attention"``: the linear logits of every token, mixed over the
            sequence by a small single-head attention (query/key width
            ``head_dim``, causal when ``causal``) and added to the token's own,
            so routing depends on context (adds ``D * 2 hd + 2 hd`` parameters
            per layer). Either works with the dense gate and with ``top_k``.
    """

    vocab_size: int | None = None
    embed_dim: int = 32
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 1
    expert_dim: int = 64
    num_experts: int = 4
    top_k: int | None = None
    max_seq_len: int = 64
    causal: bool = False
    output_dim: int | None = None
    input_dim: int | None = None
    positional: str = "sinusoidal"
    norm: str = "pre"
    pooling: str | None = None
    activation: str = "relu"
    norm_eps: float = 1e-5
    gating: str = "linear"

    def __post_init__(self) -> None:
        if (self.vocab_size is None) == (self.input_dim is None):
            raise ValueError(
                "exactly one of vocab_size (token inputs) and input_dim (float-vector "
                f"inputs) must be set, got vocab_size={self.vocab_size!r}, "
                f"input_dim={self.input_dim!r}"
            )
        for name in ("embed_dim", "num_layers", "num_heads", "num_kv_heads", "expert_dim",
                     "num_experts", "max_seq_len"):
            object.__setattr__(self, name, check_int(name, getattr(self, name)))
        if self.max_seq_len > MAX_SEQ_LEN:
            raise ValueError(
                f"max_seq_len must be at most {MAX_SEQ_LEN} (dense attention needs T*T scores "
                f"per head and sequence), got {self.max_seq_len!r}"
            )
        for name in ("vocab_size", "input_dim", "output_dim", "top_k"):
            object.__setattr__(self, name, check_int(name, getattr(self, name), none_ok=True))
        if self.output_dim is None:
            if self.vocab_size is None:
                raise ValueError("output_dim must be set when inputs are vectors (input_dim)")
            object.__setattr__(self, "output_dim", self.vocab_size)
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim={self.embed_dim} must be divisible by num_heads={self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be divisible by "
                f"num_kv_heads={self.num_kv_heads}"
            )
        if self.top_k is not None and self.top_k > self.num_experts:
            raise ValueError(
                f"top_k={self.top_k} cannot exceed num_experts={self.num_experts}"
            )
        check_bool("causal", self.causal)
        for name, allowed in (("positional", POSITIONAL), ("norm", NORMS),
                              ("pooling", POOLINGS), ("activation", ACTIVATIONS),
                              ("gating", GATINGS)):
            check_choice(name, getattr(self, name), allowed)
        object.__setattr__(self, "norm_eps", check_float("norm_eps", self.norm_eps))

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def token_inputs(self) -> bool:
        return self.vocab_size is not None

    def replace(self, **changes: object) -> TransformerConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, TransformerConfig] = {
    # The size the seed description used; for GPU-scale benchmarks (~100M parameters
    # with its 10k-token embedding and head).
    "seed": TransformerConfig(
        vocab_size=10000, embed_dim=512, num_layers=6, num_heads=8, num_kv_heads=1,
        expert_dim=2048, num_experts=4, max_seq_len=512, norm="post",
        positional="sinusoidal", activation="relu",
    ),
    # Config A of the benchmarks: small enough for a 2-core CPU.
    "bench-a": TransformerConfig(
        vocab_size=16, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=1,
        expert_dim=128, num_experts=4, max_seq_len=16,
    ),
}


def preset(name: str, **changes: object) -> TransformerConfig:
    """A named configuration from :data:`PRESETS`, optionally with fields changed."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name].replace(**changes) if changes else PRESETS[name]


TASK_FIELDS = ("vocab_size", "input_dim", "output_dim", "causal", "pooling")
"""The fields a task fixes (what it feeds in, what it scores, whether a model may look
ahead, whether it pools); :func:`preset_overrides` leaves them to the task."""


def preset_overrides(name: str) -> dict[str, object]:
    """Preset ``name``'s architecture as model changes for any task: every field but
    :data:`TASK_FIELDS`. ``task.default_config().replace(**preset_overrides("seed"))``
    is the seed-size model (embed 512, 6 layers, 8 heads, 4 experts of 2,048) with the
    task's vocabulary and output width; the CLI's ``--preset seed`` does this, and
    ``--model`` changes apply on top."""
    config = preset(name)  # ValueError naming the known presets
    return {k: v for k, v in config.to_dict().items() if k not in TASK_FIELDS}
