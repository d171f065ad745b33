"""Run a searcher on a task: progress, periodic checkpoints, exact resume, results on disk.

Files written to the output folder:

* ``checkpoint.pt``: everything needed to resume exactly (searcher state,
  random states, history), replaced atomically; loads with ``weights_only=True``.
* ``history.csv``: one row per generation (evaluations, wall time, fitness,
  held-out metrics every ``eval_every`` generations).
* ``results.json``: settings, model config, versions, final held-out metrics,
  wall time and evaluations.
* ``best_model.pt``: the final solution (``searcher.current_solution()``: ES
  centre, GA population best, or the trained network) as
  ``{"config": ..., "state_dict": ...}``; see :func:`load_model`.

The searcher is built from the registry (:func:`~evotorch_mqa_moe.searchers.make_searcher`)
and used only through the searcher protocol, whichever it is.

**Budgets.** A run stops at the first of its limits that is reached:
``generations`` (steps), ``max_evaluations`` (forward-equivalents: one forward
of one individual on one task batch = 1, a backward 2 more, so one Adam step =
3) and ``max_seconds`` (wall time of the searcher's steps, as in
``history.csv``'s ``wall_time``; held-out metrics and checkpoints are not
counted). Only the limits given apply; the log and ``results.json``
(``stopped_by``) say which one ended the run. A run may overshoot
``max_evaluations`` / ``max_seconds`` by less than one generation.

**Refusals.** A folder that already holds a run is refused unless
``overwrite=True`` (``--overwrite``) or ``resume=True``. A checkpoint is checked
before it is used: unreadable, incomplete, wrongly shaped or non-finite
checkpoints, other settings (the message names each field that differs), other
resolved popsize / stdev / searcher options (the checkpoint records what the
defaults resolved to, and the package version) and ``generations`` below the
checkpoint's are each a ``ValueError`` naming the file and what is wrong.

Ctrl-C or SIGTERM stops the run after the current generation and saves a
checkpoint (a second signal stops at once, keeping the last periodic one); ``resume=True``
continues from it and ends exactly as an uninterrupted run with the same seed
would (on the CPU).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from loguru import logger

from ._evotorch_compat import actors_started, sync_logger_step
from ._files import atomic_save, atomic_to_csv, atomic_write_text
from ._validate import check_float, check_int
from .config import TransformerConfig
from .model import MQAMoETransformer, resolve_dtype
from .problem import TransformerProblem
from .searchers import get_spec, make_searcher

__all__ = ["RunSettings", "run", "load_model", "RunInterrupted"]

CHECKPOINT_VERSION = 2  # 2: searcher state is the protocol's state_dict()


class RunInterrupted(KeyboardInterrupt):
    """The run was stopped (Ctrl-C / SIGTERM).

    Attributes:
        checkpoint: the checkpoint to resume from (``None`` when the run stopped
            before its first checkpoint).
        saved: whether a checkpoint was saved at the stop (first signal); False
            when the run stopped at once (second signal) and only the last periodic
            checkpoint, if any, is kept.
    """

    def __init__(self, message: str = "", *, checkpoint: Path | None = None,
                 saved: bool = False):
        super().__init__(message)
        self.checkpoint = checkpoint
        self.saved = saved

    def describe(self) -> str:
        """One line for the user: what was saved and how to continue."""
        if self.saved:
            return f"interrupted; checkpoint saved to {self.checkpoint}, continue with --resume"
        if self.checkpoint is not None:
            return (f"interrupted during a generation; nothing new was saved, the last "
                    f"periodic checkpoint ({self.checkpoint}) is kept, continue with --resume")
        return "interrupted before the first checkpoint; nothing saved"


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
        self.seed = check_int("seed", self.seed, 0)
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
        return d


def versions() -> dict[str, str]:
    import evotorch
    import numpy

    from . import __version__

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
    from . import __version__

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
# working copy (3 copies of popsize x N values)
_POPULATION_COPIES = 3


def _available_memory(device: torch.device) -> int:
    """Bytes of memory on ``device`` (total GPU memory, or the host's physical memory)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[1])
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # not POSIX: no check
        return 2**63


def check_population_memory(popsize: int, num_parameters: int, dtype: torch.dtype,
                            device: str | torch.device) -> None:
    """Refuse, before allocating, a population that cannot fit in ``device``'s memory.

    Needs about ``popsize x num_parameters x element size x 3`` bytes (population,
    noise / offspring, a working copy).

    Raises:
        ValueError: naming the memory the population needs and what the device has.
    """
    device = torch.device(device)
    need = popsize * num_parameters * torch.empty(0, dtype=dtype).element_size()
    need *= _POPULATION_COPIES
    have = _available_memory(device)
    if need > have:
        raise ValueError(f"popsize {popsize:,} needs about {need / 2**30:,.1f} GiB for the "
                         f"population ({popsize:,} x {num_parameters:,} parameters x "
                         f"{torch.empty(0, dtype=dtype).element_size()} bytes x "
                         f"{_POPULATION_COPIES} copies); {device.type} has "
                         f"{have / 2**30:,.1f} GiB")


def _connect_ray(address: str | None) -> None:
    """Join the Ray cluster at ``address``; ``None``: EvoTorch starts a local Ray when it
    starts the actors. ValueError naming the address when that fails."""
    try:
        import ray
    except ImportError:
        raise ValueError("Ray actors need the ray package (pip install ray)") from None
    if address is None or ray.is_initialized():
        return
    try:
        ray.init(address=address)
    except Exception as exc:  # noqa: BLE001 - connection errors of many kinds: one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"cannot join the Ray cluster at {address!r}: {first}") from None


def _build(settings: RunSettings):
    from .problems import make_task

    task = make_task(settings.task, **settings.task_options)
    config = task.default_config()
    if settings.model:
        valid = [f.name for f in dataclasses.fields(TransformerConfig)]
        unknown = sorted(set(settings.model) - set(valid))
        if unknown:
            raise ValueError(f"unknown model field(s) {', '.join(map(repr, unknown))}; "
                             f"TransformerConfig fields: {', '.join(valid)}")
        config = config.replace(**settings.model)
    actors: dict[str, Any] = {}
    if settings.num_actors >= 2:
        _connect_ray(settings.ray_address)
        actors = {"num_actors": settings.num_actors,
                  "num_gpus_per_actor": settings.num_gpus_per_actor}
    problem = TransformerProblem(task, config, seed=settings.seed, device=settings.device,
                                 compute_dtype=settings.dtype, **actors)
    if get_spec(settings.searcher).dense_population:  # lowrank-es stores factors, not P x N
        check_population_memory(resolved_settings(settings)["popsize"],
                                problem.solution_length, problem.dtype, settings.device)
    searcher = make_searcher(settings.searcher, problem, popsize=settings.popsize,
                             stdev=settings.stdev, **settings.searcher_options)
    return task, config, problem, searcher


def _stop_reason(settings: RunSettings, generations: int, evaluations: int,
                 elapsed: float) -> tuple[str, str] | None:
    """``(limit, description)`` of the first limit of ``settings`` reached; None while none is."""
    if settings.generations is not None and generations >= settings.generations:
        return "generations", f"{generations:,} generations >= {settings.generations:,}"
    if settings.max_evaluations is not None and evaluations >= settings.max_evaluations:
        return ("max_evaluations", f"{evaluations:,} forward-equivalents >= "
                                   f"{settings.max_evaluations:,}")
    if settings.max_seconds is not None and elapsed >= settings.max_seconds:
        return "max_seconds", f"{elapsed:.4g} s >= {settings.max_seconds:g} s"
    return None


def _write_history(history: list[dict], path: Path) -> None:
    import pandas as pd

    atomic_to_csv(pd.DataFrame(history), path)


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


def load_model(path: str | Path, device: str | torch.device = "cpu") -> MQAMoETransformer:
    """Load ``best_model.pt`` (safely: ``weights_only=True``) as a network."""
    blob = torch.load(path, map_location=device, weights_only=True)
    model = MQAMoETransformer(TransformerConfig(**blob["config"]), device=device)
    model.load_state_dict(blob["state_dict"])
    return model


@contextmanager
def _stop_at_generation_end() -> Iterator[dict[str, Any]]:
    """Ctrl-C / SIGTERM ask the loop to stop after the current generation.

    Stopping mid-step would leave the searcher half updated, and a checkpoint of
    that state would not resume exactly; a second signal stops at once (the last
    periodic checkpoint is kept).
    """
    request: dict[str, Any] = {"signal": None}

    def handler(signum, frame):
        if request["signal"] is not None:
            raise KeyboardInterrupt(f"signal {signum}")
        request["signal"] = signum
        logger.warning("stopping after this generation (signal again to stop at once)")

    try:
        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: leave signals alone
        yield request
        return
    try:
        yield request
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run(settings: RunSettings, out: str | Path, *, resume: bool = False,
        overwrite: bool = False, callbacks: Sequence[Callable[[dict[str, Any]], Any]] = (),
        progress: bool = False) -> dict[str, Any]:
    """Run ``settings`` writing to folder ``out``; returns what ``results.json`` holds.

    Args:
        settings: what to run.
        out: the output folder (created if missing).
        resume: continue from ``out/checkpoint.pt``.
        overwrite: start afresh in a folder that already holds a run (its run files
            are deleted first); without it such a folder is refused.
        callbacks: called after every generation with that generation's row of
            ``history.csv`` plus ``"iter"`` (= ``"generation"``): numbers only, the
            held-out metrics on the generations that compute them. EvoTorch loggers
            fit here: :func:`~evotorch_mqa_moe.loggers.make_logger` (``"pandas"``,
            ``"mlflow"``, ``"wandb"``, ``"neptune"``) or any callable.
        progress: draw a progress bar toward the budget on stderr (tqdm; its
            percentage is the furthest of the limits: generations, forward-equivalents,
            seconds), with an ETA. The log lines are unchanged.

    Raises:
        FileNotFoundError: ``resume`` without ``out/checkpoint.pt``.
        FileExistsError: ``out`` holds a run, without ``resume`` or ``overwrite``.
        ValueError: ``out`` is not a usable folder; the checkpoint is unreadable,
            incomplete, not finite, beyond ``settings.generations``, or belongs to
            other settings (the message names the fields that differ).
        OSError: a file could not be written (its ``.tmp`` is removed).
        RunInterrupted: Ctrl-C / SIGTERM (see its ``saved`` / ``checkpoint``).
    """
    out = Path(out)
    checkpoint_path = out / "checkpoint.pt"
    if out.exists() and not out.is_dir():
        raise ValueError(f"output folder {out} is a file, not a folder")
    if resume and not checkpoint_path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume at {checkpoint_path}")
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if existing and not resume:
        if not overwrite:
            raise FileExistsError(f"{out} already holds a run ({', '.join(existing)}); "
                                  "continue it with --resume or replace it with --overwrite")
        for name in existing:
            (out / name).unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create output folder {out}: "
                         f"{exc.strerror or type(exc).__name__}") from None
    task, config, problem, searcher = _build(settings)
    try:
        return _execute(settings, out, task, config, problem, searcher, resume=resume,
                        callbacks=list(callbacks), progress=progress)
    finally:
        if actors_started(problem):
            problem.kill_actors()


