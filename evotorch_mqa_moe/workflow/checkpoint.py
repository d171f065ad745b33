"""Run checkpoints: loading with ``weights_only=True``, the checks that refuse a
checkpoint that does not fit (naming the file and the field), and ``best_model.pt``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from loguru import logger

from evotorch_mqa_moe._internal.evotorch_compat import POPSIZE_FIELDS, STATE_COUNTERS
from evotorch_mqa_moe.model import TransformerConfig

from .model_file import load_model  # noqa: F401 - re-exported: its home before model_file
from .settings import RunSettings, _flat_resolved, resolved_settings

CHECKPOINT_VERSION = 2  # 2: searcher state is the protocol's state_dict()
_CHECKPOINT_KEYS = {"version": int, "settings": dict, "config": dict, "searcher": dict,
                    "history": list, "elapsed": float}
RUN_FILES = ("checkpoint.pt", "history.csv", "results.json", "best_model.pt")


def checksum(ckpt: dict[str, Any]) -> str:
    """SHA-256 over every entry of ``ckpt`` but ``"checksum"``: keys, numbers, strings and
    each tensor's dtype, shape and bytes, in order. Recorded when a checkpoint is written
    and verified when it is read, so a changed bit anywhere is found."""
    digest = hashlib.sha256()

    def feed(x: Any) -> None:
        if isinstance(x, dict):
            digest.update(b"{%d" % len(x))
            for key, value in x.items():
                feed(key)
                feed(value)
        elif isinstance(x, list | tuple):
            digest.update(b"[%d" % len(x) if isinstance(x, list) else b"(%d" % len(x))
            for value in x:
                feed(value)
        elif isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            digest.update(f"{type(x).__name__}:{x!r};".encode())

    feed({k: v for k, v in ckpt.items() if k != "checksum"})
    return digest.hexdigest()


def _leaves(tree: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """``(path, leaf)`` of a searcher state (EvoTorch's ``__object__`` wrappers left out
    of the path)."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            name = path if key in ("__object__", "__list__", "__tuple__") else f"{path}.{key}"
            yield from _leaves(value, name)
    elif isinstance(tree, list | tuple):
        for i, value in enumerate(tree):
            yield from _leaves(value, f"{path}[{i}]")
    else:
        yield path, tree


_COUNTERS = STATE_COUNTERS  # never negative in a searcher state


def _check_values(path: Path, ckpt: dict[str, Any]) -> None:
    """ValueError naming the field of a checkpoint whose value cannot be resumed: a NaN/inf
    number or tensor in the searcher state (a centre, a sigma, a learning rate, a
    population's fitness, ...), a negative counter, an ``elapsed`` that is not a finite
    non-negative number, or a history that is not generations 1..n with growing costs."""
    elapsed = ckpt["elapsed"]
    if not (math.isfinite(elapsed) and elapsed >= 0):
        raise ValueError(f"{path}: 'elapsed' must be a finite number >= 0, got {elapsed!r}")
    total = ckpt.get("total_time", 0.0)  # absent before total time was recorded
    if not (isinstance(total, int | float) and math.isfinite(total) and total >= 0):
        raise ValueError(f"{path}: 'total_time' must be a finite number >= 0, got {total!r}")
    for name, leaf in _leaves(ckpt["searcher"], "searcher"):
        last = name.rsplit(".", 1)[-1]
        if isinstance(leaf, torch.Tensor) and leaf.dtype != torch.uint8:  # uint8: RNG states
            if leaf.is_floating_point() and not bool(torch.isfinite(leaf).all()):
                raise ValueError(f"{path}: {name} holds non-finite values (NaN/inf); "
                                 "refusing to resume from it")
            if last in _COUNTERS and leaf.dim() == 0 and bool(leaf < 0):  # Adam's step
                raise ValueError(f"{path}: {name} is negative ({leaf.min().item()!r})")
        elif isinstance(leaf, float) and not math.isfinite(leaf):
            raise ValueError(f"{path}: {name} is {leaf!r}; refusing to resume from it")
        elif (isinstance(leaf, int) and not isinstance(leaf, bool) and last in _COUNTERS
              and leaf < 0):
            raise ValueError(f"{path}: {name} is negative ({leaf})")
    before = 0
    for i, row in enumerate(ckpt["history"], 1):
        gen, evals = row.get("generation"), row.get("evaluations")
        if gen != i:
            raise ValueError(f"{path}: history row {i} is generation {gen!r}, expected {i}")
        if not (isinstance(evals, int) and not isinstance(evals, bool) and evals >= before):
            raise ValueError(f"{path}: history row {i} has evaluations {evals!r}, expected an "
                             f"integer >= {before} (the row before)")
        before = evals


