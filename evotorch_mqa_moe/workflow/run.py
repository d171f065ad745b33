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
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from loguru import logger

from evotorch_mqa_moe._internal.evotorch_compat import actors_started, sync_logger_step
from evotorch_mqa_moe._internal.files import (
    atomic_save,
    atomic_to_csv,
    atomic_write_text,
    remove_stale_temporaries,
)
from evotorch_mqa_moe.model import TransformerConfig
from evotorch_mqa_moe.problem import TransformerProblem
from evotorch_mqa_moe.searchers import get_spec, make_searcher

from .checkpoint import (
    CHECKPOINT_VERSION,
    RUN_FILES,
    _check_finite,
    _check_like_fresh,
    _check_loaded,
    _check_resumable,
    _load_checkpoint,
    checksum,
    load_model,
)
from .settings import RunSettings, resolved_settings, versions

__all__ = ["RunSettings", "run", "load_model", "RunInterrupted"]



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
    from evotorch_mqa_moe.problems import make_task

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
    init = None
    if settings.init is not None:
        from .initial import load_initial_solution

        init = load_initial_solution(settings.init, config)  # ValueError naming the field
    searcher = make_searcher(settings.searcher, problem, popsize=settings.popsize,
                             stdev=settings.stdev, init=init, **settings.searcher_options)
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
        progress: bool = False, log_lines: int | None = None) -> dict[str, Any]:
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
        log_lines: about this many progress log lines over the budget (one each time
            another ``1/log_lines`` of it is spent, on a held-out generation), so that
            cheap generations (adam: one network) do not flood the log; ``None``: one
            every ``eval_every`` generations.

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
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other (--resume continues the "
                         "run in the folder, --overwrite replaces it): give one")
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
    for tmp in remove_stale_temporaries(out):  # left by a writer that was killed
        logger.info(f"removed {tmp.name}, left by an interrupted write")
    task, config, problem, searcher = _build(settings)
    try:
        return _execute(settings, out, task, config, problem, searcher, resume=resume,
                        callbacks=list(callbacks), progress=progress, log_lines=log_lines)
    finally:
        if actors_started(problem):
            problem.kill_actors()


def _execute(settings: RunSettings, out: Path, task: Any, config: TransformerConfig,
             problem: TransformerProblem, searcher: Any, *, resume: bool,
             callbacks: list[Callable[[dict[str, Any]], Any]],
             progress: bool, log_lines: int | None) -> dict[str, Any]:
    """The body of :func:`run` once the searcher is built."""
    checkpoint_path = out / "checkpoint.pt"
    history: list[dict[str, Any]] = []
    elapsed, before, started = 0.0, 0.0, time.perf_counter()
    resolved = resolved_settings(settings)

    def total_time() -> float:  # clock time of every invocation of this run so far
        return before + time.perf_counter() - started
    if resume:
        ckpt = _load_checkpoint(checkpoint_path)
        _check_resumable(checkpoint_path, ckpt, settings, config)
        _check_like_fresh(checkpoint_path, ckpt["searcher"], searcher.state_dict())
        try:
            searcher.load_state_dict(ckpt["searcher"])
        except ValueError as exc:  # restore's own checks name the field
            raise ValueError(f"{checkpoint_path}: {exc}") from None
        except (KeyError, TypeError, RuntimeError, IndexError, AttributeError) as exc:
            raise ValueError(f"{checkpoint_path}: the searcher state does not fit this "
                             f"searcher ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        _check_finite(checkpoint_path, searcher)
        _check_loaded(checkpoint_path, ckpt, searcher)
        history, elapsed = ckpt["history"], float(ckpt["elapsed"])
        before = float(ckpt.get("total_time", elapsed))
        logger.info(f"resumed {settings.task}/{settings.searcher} at generation {len(history)}")
    saved = {"any": checkpoint_path.is_file()}
    init_metrics = None
    if settings.init is not None:  # the model the run starts from, on the held-out set
        init_metrics = problem.metrics(problem.initial_solution)
        logger.info(f"init from {settings.init}: {task.target_metric} = "
                    f"{init_metrics.get(task.target_metric, float('nan')):.4g}")

    def save_checkpoint() -> None:
        ckpt = {"version": CHECKPOINT_VERSION, "settings": settings.identity(),
                "resolved": resolved, "config": config.to_dict(),
                "searcher": searcher.state_dict(),
                "solution": searcher.current_solution().detach().cpu(),
                "history": history, "elapsed": elapsed, "total_time": total_time()}
        ckpt["checksum"] = checksum(ckpt)
        atomic_save(ckpt, checkpoint_path)
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
    next_log = 0.0  # the budget fraction at which the next log line is due (log_lines)
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
                spent = budget_fraction(settings, gen, row["evaluations"], elapsed)
                if (gen % settings.eval_every == 0 or last) and (
                        log_lines is None or last or spent >= next_log):
                    if log_lines is not None:
                        next_log = (math.floor(spent * log_lines) + 1) / log_lines
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
        "total_time": total_time(),  # wall_time plus held-out evaluation, checkpoints, ...
        "stopped_by": limit,
        "popsize": getattr(searcher, "popsize", settings.popsize),
        "ray_actors_used": actors_started(problem),
        "init_metrics": init_metrics,
        "best_fitness": max((r["best_fitness"] for r in history
                             if math.isfinite(r["best_fitness"])), default=float("nan")),
        "versions": versions(),
    }
    atomic_write_text(json.dumps(results, indent=2), out / "results.json")
    logger.info(f"done: {metric} = {final.get(metric, float('nan')):.4g} after "
                f"{results['evaluations']:,} forward-equivalents in {elapsed:.1f} s of search "
                f"({results['total_time']:.1f} s in all) -> {out}")
    return results


def budget_fraction(settings: RunSettings, generation: int, evaluations: int,
                    elapsed: float) -> float:
    """The share of the budget spent, 0..1: the furthest of the run's limits."""
    s = settings
    parts = [generation / s.generations if s.generations else 0.0,
             evaluations / s.max_evaluations if s.max_evaluations else 0.0,
             elapsed / s.max_seconds if s.max_seconds else 0.0]
    return min(1.0, max(parts))


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
        return 100.0 * budget_fraction(self.settings, generation, evaluations, elapsed)

    def update(self, generation: int, evaluations: int, elapsed: float,
               value: float | None, metric: str) -> None:
        if value is not None:
            self.held = f", {metric} {value:.4g}"
        self.bar.set_postfix_str(f"gen {generation:,}, {evaluations:,} fwd-eq{self.held}",
                                 refresh=False)
        self.bar.update(self._percent(generation, evaluations, elapsed) - self.bar.n)

    def close(self) -> None:
        self.bar.close()
