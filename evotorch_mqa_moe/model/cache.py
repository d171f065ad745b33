"""The key/value cache of incremental decoding: what each layer has already computed for
the tokens seen so far, so that a new token costs one row of work instead of the whole
prefix.

Per layer the cache keeps the attention keys and values, ``(*lead, B, K, T, hd)`` each
(``lead`` is ``(P,)`` for a population, empty for one network; K = ``num_kv_heads``,
so multi-query attention stores one head where multi-head attention stores H), and,
with ``gating="attention"``, the gate's keys and linear gate logits, whose context mix
is causal too. Buffers are allocated on first use at the full ``max_len``, in the
activations' dtype and device, and filled in place: appending never copies what is
already there.
"""

from __future__ import annotations

from torch import Tensor

from evotorch_mqa_moe._internal.validate import check_int

from .config import TransformerConfig


class LayerCache:
    """One layer's buffers; ``append`` writes new time steps at the cache's offset."""

    def __init__(self, owner: KVCache):
        self._owner = owner
        self.buffers: dict[str, Tensor] = {}

    @property
    def offset(self) -> int:
        """Time steps already in the cache (the position of the first new token)."""
        return self._owner.length

    def append(self, name: str, new: Tensor) -> Tensor:
        """Write ``new`` (..., T, d) at time steps ``[offset, offset + T)`` of buffer
        ``name`` and return the buffer's filled part (..., offset + T, d), a view."""
        start, T = self.offset, new.shape[-2]
        buffer = self.buffers.get(name)
        if buffer is None:
            buffer = new.new_empty(*new.shape[:-2], self._owner.max_len, new.shape[-1])
            self.buffers[name] = buffer
        elif buffer.shape[:-2] != new.shape[:-2] or buffer.shape[-1] != new.shape[-1]:
            raise ValueError(f"cache buffer {name!r} holds {tuple(buffer.shape)}; cannot append "
                             f"{tuple(new.shape)}")
        if start + T > self._owner.max_len:
            raise ValueError(f"the cache holds max_len={self._owner.max_len} time steps; "
                             f"cannot append {T} after {start}")
        buffer[..., start : start + T, :].copy_(new)
        return buffer[..., : start + T, :]


class KVCache:
    """Every layer's :class:`LayerCache` and the number of time steps they hold.

    ``transformer_forward(config, weights, tokens, cache=cache)`` reads tokens at
    positions ``[cache.length, cache.length + T)``, appends their keys/values to every
    layer and then advances ``length`` by T.
    """

    def __init__(self, config: TransformerConfig, max_len: int):
        if not config.causal:
            raise ValueError("a key/value cache needs a causal model (config.causal=False): "
                             "without the mask every past token would see the new ones")
        self.config = config
        self.max_len = check_int("max_len", max_len, 1, config.max_seq_len)
        self.length = 0
        self.layers = [LayerCache(self) for _ in range(config.num_layers)]

    def advance(self, steps: int) -> None:
        self.length += steps

    def keys(self, layer: int) -> Tensor:
        """Attention keys of ``layer`` so far: (*lead, B, K, length, hd)."""
        return self.layers[layer].buffers["k"][..., : self.length, :]

    def values(self, layer: int) -> Tensor:
        """Attention values of ``layer`` so far: (*lead, B, K, length, hd)."""
        return self.layers[layer].buffers["v"][..., : self.length, :]

    def nbytes(self, attention_only: bool = True) -> int:
        """Bytes held by the cache's buffers (allocated at ``max_len``), read off the
        tensors: the attention keys/values only, or with the gate's too."""
        return sum(t.numel() * t.element_size() for layer in self.layers
                   for name, t in layer.buffers.items()
                   if not attention_only or name in ("k", "v"))

