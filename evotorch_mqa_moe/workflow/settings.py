"""What a run is: :class:`RunSettings`, the options the searcher's defaults resolve
to, and the package versions a run records."""

from __future__ import annotations

import dataclasses
import os
import platform
from dataclasses import dataclass, field
from typing import Any

import torch

from evotorch_mqa_moe._internal.validate import MAX_SEED, check_float, check_int
from evotorch_mqa_moe.model import resolve_dtype
from evotorch_mqa_moe.searchers import get_spec


@dataclass
class RunSettings:
    """What to run. Everything here is recorded in ``results.json`` and the checkpoint.

    Attributes:
        task: a name from ``evotorch_mqa_moe.problems.task_names()``.
        searcher: a name from :data:`~evotorch_mqa_moe.searchers.SEARCHERS`.
        generations: stop after this many steps (``None``: no step limit).
        max_evaluations: stop once the searcher has spent this many
            forward-equivalents (``searcher.evaluations``; ``None``: no limit).
        max_seconds: stop once the searcher's steps took this many seconds of
            wall time in total (``None``: no limit). At least one of the three
            limits must be given; the first one reached ends the run.
        popsize: population size (``None`` = the searcher's default).
        seed: seeds the problem, the searcher and the data stream.
        device: where evaluation runs (``"cpu"``, ``"cuda"``, ...).
        dtype: the forward pass's dtype, ``"float32"`` or ``"bfloat16"`` (populations
            and fitness stay float32; ``lowrank-es`` keeps its factors in it too).
        stdev: initial search / mutation stdev (``None``: the searcher's default).
        task_options, model, searcher_options: passed to the task, to
            ``TransformerConfig.replace`` and to the searcher's builder (e.g.
            ``{"lr": 1e-3}`` for ``adam``).
        eval_every: generations between held-out evaluations.
        checkpoint_every: generations between checkpoints.
        num_actors: Ray actors that evaluate the population in pieces (EvoTorch's
            ``num_actors``; 0: evaluate here). Searchers that evaluate through the
            problem (the EvoTorch ones) use them; the same seed gives the same run
            with and without actors. Needs ``device="cpu"`` for the main process.
        num_gpus_per_actor: GPUs per actor (EvoTorch's ``num_gpus_per_actor``; each
            actor then evaluates on its GPU).
        ray_address: join this Ray cluster (``ray.init(address=...)``, e.g.
            ``"auto"`` or ``"10.0.0.1:6379"``) instead of starting a local one.
        init: start the searcher from the weights in this file (``best_model.pt`` of
            an earlier run, or its ``checkpoint.pt``): the ES centre, adam's network,
            populations around it (:func:`~evotorch_mqa_moe.workflow.initial.\
load_initial_solution`; a model of another config is refused naming the field).
        The last three change where the work runs, not what is computed: they are not
        part of a checkpoint's identity, so a run may resume with other values.
    """

    task: str
    searcher: str = "pgpe"
    generations: int | None = None
    max_evaluations: int | None = None
    max_seconds: float | None = None
    popsize: int | None = None
    seed: int = 0
    device: str = "cpu"
    stdev: float | None = None
    task_options: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    searcher_options: dict[str, Any] = field(default_factory=dict)
    eval_every: int = 10
    checkpoint_every: int = 10
    dtype: str = "float32"
    num_actors: int = 0
    num_gpus_per_actor: float | None = None
    ray_address: str | None = None
    init: str | None = None

    def __post_init__(self) -> None:
        get_spec(self.searcher)  # ValueError naming the known searchers
        if self.generations is None and self.max_evaluations is None and self.max_seconds is None:
            raise ValueError("give a limit: generations, max_evaluations or max_seconds "
                             "(or several)")
        # canonical types (a NumPy integer becomes an int), so results.json can hold them
        self.max_seconds = check_float("max_seconds", self.max_seconds, none_ok=True)
        for name in ("generations", "max_evaluations"):
            setattr(self, name, check_int(name, getattr(self, name), none_ok=True))
        for name in ("eval_every", "checkpoint_every"):
            setattr(self, name, check_int(name, getattr(self, name)))
        self.seed = check_int("seed", self.seed, 0, MAX_SEED)
        if self.init is not None:
            if not isinstance(self.init, str | os.PathLike) or not str(self.init).strip():
                raise ValueError(f"init must be a file path, got {self.init!r}")
            self.init = str(self.init)
        # a known name, kept as one (the device is checked in _build)
        self.dtype = str(resolve_dtype(self.dtype, "meta")).removeprefix("torch.")
        self.num_actors = check_int("num_actors", self.num_actors, 0)
        if self.num_actors == 1:
            raise ValueError("num_actors must be 0 (evaluate in this process) or >= 2 "
                             "(Ray actors), got 1")
        self.num_gpus_per_actor = check_float("num_gpus_per_actor", self.num_gpus_per_actor,
                                              0.0, low_open=False, none_ok=True)
        if self.ray_address is not None and (not isinstance(self.ray_address, str)
                                             or not self.ray_address.strip()):
            raise ValueError(f"ray_address must be a non-empty string, got {self.ray_address!r}")
        if self.num_actors < 2:
            given = [n for n in ("num_gpus_per_actor", "ray_address") if getattr(self, n)
                     is not None]
            if given:
                raise ValueError(f"{' and '.join(given)} need Ray actors: give num_actors "
                                 f">= 2 (--actors), got {self.num_actors}")
        elif str(self.device).split(":")[0] != "cpu":
            raise ValueError(f"with Ray actors the main process must use device 'cpu', got "
                             f"{self.device!r}; give the actors GPUs with num_gpus_per_actor "
                             "(--gpus-per-actor)")

    def identity(self) -> dict[str, Any]:
        """The settings a checkpoint must share to be resumed (budgets may grow)."""
        d = dataclasses.asdict(self)
        for key in ("generations", "max_evaluations", "max_seconds", "eval_every",
                    "checkpoint_every", "device", "num_actors", "num_gpus_per_actor",
                    "ray_address"):
            d.pop(key)
        if d["dtype"] == "float32":  # absent from checkpoints written before --dtype
            d.pop("dtype")
        if d["init"] is None:  # absent from checkpoints written before --init
            d.pop("init")
        return d


