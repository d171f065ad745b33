"""The ``nn.Module`` front door: :class:`MQAMoETransformer` and its blocks, each
parameter carrying the initialisation rule that the population draws from too.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .config import TransformerConfig
from .decoding import check_generation, decode, draw_uniforms
from .forward import encoder_layer, transformer_forward
from .inputs import _as_index, check_inputs
from .layers import attention, mixture_of_experts, moe_gates

# ----------------------------------------------------------------------------
# nn.Module front door
# ----------------------------------------------------------------------------


# Every parameter carries its initialisation rule, so that one network
# (MQAMoETransformer.reset_parameters) and a whole population
# (init_parameters) are drawn from exactly the same distributions.
#   ("uniform", b): U(-b, b), b = 1/sqrt(fan_in), nn.Linear's default
#   ("normal", s):  N(0, s^2)
#   ("const", c):   filled with c (LayerNorm weight 1, bias 0)


def _param(*shape: int, init: tuple[str, float], device=None, dtype=None) -> nn.Parameter:
    p = nn.Parameter(torch.empty(*shape, device=device, dtype=dtype))
    p.init_rule = init
    return p


def _fan_in(fan_in: int) -> tuple[str, float]:
    return ("uniform", 1.0 / math.sqrt(fan_in))


def _apply_init(tensor: Tensor, rule: tuple[str, float], generator=None) -> None:
    kind, value = rule
    if kind == "uniform":
        tensor.uniform_(-value, value, generator=generator)
    elif kind == "normal":
        tensor.normal_(0.0, value, generator=generator)
    else:
        tensor.fill_(value)


class _Initialised(nn.Module):
    """A module whose parameters carry init rules; ``reset_parameters`` draws them."""

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Draw fresh weights, in registration order, from ``generator`` (or torch's RNG)."""
        for p in self.parameters():
            _apply_init(p, p.init_rule, generator)

    def _init_unless_meta(self, skip: bool) -> None:
        if not skip and next(self.parameters()).device.type != "meta":
            self.reset_parameters()


class _LayerNorm(nn.Module):
    def __init__(self, dim: int, device=None, dtype=None):
        super().__init__()
        self.weight = _param(dim, init=("const", 1.0), device=device, dtype=dtype)
        self.bias = _param(dim, init=("const", 0.0), device=device, dtype=dtype)