def _kind(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "a bool"
    if isinstance(value, int | float | torch.Tensor):  # EvoTorch turns some into others
        return "a number or tensor"
    return "a string" if isinstance(value, str) else type(value).__name__


def _check_like_fresh(path: Path, saved: dict[str, Any], fresh: dict[str, Any]) -> None:
    """ValueError naming the first field of the saved searcher state whose kind (number,
    or tensor, string, bool) differs from the freshly built searcher's, or whose popsize
    does."""
    ours = dict(_leaves(fresh, "searcher"))
    for name, leaf in _leaves(saved, "searcher"):
        if name not in ours:
            continue
        want, got = _kind(ours[name]), _kind(leaf)
        if want is not None and got is not None and want != got:
            raise ValueError(f"{path}: {name} is {got} ({leaf!r:.40}), this searcher keeps "
                             f"{want} there")
        if (name.rsplit(".", 1)[-1] in POPSIZE_FIELDS and isinstance(leaf, int)
                and leaf != ours[name]):
            raise ValueError(f"{path}: {name} is {leaf!r}, this run's searcher has "
                             f"{ours[name]!r} (other --popsize?)")


def _check_loaded(path: Path, ckpt: dict[str, Any], searcher: Any) -> None:
    """The resumed searcher agrees with the checkpoint's history: as many steps as history
    rows and the same evaluations."""
    history = ckpt["history"]
    # EvoTorch's status says "iter" only after a step: its public step_count instead
    steps = getattr(getattr(searcher, "algorithm", None), "step_count", None)
    if steps is None:
        steps = searcher.status.get("iter")
    if steps is not None and int(steps) != len(history):
        raise ValueError(f"{path}: the searcher state has taken {int(steps)} steps but the "
                         f"history holds {len(history)} generations")
    evaluations = searcher.evaluations
    if not (isinstance(evaluations, int) and evaluations >= 0):
        raise ValueError(f"{path}: the searcher's evaluations are {evaluations!r}, expected "
                         "an integer >= 0")
    if history and evaluations != history[-1]["evaluations"]:
        raise ValueError(f"{path}: the searcher state has spent {evaluations:,} "
                         "forward-equivalents but the history's last row "
                         f"{history[-1]['evaluations']:,}")


def _load_checkpoint(path: Path) -> dict[str, Any]:
    """``path`` loaded (``weights_only=True``) and checked for the keys and types of a
    checkpoint, its checksum and its values; ValueError naming ``path`` and what is
    wrong otherwise."""
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty, not a checkpoint")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; text, pickles: no
        with open(path, "rb") as fh:
            head = fh.read(12)
        raise ValueError(f"{path} is not a checkpoint: not a torch.save zip archive "
                         f"(it starts with {head!r})")
    try:
        with warnings.catch_warnings():  # torch's pickle-protocol warnings: the line below
            warnings.simplefilter("ignore")
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
    recorded = ckpt.get("checksum")
    if recorded is None:
        logger.warning(f"{path} records no checksum (written by an older version); its "
                       "integrity is not verified")
    elif recorded != checksum(ckpt):
        raise ValueError(f"{path} fails its checksum: the file changed after it was "
                         "written (a flipped bit, an edit); refusing to resume from it")
    _check_values(path, ckpt)
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