def versions() -> dict[str, str]:
    import evotorch
    import numpy

    from evotorch_mqa_moe import __version__

    return {"python": platform.python_version(), "torch": torch.__version__,
            "evotorch": evotorch.__version__, "numpy": numpy.__version__,
            "evotorch_mqa_moe": __version__, "platform": platform.platform()}


def resolved_settings(settings: RunSettings) -> dict[str, Any]:
    """What ``settings``' names resolve to in this version: the searcher's popsize,
    stdev and options (its spec's ``defaults`` under the options given), and the
    package version.

    Recorded in the checkpoint; a resume whose resolved popsize / stdev / options
    differ (the defaults changed in an upgrade) is refused.
    """
    from evotorch_mqa_moe import __version__

    spec = get_spec(settings.searcher)
    return {"popsize": spec.default_popsize if settings.popsize is None else settings.popsize,
            "stdev": spec.default_stdev if settings.stdev is None else settings.stdev,
            "options": {**spec.defaults, **settings.searcher_options},
            "evotorch_mqa_moe": __version__}


def _flat_resolved(resolved: dict[str, Any]) -> dict[str, Any]:
    """``resolved`` without the version, its options as ``searcher_options.NAME`` keys."""
    flat = {k: v for k, v in resolved.items() if k not in ("options", "evotorch_mqa_moe")}
    flat.update({f"searcher_options.{k}": v for k, v in resolved.get("options", {}).items()})
    return flat


# bytes per population element: the population, its sampled noise / offspring and a
