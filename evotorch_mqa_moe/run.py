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
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from loguru import logger

from .config import TransformerConfig
from .model import MQAMoETransformer
from .problem import TransformerProblem
from .searchers import get_spec, make_searcher

__all__ = ["RunSettings", "run", "load_model", "RunInterrupted"]

CHECKPOINT_VERSION = 2  # 2: searcher state is the protocol's state_dict()


class RunInterrupted(KeyboardInterrupt):
    """The run was stopped (Ctrl-C / SIGTERM) after saving a checkpoint."""


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
        stdev: initial search / mutation stdev (``None``: the searcher's default).
        task_options, model, searcher_options: passed to the task, to
            ``TransformerConfig.replace`` and to the searcher's builder (e.g.
            ``{"lr": 1e-3}`` for ``adam``).
        eval_every: generations between held-out evaluations.
        checkpoint_every: generations between checkpoints.
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

    def __post_init__(self) -> None:
        get_spec(self.searcher)  # ValueError naming the known searchers
        if self.generations is None and self.max_evaluations is None and self.max_seconds is None:
            raise ValueError("give a limit: generations, max_evaluations or max_seconds "
                             "(or several)")
        if self.max_seconds is not None and (
                isinstance(self.max_seconds, bool) or not isinstance(self.max_seconds, int | float)
                or not math.isfinite(self.max_seconds) or self.max_seconds <= 0):
            raise ValueError(f"max_seconds must be a positive finite number, "
                             f"got {self.max_seconds!r}")
        for name in ("generations", "max_evaluations"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("eval_every", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")

    def identity(self) -> dict[str, Any]:
        """The settings a checkpoint must share to be resumed (budgets may grow)."""
        d = dataclasses.asdict(self)
        for key in ("generations", "max_evaluations", "max_seconds", "eval_every",
                    "checkpoint_every", "device"):
            d.pop(key)
        return d


def versions() -> dict[str, str]:
    import evotorch
    import numpy

    from . import __version__

    return {"python": platform.python_version(), "torch": torch.__version__,
            "evotorch": evotorch.__version__, "numpy": numpy.__version__,
            "evotorch_mqa_moe": __version__, "platform": platform.platform()}


def _build(settings: RunSettings):
    from .problems import make_task

    task = make_task(settings.task, **settings.task_options)
    config = task.default_config()
    if settings.model:
        config = config.replace(**settings.model)
    problem = TransformerProblem(task, config, seed=settings.seed, device=settings.device)
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


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_write(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_history(history: list[dict], path: Path) -> None:
    import pandas as pd

    tmp = path.with_name(path.name + ".tmp")
    pd.DataFrame(history).to_csv(tmp, index=False)
    os.replace(tmp, path)


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


def run(settings: RunSettings, out: str | Path, *, resume: bool = False) -> dict[str, Any]:
    """Run ``settings`` writing to folder ``out``; returns what ``results.json`` holds.

    Raises:
        FileNotFoundError: ``resume`` without ``out/checkpoint.pt``.
        ValueError: the checkpoint belongs to other settings (task, model, searcher, seed).
        RunInterrupted: Ctrl-C / SIGTERM, after the checkpoint was saved.
    """
    out = Path(out)
    checkpoint_path = out / "checkpoint.pt"
    if resume and not checkpoint_path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume at {checkpoint_path}")
    out.mkdir(parents=True, exist_ok=True)
    task, config, problem, searcher = _build(settings)
    history: list[dict[str, Any]] = []
    elapsed = 0.0
    if resume:
        ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        if ckpt.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"{checkpoint_path} is not a checkpoint of this version")
        if ckpt["settings"] != settings.identity() or ckpt["config"] != config.to_dict():
            theirs = {k: v for k, v in ckpt["settings"].items() if settings.identity()[k] != v}
            raise ValueError(f"{checkpoint_path} was written by other settings: {theirs or 'model'}"
                             f" (this run: task={settings.task!r}, searcher={settings.searcher!r})")
        searcher.load_state_dict(ckpt["searcher"])
        history, elapsed = ckpt["history"], ckpt["elapsed"]
        logger.info(f"resumed {settings.task}/{settings.searcher} at generation {len(history)}")

    def save_checkpoint() -> None:
        _atomic_save({"version": CHECKPOINT_VERSION, "settings": settings.identity(),
                      "config": config.to_dict(), "searcher": searcher.state_dict(),
                      "history": history,
                      "elapsed": elapsed}, checkpoint_path)
        _write_history(history, out / "history.csv")

    def done(gen: int) -> tuple[str, str] | None:
        return _stop_reason(settings, gen, searcher.evaluations, elapsed)

    metric = task.target_metric
    logger.info(f"{settings.task} with {settings.searcher}: {problem.solution_length:,} "
                f"parameters, device {settings.device}, output {out}")
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
                if gen % settings.eval_every == 0 or last:
                    rate = row["evaluations"] / max(elapsed, 1e-9)
                    held = f" | {metric} {row[metric]:.4g}" if metric in row else ""
                    logger.info(f"gen {gen} | evals {row['evaluations']:,} | best "
                                f"{row['best_fitness']:.4g} | mean {row['mean_fitness']:.4g}"
                                f"{held} | {rate:,.0f} evals/s")
                if gen % settings.checkpoint_every == 0 or stop["signal"] is not None:
                    save_checkpoint()
                if stop["signal"] is not None:
                    logger.warning(f"interrupted at generation {gen}; checkpoint saved to "
                                   f"{checkpoint_path}; continue with resume")
                    raise RunInterrupted(f"signal {stop['signal']}")
    except RunInterrupted:
        raise
    except KeyboardInterrupt as exc:
        # Mid-step: the searcher may be half updated, so its state is not saved.
        logger.warning(f"interrupted during a generation; the last periodic checkpoint "
                       f"({checkpoint_path}) is kept; continue with resume")
        raise RunInterrupted(str(exc)) from None
    save_checkpoint()
    limit, why = done(len(history)) or ("unknown", "")
    logger.info(f"stopped by {limit}: {why}")

    solution = searcher.current_solution()
    final = problem.metrics(solution)
    model = problem.make_net(solution)
    _atomic_save({"config": config.to_dict(), "state_dict": model.state_dict(),
                  "metrics": final, "task": settings.task}, out / "best_model.pt")
    results = {
        "task": settings.task, "searcher": settings.searcher,
        "settings": dataclasses.asdict(settings), "config": config.to_dict(),
        "parameters": problem.solution_length, "target_metric": metric,
        "final_metrics": final, "generations": len(history),
        "evaluations": searcher.evaluations, "wall_time": elapsed,
        "stopped_by": limit,
        "popsize": getattr(searcher, "popsize", settings.popsize),
        "best_fitness": max((r["best_fitness"] for r in history
                             if math.isfinite(r["best_fitness"])), default=float("nan")),
        "versions": versions(),
    }
    _atomic_write(json.dumps(results, indent=2), out / "results.json")
    logger.info(f"done: {metric} = {final.get(metric, float('nan')):.4g} after "
                f"{results['evaluations']:,} forward-equivalents in {elapsed:.1f} s -> {out}")
    return results
