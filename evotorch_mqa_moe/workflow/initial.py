"""``--init PATH``: the flat weights of a trained model file (``best_model.pt``) or of a
run's checkpoint, checked against the model of the run that starts from them.

Both files load with ``torch.load(weights_only=True)``. A ``best_model.pt`` holds
``{"config", "state_dict", ...}``; a checkpoint holds ``"config"`` and, since this
option exists, ``"solution"`` (the searcher's ``current_solution()`` when it was
saved: the ES centre, the GA's best, adam's network). A model whose config differs
from the run's is refused with one line naming the first field that differs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn.utils import parameters_to_vector

from evotorch_mqa_moe.model import MQAMoETransformer, TransformerConfig, num_parameters

from .checkpoint import checksum

__all__ = ["load_initial_solution"]


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"--init {path}: no such file")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file: one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"--init {path} is not a readable model file or checkpoint "
                         f"({type(exc).__name__}: {first[:160]})") from None
    if not isinstance(blob, dict) or not isinstance(blob.get("config"), dict):
        raise ValueError(f"--init {path} is neither a best_model.pt nor a checkpoint (it has "
                         "no 'config')")
    return blob


def _check_config(path: Path, theirs: dict[str, Any], config: TransformerConfig) -> None:
    ours = config.to_dict()
    defaults = {f.name: f.default for f in dataclasses.fields(TransformerConfig)
                if f.default is not dataclasses.MISSING}
    for name in ours:
        value = theirs.get(name, defaults.get(name))
        if value != ours[name]:
            raise ValueError(f"--init {path}: model field {name} is {value!r} in the file but "
                             f"{ours[name]!r} in this run")


def load_initial_solution(path: str | Path, config: TransformerConfig) -> Tensor:
    """The ``(N,)`` float32 weights of the model in ``path`` for a run of model ``config``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: unreadable, neither a model file nor a checkpoint, a checkpoint
            without a saved solution (written before ``--init`` existed), a model of
            another config (naming the field), or weights of the wrong size.
    """
    path = Path(path)
    blob = _read(path)
    _check_config(path, blob["config"], config)
    if "state_dict" in blob:
        model = MQAMoETransformer(config)
        try:
            model.load_state_dict(blob["state_dict"])
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise ValueError(f"--init {path}: the weights do not fit the model ({first[:160]})"
                             ) from None
        values = parameters_to_vector(model.parameters()).detach()
    elif "solution" in blob:
        if "checksum" in blob and blob["checksum"] != checksum(blob):
            raise ValueError(f"--init {path} fails its checksum: the checkpoint changed "
                             "after it was written (a flipped bit, an edit)")
        values = torch.as_tensor(blob["solution"]).detach().to(torch.float32).reshape(-1)
    elif "searcher" in blob:
        raise ValueError(f"--init {path}: this checkpoint records no solution (written before "
                         "--init existed); use the run's best_model.pt")
    else:
        raise ValueError(f"--init {path} holds a config but no weights ('state_dict' or "
                         "'solution')")
    if values.numel() != num_parameters(config):
        raise ValueError(f"--init {path}: {values.numel():,} weights, the model has "
                         f"{num_parameters(config):,}")
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"--init {path}: the weights hold NaN/inf values")
    return values
