"""``best_model.pt``, the network a run ends with: loaded safely (``weights_only=True``)
without loading EvoTorch, so that ``sample`` starts as fast as torch does."""

from __future__ import annotations

from pathlib import Path

import torch

from evotorch_mqa_moe.model import MQAMoETransformer, TransformerConfig

__all__ = ["load_model"]


def load_model(path: str | Path, device: str | torch.device = "cpu") -> MQAMoETransformer:
    """Load ``best_model.pt`` (safely: ``weights_only=True``) as a network."""
    blob = torch.load(path, map_location=device, weights_only=True)
    model = MQAMoETransformer(TransformerConfig(**blob["config"]), device=device)
    model.load_state_dict(blob["state_dict"])
    return model
