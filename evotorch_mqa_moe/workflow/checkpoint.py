"""Run checkpoints: loading with ``weights_only=True``, the checks that refuse a
checkpoint that does not fit (naming the file and the field), and ``best_model.pt``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from loguru import logger

from evotorch_mqa_moe.model import TransformerConfig

from .model_file import load_model  # noqa: F401 - re-exported: its home before model_file
from .settings import RunSettings, _flat_resolved, resolved_settings

CHECKPOINT_VERSION = 2  # 2: searcher state is the protocol's state_dict()
_CHECKPOINT_KEYS = {"version": int, "settings": dict, "config": dict, "searcher": dict,
                    "history": list, "elapsed": float}
RUN_FILES = ("checkpoint.pt", "history.csv", "results.json", "best_model.pt")


def _load_checkpoint(path: Path) -> dict[str, Any]:
    """``path`` loaded (``weights_only=True``) and checked for the keys and types of a
    checkpoint; ValueError naming ``path`` and what is wrong otherwise."""
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty, not a checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets one clear line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if "Weights only load failed" in first:  # torch's advice to unpickle it unsafely: no
            first = "not a weights-only torch.save file (a plain pickle or other bytes)"
        raise ValueError(f"{path} is not a readable checkpoint ({type(exc).__name__}: "
                         f"{first[:200]})") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} is not a checkpoint: it holds a {type(ckpt).__name__}, "
                         "not a dict")
    missing = sorted(set(_CHECKPOINT_KEYS) - set(ckpt))
    if missing:
        raise ValueError(f"{path} is not a complete checkpoint: missing {', '.join(missing)}")
    if ckpt["version"] != CHECKPOINT_VERSION:
        raise ValueError(f"{path} is a checkpoint of version {ckpt['version']!r}; this "
                         f"version reads {CHECKPOINT_VERSION}")
    for key, kind in _CHECKPOINT_KEYS.items():
        value = ckpt[key]
        ok = (isinstance(value, int | float) and not isinstance(value, bool)
              if kind is float else isinstance(value, kind))
        if not ok:
            raise ValueError(f"{path}: {key!r} is a {type(value).__name__}, expected a "
                             f"{kind.__name__}")
    if not all(isinstance(row, dict) for row in ckpt["history"]):
        raise ValueError(f"{path}: 'history' must be a list of dicts")
    if "resolved" in ckpt and not isinstance(ckpt["resolved"], dict):
        raise ValueError(f"{path}: 'resolved' is a {type(ckpt['resolved']).__name__}, "
                         "expected a dict")
    return ckpt


def _differences(theirs: dict[str, Any], ours: dict[str, Any]) -> list[str]:
    """``["name: checkpoint X, this run Y", ...]`` for the keys whose values differ."""
    missing = object()
    return [f"{k}: checkpoint {theirs.get(k, missing)!r}, this run {ours.get(k, missing)!r}"
            .replace(repr(missing), "(absent)")
            for k in sorted(set(theirs) | set(ours), key=str)
            if theirs.get(k, missing) != ours.get(k, missing)]


def _check_resumable(path: Path, ckpt: dict[str, Any], settings: RunSettings,
                     config: TransformerConfig) -> None:
    """ValueError naming what differs between the checkpoint and this run."""
    recorded = ckpt.get("resolved")
    # with resolved values recorded, popsize / stdev (and the searcher options, where
    # recorded) are compared as resolved, so a default given explicitly matches the
    # same default left unset
    skip = {"popsize", "stdev"} if recorded is not None else set()
    if recorded is not None and "options" in recorded:
        skip.add("searcher_options")
    skip.add("model")  # the model is compared as the resolved config, field by field
    diffs = _differences({k: v for k, v in ckpt["settings"].items() if k not in skip},
                         {k: v for k, v in settings.identity().items() if k not in skip})
    # a config field added after the checkpoint was written is absent there: it had
    # the field's default, which by convention keeps the earlier behaviour
    added = {f.name: f.default for f in dataclasses.fields(TransformerConfig)
             if f.name not in ckpt["config"] and f.default is not dataclasses.MISSING}
    diffs += [f"model.{d}" for d in _differences({**added, **ckpt["config"]},
                                                 config.to_dict())]
    if diffs:
        raise ValueError(f"{path} was written by other settings: {'; '.join(diffs)}")
    resolved = resolved_settings(settings)
    if recorded is None:
        logger.warning(f"{path} does not record its resolved popsize/stdev (written by an "
                       f"older version); resuming with this version's: {resolved}")
    else:
        ours = _flat_resolved(resolved)
        if "options" not in recorded:  # written before options were recorded
            if resolved["options"]:
                logger.warning(f"{path} does not record its searcher's resolved options "
                               "(written by an older version); resuming with this "
                               f"version's: {resolved['options']}")
            ours = {k: v for k, v in ours.items() if not k.startswith("searcher_options.")}
        diffs = _differences(_flat_resolved(recorded), ours)
        if diffs:
            raise ValueError(f"{path} was written with other resolved searcher settings "
                             f"(the defaults changed?): {'; '.join(diffs)}; give them "
                             "explicitly (--popsize / --stdev / --searcher-option NAME=VALUE) "
                             "to resume")
        if recorded.get("evotorch_mqa_moe") != resolved["evotorch_mqa_moe"]:
            logger.warning(f"{path} was written by evotorch_mqa_moe "
                           f"{recorded.get('evotorch_mqa_moe')}, resuming with "
                           f"{resolved['evotorch_mqa_moe']}")
    done = len(ckpt["history"])
    if settings.generations is not None and done > settings.generations:
        raise ValueError(f"{path} is at generation {done}, beyond --generations "
                         f"{settings.generations}; give at least {done} to resume")


def _check_finite(path: Path, searcher: Any) -> None:
    """Refuse a resumed searcher whose solution or population is not finite."""
    solution = searcher.current_solution()
    if not bool(torch.isfinite(solution).all()):
        raise ValueError(f"{path} holds a non-finite solution (NaN/inf in its centre / best); "
                         "refusing to resume from it")
    try:  # public SearchAlgorithm.population (GA, CMA-ES, distribution searchers)
        values = searcher.algorithm.population.values
    except Exception:  # noqa: BLE001 - searchers without a population (adam, ...)
        values = None
    if (isinstance(values, torch.Tensor) and values.is_floating_point()
            and not bool(torch.isfinite(values).all())):
        raise ValueError(f"{path} holds a population with NaN/inf values; refusing to "
                         "resume from it")