def _execute(settings: RunSettings, out: Path, task: Any, config: TransformerConfig,
             problem: TransformerProblem, searcher: Any, *, resume: bool,
             callbacks: list[Callable[[dict[str, Any]], Any]],
             progress: bool) -> dict[str, Any]:
    """The body of :func:`run` once the searcher is built."""
    checkpoint_path = out / "checkpoint.pt"
    history: list[dict[str, Any]] = []
    elapsed = 0.0
    resolved = resolved_settings(settings)
    if resume:
        ckpt = _load_checkpoint(checkpoint_path)
        _check_resumable(checkpoint_path, ckpt, settings, config)
        try:
            searcher.load_state_dict(ckpt["searcher"])
        except (KeyError, TypeError, RuntimeError, IndexError) as exc:
            raise ValueError(f"{checkpoint_path}: the searcher state does not fit this "
                             f"searcher ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        _check_finite(checkpoint_path, searcher)
        history, elapsed = ckpt["history"], float(ckpt["elapsed"])
        logger.info(f"resumed {settings.task}/{settings.searcher} at generation {len(history)}")
    saved = {"any": checkpoint_path.is_file()}

    def save_checkpoint() -> None:
        atomic_save({"version": CHECKPOINT_VERSION, "settings": settings.identity(),
                      "resolved": resolved,
                      "config": config.to_dict(), "searcher": searcher.state_dict(),
                      "history": history,
                      "elapsed": elapsed}, checkpoint_path)
        saved["any"] = True
        _write_history(history, out / "history.csv")

    def done(gen: int) -> tuple[str, str] | None:
        return _stop_reason(settings, gen, searcher.evaluations, elapsed)

    metric = task.target_metric
    where = (f"{settings.num_actors} Ray actors" if settings.num_actors
             else f"device {settings.device}")
    logger.info(f"{settings.task} with {settings.searcher}: {problem.solution_length:,} "
                f"parameters, {where}, output {out}")
    bar = _ProgressBar(settings, len(history), searcher.evaluations, elapsed) if progress \
        else None
    try:
        with _stop_at_generation_end() as stop:
            while not done(len(history)):
                start = time.perf_counter()
                searcher.step()
                elapsed += time.perf_counter() - start
                gen = len(history) + 1
                status = searcher.status
                row = {"generation": gen,
                       "evaluations": searcher.evaluations,
                       "wall_time": elapsed,
                       "best_fitness": float(status["pop_best_eval"]),
                       "mean_fitness": float(status["mean_eval"]),
                       "best_so_far": float(status["best_eval"])}
                last = done(gen) is not None
                if gen % settings.eval_every == 0 or last:
                    row.update({k: float(v) for k, v in
                                problem.metrics(searcher.current_solution()).items()})
                history.append(row)
                for callback in callbacks:
                    sync_logger_step(callback, gen - 1)  # EvoTorch loggers: step = gen
                    callback({"iter": gen, **row})
                if bar is not None:
                    bar.update(gen, row["evaluations"], elapsed,
                               row.get(metric) if metric in row else None, metric)
                if gen % settings.eval_every == 0 or last:
                    rate = row["evaluations"] / max(elapsed, 1e-9)
                    held = f" | {metric} {row[metric]:.4g}" if metric in row else ""
                    # the unit is the budget's: one forward of one individual on one batch
                    logger.info(f"gen {gen} | {row['evaluations']:,} forward-equivalents | "
                                f"best {row['best_fitness']:.4g} | mean "
                                f"{row['mean_fitness']:.4g}{held} | {rate:,.0f} fwd-eq/s")
                if gen % settings.checkpoint_every == 0 or stop["signal"] is not None:
                    save_checkpoint()
                if stop["signal"] is not None:
                    logger.warning(f"interrupted at generation {gen}; checkpoint saved to "
                                   f"{checkpoint_path}; continue with resume")
                    raise RunInterrupted(f"signal {stop['signal']}",
                                         checkpoint=checkpoint_path, saved=True)
    except RunInterrupted:
        raise
    except KeyboardInterrupt as exc:
        # Mid-step: the searcher may be half updated, so its state is not saved.
        interrupted = RunInterrupted(str(exc), saved=False,
                                     checkpoint=checkpoint_path if saved["any"] else None)
        logger.warning(interrupted.describe())
        raise interrupted from None
    finally:
        if bar is not None:
            bar.close()
    if settings.num_actors and not actors_started(problem):
        logger.warning(f"{settings.searcher} does not evaluate through the problem's "
                       f"evaluate(): the {settings.num_actors} Ray actors were not used")
    save_checkpoint()
    limit, why = done(len(history)) or ("unknown", "")
    logger.info(f"stopped by {limit}: {why}")

    solution = searcher.current_solution()
    final = problem.metrics(solution)
    model = problem.make_net(solution)
    atomic_save({"config": config.to_dict(), "state_dict": model.state_dict(),
                  "metrics": final, "task": settings.task}, out / "best_model.pt")
    results = {
        "task": settings.task, "searcher": settings.searcher,
        "settings": dataclasses.asdict(settings), "config": config.to_dict(),
        "parameters": problem.solution_length, "target_metric": metric,
        "final_metrics": final, "generations": len(history),
        "evaluations": searcher.evaluations, "wall_time": elapsed,
        "stopped_by": limit,
        "popsize": getattr(searcher, "popsize", settings.popsize),
        "ray_actors_used": actors_started(problem),
        "best_fitness": max((r["best_fitness"] for r in history
                             if math.isfinite(r["best_fitness"])), default=float("nan")),
        "versions": versions(),
    }
    atomic_write_text(json.dumps(results, indent=2), out / "results.json")
    logger.info(f"done: {metric} = {final.get(metric, float('nan')):.4g} after "
                f"{results['evaluations']:,} forward-equivalents in {elapsed:.1f} s -> {out}")
    return results


class _ProgressBar:
    """A tqdm bar on stderr: percent of the budget (the furthest limit), ETA, generation,
    forward-equivalents and the last held-out target metric."""

    def __init__(self, settings: RunSettings, generation: int, evaluations: int,
                 elapsed: float):
        from tqdm import tqdm

        self.settings = settings
        self.held = ""
        try:  # a terminal that reports no size (0 x 0: some ptys) would hide the bar
            width, height = os.get_terminal_size(sys.stderr.fileno())
        except (OSError, ValueError, AttributeError):
            width = height = 0
        self.bar = tqdm(total=100.0, initial=self._percent(generation, evaluations, elapsed),
                        desc=f"{settings.task}/{settings.searcher}", file=sys.stderr,
                        ncols=width or 100, nrows=height or 24, leave=True, smoothing=0.1,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| "
                                   "[{elapsed}<{remaining}{postfix}]")

    def _percent(self, generation: int, evaluations: int, elapsed: float) -> float:
        s = self.settings
        parts = [generation / s.generations if s.generations else 0.0,
                 evaluations / s.max_evaluations if s.max_evaluations else 0.0,
                 elapsed / s.max_seconds if s.max_seconds else 0.0]
        return 100.0 * min(1.0, max(parts))

    def update(self, generation: int, evaluations: int, elapsed: float,
               value: float | None, metric: str) -> None:
        if value is not None:
            self.held = f", {metric} {value:.4g}"
        self.bar.set_postfix_str(f"gen {generation:,}, {evaluations:,} fwd-eq{self.held}",
                                 refresh=False)
        self.bar.update(self._percent(generation, evaluations, elapsed) - self.bar.n)

    def close(self) -> None:
        self.bar.close()