class MultiQueryAttention(_Initialised):
    """Self-attention where all query heads share ``num_kv_heads`` key/value heads.

    Parameters: ``qkv_weight`` (D, (H + 2K) * hd) fusing the query, key and value
    projections (in that order), ``qkv_bias``, ``out_weight`` (H * hd, D), ``out_bias``.
    Input and output: (B, T, D).
    """

    def __init__(self, config: TransformerConfig, device=None, dtype=None, _skip_init=False):
        super().__init__()
        self.config = config
        D, width = config.embed_dim, (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
        kw = dict(device=device, dtype=dtype)
        self.qkv_weight = _param(D, width, init=_fan_in(D), **kw)
        self.qkv_bias = _param(width, init=_fan_in(D), **kw)
        self.out_weight = _param(config.num_heads * config.head_dim, D, init=_fan_in(D), **kw)
        self.out_bias = _param(D, init=_fan_in(D), **kw)
        self._init_unless_meta(_skip_init)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        y = attention(x.reshape(B * T, D), self.qkv_weight, self.qkv_bias, self.out_weight,
                      self.out_bias, self.config, B)
        return y.view(B, T, D)


class MixtureOfExperts(_Initialised):
    """A softmax gate (dense or top-k) over ``num_experts`` two-layer MLPs, per token.

    Parameters: ``gate_weight`` (D, E), ``gate_bias`` (E,), then, with
    ``config.gating == "attention"`` only, ``gate_qk_weight`` (D, 2 hd) and
    ``gate_qk_bias`` (2 hd,) (the gate's query/key projection, see
    :func:`gate_logits`), then ``in_weight`` (D, E, F), ``in_bias`` (E, F),
    ``out_weight`` (E, F, D), ``out_bias`` (E, D).
    Input and output: (B, T, D).
    """

    def __init__(self, config: TransformerConfig, device=None, dtype=None, _skip_init=False):
        super().__init__()
        self.config = config
        D, E, Fd = config.embed_dim, config.num_experts, config.expert_dim
        kw = dict(device=device, dtype=dtype)
        self.gate_weight = _param(D, E, init=_fan_in(D), **kw)
        self.gate_bias = _param(E, init=_fan_in(D), **kw)
        if config.gating == "attention":
            width = 2 * config.head_dim
            self.gate_qk_weight = _param(D, width, init=_fan_in(D), **kw)
            self.gate_qk_bias = _param(width, init=_fan_in(D), **kw)
        self.in_weight = _param(D, E, Fd, init=_fan_in(D), **kw)
        self.in_bias = _param(E, Fd, init=_fan_in(D), **kw)
        self.out_weight = _param(E, Fd, D, init=_fan_in(Fd), **kw)
        self.out_bias = _param(E, D, init=_fan_in(Fd), **kw)
        self._init_unless_meta(_skip_init)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        y = mixture_of_experts(x.reshape(B * T, D), self.gate_weight, self.gate_bias,
                               self.in_weight, self.in_bias, self.out_weight, self.out_bias,
                               self.config, B, *self._gate_qk())
        return y.view(B, T, D)

    def _gate_qk(self) -> tuple[Tensor | None, Tensor | None]:
        return getattr(self, "gate_qk_weight", None), getattr(self, "gate_qk_bias", None)

    def gates(self, x: Tensor) -> Tensor:
        """Expert weights (B, T, E) this block gives the tokens of its input x (B, T, D)."""
        B, T, D = x.shape
        return moe_gates(x.reshape(B * T, D), self.gate_weight, self.gate_bias, self.config, B,
                         *self._gate_qk()).view(B, T, -1)


class EncoderLayer(_Initialised):
    """Attention then mixture of experts, each with a residual and LayerNorm (pre or post)."""

    def __init__(self, config: TransformerConfig, device=None, dtype=None, _skip_init=False):
        super().__init__()
        self.config = config
        self.norm1 = _LayerNorm(config.embed_dim, device, dtype)
        self.attn = MultiQueryAttention(config, device, dtype, _skip_init=True)
        self.norm2 = _LayerNorm(config.embed_dim, device, dtype)
        self.moe = MixtureOfExperts(config, device, dtype, _skip_init=True)
        self._init_unless_meta(_skip_init)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        return encoder_layer(x.reshape(B * T, D), dict(self.named_parameters()), self.config,
                             B).view(B, T, D)


class _Embedding(nn.Module):
    def __init__(self, config: TransformerConfig, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        if config.token_inputs:
            # nn.Embedding's N(0, 1): on the scale of the sinusoidal code.
            self.weight = _param(config.vocab_size, config.embed_dim, init=("normal", 1.0), **kw)
        else:
            fan_in = _fan_in(config.input_dim)
            self.weight = _param(config.input_dim, config.embed_dim, init=fan_in, **kw)
            self.bias = _param(config.embed_dim, init=fan_in, **kw)


class _Head(nn.Module):
    def __init__(self, config: TransformerConfig, device=None, dtype=None):
        super().__init__()
        D, kw = config.embed_dim, dict(device=device, dtype=dtype)
        self.weight = _param(D, config.output_dim, init=_fan_in(D), **kw)
        self.bias = _param(config.output_dim, init=_fan_in(D), **kw)


class MQAMoETransformer(_Initialised):
    """A transformer encoder of multi-query attention and mixture-of-experts layers.

    ``forward(inputs)``: tokens (B, T) (or vectors (B, T, input_dim)) ->
    (B, T, output_dim), or (B, output_dim) when ``config.pooling`` is set.

    The parameters are registered in the order of the flat solution vectors that
    EvoTorch evolves (``parameters_to_vector(model.parameters())``), so
    ``vector_to_parameters(values[i], model.parameters())`` gives the network that
    :func:`population_forward` evaluated as row ``i``.
    """

    def __init__(self, config: TransformerConfig, device=None, dtype=None):
        super().__init__()
        if not isinstance(config, TransformerConfig):
            raise TypeError(f"config must be a TransformerConfig, got {type(config).__name__}")
        self.config = config
        self.embed = _Embedding(config, device, dtype)
        if config.positional in ("learned", "both"):
            self.pos_embed = _param(config.max_seq_len, config.embed_dim, init=("normal", 0.5),
                                    device=device, dtype=dtype)
        self.layers = nn.ModuleList(EncoderLayer(config, device, dtype, _skip_init=True)
                                    for _ in range(config.num_layers))
        if config.norm == "pre":
            self.final_norm = _LayerNorm(config.embed_dim, device, dtype)
        self.head = _Head(config, device, dtype)
        self._init_unless_meta(False)

    def forward(self, inputs: Tensor) -> Tensor:
        check_inputs(self.config, inputs, popsize=None)
        if self.config.token_inputs:
            inputs = _as_index(inputs)
        return transformer_forward(self.config, dict(self.named_parameters()), inputs)

    def routing(self, inputs: Tensor) -> Tensor:
        """Expert weights (num_layers, B, T, E) every layer's gate gives each token of
        ``inputs`` (tokens (B, T) or vectors (B, T, I)); rows sum to 1."""
        check_inputs(self.config, inputs, popsize=None)
        if self.config.token_inputs:
            inputs = _as_index(inputs)
        gates: list[Tensor] = []
        transformer_forward(self.config, dict(self.named_parameters()), inputs, gates=gates)
        B, T = inputs.shape[:2]
        return torch.stack(gates).view(self.config.num_layers, B, T, -1)

    @torch.no_grad()
    def generate(self, prompt: Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: int | None = None, greedy: bool = False,
                 generator: torch.Generator | None = None) -> Tensor:
        """Continue ``prompt`` by ``max_new_tokens`` tokens, with a key/value cache.

        Args:
            prompt: token ids (T0,) or a batch of prompts (B, T0) of equal length.
            temperature: sample from softmax(logits / temperature) (> 0).
            top_k: sample among the k most likely tokens only.
            greedy: take the most likely token (temperature and top_k then do nothing).
            generator: the random numbers of sampling (one uniform per prompt and
                step, drawn up front): the same generator state gives the same text.
        Returns:
            The prompt followed by the new tokens: (T0 + n,) or (B, T0 + n).
        Causal token models with per-token next-token outputs only; a clear error
        otherwise, and when ``T0 + max_new_tokens > max_seq_len``.
        """
        single = isinstance(prompt, Tensor) and prompt.dim() == 1
        prompts = prompt.unsqueeze(0) if single else prompt
        n = check_generation(self.config, prompts, max_new_tokens, temperature=temperature,
                             top_k=top_k, greedy=greedy)
        weights = dict(self.named_parameters())
        uniforms = None
        if not greedy:
            uniforms = draw_uniforms((n, prompts.shape[0]), generator, prompts.device)
        tokens, _ = decode(self.config, weights, prompts, n, uniforms=uniforms,
                           temperature=temperature, top_k=top_k)
        return tokens[0] if single else tokens
