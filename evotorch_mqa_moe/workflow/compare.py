"""Compare searchers on one task under one budget, over several seeds.

:func:`compare` runs every searcher x seed with :func:`~evotorch_mqa_moe.run.run`
into ``out/<searcher>/seed<k>/`` and then writes, into ``out``:

* ``results.csv``: one row per run (task, searcher, seed, final held-out target
  metric, evaluations (forward-equivalents), wall time, evaluations and wall
  time to reach the target (NaN if never reached), parameters, popsize, and
  which limit stopped the run);
* ``summary.md``: a table with one row per searcher (median [min-max] of the
  final metric, median evaluations / wall time to target over the seeds that
  reached it, how many did), the command line, the machine and the date;
* ``best_fitness_vs_evaluations.png``, ``best_fitness_vs_wall_time.png``,
  ``<metric>_vs_evaluations.png``, ``<metric>_vs_wall_time.png``: titled with the
  task and the budget; one thin line per run (seed), one colour and marker per
  searcher, the searcher's median in bold (the legend says so); when every value is
  the same (an all-zero accuracy) the searchers are offset a little so none hides
  another (:func:`comparison_figure`).

**Equal budgets.** Every run stops at the first of ``max_evals``
forward-equivalents and ``max_seconds`` of search wall time it reaches (give
one or both; a run may overshoot by less than one generation). Cost is counted
in forward-equivalents: one forward pass of one individual on one task batch is
1 and a backward pass 2 more, so an evolutionary searcher spends ``popsize`` per
generation and one ``adam`` step costs 3. The tables report both evaluations
and wall time, so a comparison at equal evaluations can be read at equal time
too (``max_seconds`` makes wall time the budget; it depends on the machine).

**Resuming.** A run whose folder already holds ``checkpoint.pt`` is resumed
rather than restarted, so an interrupted comparison continues where it stopped
when called again with the same arguments; finished runs are only re-read (a
larger ``budget_evals`` extends them). A checkpoint written with other settings
(popsize, stdev, model, ...) is an error: use a fresh ``out``.

**Time to target.** Held-out metrics are computed every ``eval_every``
generations (and at the end), so evaluations and wall time to target have that
resolution. The default target is ``chance + 0.9 (ceiling - chance)`` of the
task's target metric when the task offers ``chance()`` / ``ceiling()``
(``neg_<m>`` metrics use ``-chance()[m]`` / ``-ceiling()[m]``); for an episodic
task with a ``max_steps`` return limit (cartpole) it is ``0.9 x max_steps``;
otherwise give ``target`` or time-to-target is left out (NaN).
"""

from __future__ import annotations

import datetime
import math
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from loguru import logger

from evotorch_mqa_moe._internal.files import atomic_to_csv, atomic_write_text
from evotorch_mqa_moe._internal.validate import check_float, check_int
from evotorch_mqa_moe.searchers import check_loss_fitness, get_spec, supports_gradients

from .loggers import check_loggers, open_loggers
from .run import run
from .settings import RunSettings, versions

__all__ = ["compare", "default_target", "time_to_target", "summarize", "plot_runs",
           "comparison_figure", "RESULT_COLUMNS"]

RESULT_COLUMNS = ["task", "searcher", "seed", "target_metric", "final_metric", "evaluations",
                  "wall_time", "total_time", "evals_to_target", "time_to_target", "parameters",
                  "popsize", "stopped_by"]
TARGET_FRACTION = 0.9


def _metric_bound(values: dict[str, Any] | None, metric: str) -> float | None:
    """``values[metric]``, or ``-values[m]`` for ``metric == "neg_" + m``; None if unknown."""
    if not values:
        return None
    if values.get(metric) is not None:
        return float(values[metric])
    if metric.startswith("neg_") and values.get(metric[4:]) is not None:
        return -float(values[metric[4:]])
    return None


def default_target(task: Any) -> float | None:
    """``chance + 0.9 (ceiling - chance)`` of ``task.target_metric``, or None if unknown.

    Uses ``task.chance()`` / ``task.ceiling()`` when the task offers them; an
    episodic task with a return limit ``max_steps`` and target metric
    ``mean_return`` (cartpole) gets ``0.9 x max_steps``.
    """
    metric = task.target_metric
    if callable(getattr(task, "chance", None)) and callable(getattr(task, "ceiling", None)):
        chance = _metric_bound(task.chance(), metric)
        ceiling = _metric_bound(task.ceiling(), metric)
        if chance is not None and ceiling is not None:
            return chance + TARGET_FRACTION * (ceiling - chance)
        return None
    if metric == "mean_return" and isinstance(getattr(task, "max_steps", None), int):
        return TARGET_FRACTION * task.max_steps
    return None


def time_to_target(history: Any, metric: str, target: float | None) -> tuple[float, float]:
    """(evaluations, wall time) at the first held-out evaluation with ``metric >= target``.

    ``history`` is a run's ``history.csv`` as a DataFrame; (NaN, NaN) when the
    target is None, the metric was never computed, or never reached.
    """
    if target is None or metric not in history.columns:
        return math.nan, math.nan
    hit = history[history[metric] >= target]
    if hit.empty:
        return math.nan, math.nan
    first = hit.iloc[0]
    return float(first["evaluations"]), float(first["wall_time"])


def _validate(task_name: str, searchers: Sequence[str], seeds: int, max_evals: int | None,
              max_seconds: float | None, popsize: int | None,
              task_options: dict[str, Any]) -> Any:
    from evotorch_mqa_moe.problems import make_task, task_names

    if task_name not in task_names():
        raise ValueError(f"unknown task {task_name!r}; known: {', '.join(task_names())}")
    if isinstance(searchers, str):
        raise TypeError(f"searchers must be a sequence of names, got the string {searchers!r}")
    if not searchers:
        raise ValueError("searchers must name at least one searcher")
    if len(set(searchers)) != len(searchers):
        raise ValueError(f"searchers must not repeat a name, got {list(searchers)!r}")
    specs = [get_spec(name) for name in searchers]  # ValueError naming the known ones
    check_int("popsize", popsize, none_ok=True)
    for spec in specs:
        if popsize is not None and popsize < spec.min_popsize:
            raise ValueError(f"popsize {popsize} is too small for {spec.name} "
                             f"(needs >= {spec.min_popsize})")
    check_int("seeds", seeds)
    check_int("max_evals", max_evals, none_ok=True)
    check_float("max_seconds", max_seconds, none_ok=True)
    if max_evals is None and max_seconds is None:
        raise ValueError("give a budget: max_evals and/or max_seconds")
    task = make_task(task_name, **task_options)
    for spec in specs:
        if spec.needs_gradient and not supports_gradients(task):
            raise ValueError(f"{spec.name} needs a supervised task (sample + loss) for its "
                             f"gradients; {task_name!r} is not one: leave {spec.name} out of "
                             "the searchers")
        if spec.needs_gradient:
            check_loss_fitness(spec.name, task)  # fitness="metric": before any run starts
    return task


def compare(task: str, searchers: Sequence[str], *, seeds: int = 3, max_evals: int | None = None,
            max_seconds: float | None = None, out: str | Path, popsize: int | None = None,
            device: str = "cpu",
            stdev: float | None = None, target: float | None = None,
            task_options: dict[str, Any] | None = None, model: dict[str, Any] | None = None,
            eval_every: int = 10, searcher_options: dict[str, dict[str, Any]] | None = None,
            command: str | None = None, budget_evals: int | None = None,
            dtype: str = "float32", loggers: Sequence[str] = (), num_actors: int = 0,
            num_gpus_per_actor: float | None = None, ray_address: str | None = None,
            init: str | Path | None = None) -> Any:
    """Run each searcher with seeds ``0..seeds-1`` on ``task`` under one budget.

    Args:
        task: a task name (``evotorch_mqa_moe.problems.task_names()``).
        searchers: names from :data:`~evotorch_mqa_moe.searchers.SEARCHERS`.
        seeds: runs per searcher, with seeds ``0..seeds-1``.
        max_evals: forward-equivalents per run (see the module doc).
        max_seconds: search wall time per run, in seconds. Give ``max_evals``,
            ``max_seconds`` or both; a run stops at the first reached.
        out: output folder; run ``k`` of searcher ``s`` goes to ``out/s/seed<k>``.
        popsize: one population size for all searchers (None: each its default).
        device, stdev, task_options, model, eval_every: as in
            :class:`~evotorch_mqa_moe.run.RunSettings` (``checkpoint_every`` =
            ``eval_every``).
        target: held-out target for time-to-target (default :func:`default_target`).
        searcher_options: per-searcher constructor overrides, ``{name: {...}}``.
        command: the command line recorded in ``summary.md`` (default ``sys.argv``).
        budget_evals: the former name of ``max_evals``.
        dtype: the forward pass's dtype (``RunSettings.dtype``), e.g. ``"bfloat16"``.
        loggers: EvoTorch loggers for every run, by name
            (:data:`~evotorch_mqa_moe.loggers.LOGGERS`): one logger (and one MLflow /
            W&B / Neptune run, named ``TASK-SEARCHER-seedK``) per run.
        num_actors, num_gpus_per_actor, ray_address: Ray actors for every run (as in
            :class:`~evotorch_mqa_moe.run.RunSettings`).
        init: every run starts from the weights in this model file or checkpoint
            (``RunSettings.init``).

    Returns:
        The ``results.csv`` table as a pandas DataFrame (one row per run).

    Raises:
        ValueError / TypeError: bad arguments (checked before any run starts), or a
            run folder holding a checkpoint of other settings.
    """
    import pandas as pd

    task_options = dict(task_options or {})
    model = dict(model or {})
    searcher_options = dict(searcher_options or {})
    searchers = list(searchers) if not isinstance(searchers, str) else searchers
    if budget_evals is not None:
        if max_evals is not None:
            raise ValueError("give max_evals or its former name budget_evals, not both")
        max_evals = budget_evals
    task_obj = _validate(task, searchers, seeds, max_evals, max_seconds, popsize, task_options)
    loggers = list(loggers)
    check_loggers(loggers)  # unknown names, missing packages: before any run
    unknown = sorted(set(searcher_options) - set(searchers))
    if unknown:
        raise ValueError(f"searcher_options names searchers not compared: {unknown}")
    metric = task_obj.target_metric
    if target is None:
        target = default_target(task_obj)
        if target is None:
            logger.warning(f"{task}: no chance/ceiling for {metric}; give a target for "
                           "time-to-target (left out)")
    else:
        target = check_float("target", target, None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    rows: list[dict[str, Any]] = []
    histories: dict[tuple[str, int], Any] = {}
    total = len(searchers) * seeds
    for i, name in enumerate(searchers):
        for seed in range(seeds):
            settings = RunSettings(
                task=task, searcher=name, generations=None, max_evaluations=max_evals,
                max_seconds=max_seconds, popsize=popsize, seed=seed, device=device, stdev=stdev,
                task_options=task_options, model=model,
                searcher_options=dict(searcher_options.get(name, {})),
                eval_every=eval_every, checkpoint_every=eval_every, dtype=dtype,
                num_actors=num_actors, num_gpus_per_actor=num_gpus_per_actor,
                ray_address=ray_address, init=None if init is None else str(init))
            folder = out / name / f"seed{seed}"
            resume = (folder / "checkpoint.pt").is_file()
            logger.info(f"compare {task}: run {i * seeds + seed + 1}/{total}: {name} seed {seed}"
                        f"{' (resuming)' if resume else ''} -> {folder}")
            with open_loggers(loggers, run_name=f"{task}-{name}-seed{seed}",
                              out=folder) as callbacks:
                # ~20 log lines per run, whatever a generation costs (adam: one network)
                results = run(settings, folder, resume=resume, callbacks=callbacks,
                              log_lines=20)
            history = pd.read_csv(folder / "history.csv")
            histories[(name, seed)] = history
            evals_hit, time_hit = time_to_target(history, metric, target)
            rows.append({
                "task": task, "searcher": name, "seed": seed, "target_metric": metric,
                "final_metric": float(results["final_metrics"].get(metric, math.nan)),
                "evaluations": int(results["evaluations"]),
                "wall_time": float(results["wall_time"]),
                "total_time": float(results.get("total_time", math.nan)),
                "evals_to_target": evals_hit, "time_to_target": time_hit,
                "parameters": int(results["parameters"]),
                "popsize": results.get("popsize") or math.nan,
                "stopped_by": results.get("stopped_by", ""),
            })
    table = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    atomic_to_csv(table, out / "results.csv")
    if command is None:
        command = " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]])
    summary = summarize(table, metric=metric, target=target, max_evals=max_evals,
                        max_seconds=max_seconds, command=command)
    atomic_write_text(summary, out / "summary.md")
    plots = plot_runs(histories, metric=metric, out=out, target=target, task=task,
                      budget=describe_budget(max_evals, max_seconds))
    logger.info(f"compare {task}: {len(table)} runs; results.csv, summary.md and "
                f"{len(plots)} plots in {out}")
    return table


def _fmt(x: float, digits: int = 4) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}g}"


def machine() -> str:
    """One line: platform, CPU count, Python / torch / EvoTorch versions."""
    v = versions()
    return (f"{v['platform']}, {os.cpu_count()} CPUs, Python {v['python']}, torch {v['torch']}, "
            f"EvoTorch {v['evotorch']}, evotorch_mqa_moe {v['evotorch_mqa_moe']}")


def describe_budget(max_evals: int | None, max_seconds: float | None) -> str:
    """``"60,000 forward-equivalents"``, ``"30 s"`` or both joined by "or"."""
    parts = ([f"{max_evals:,} forward-equivalents"] if max_evals is not None else []) + (
        [f"{max_seconds:g} s of search wall time"] if max_seconds is not None else [])
    return " or ".join(parts) or "none"


def _total_median(group: Any) -> str:
    """The median total time of a group, '-' for tables written before it was recorded."""
    if "total_time" not in group or group["total_time"].isna().all():
        return "-"
    return _fmt(group["total_time"].median(), 3)


def summarize(table: Any, *, metric: str, target: float | None, max_evals: int | None = None,
              max_seconds: float | None = None, command: str = "") -> str:
    """The markdown of ``summary.md`` for a ``results.csv`` table."""
    task = table["task"].iloc[0] if len(table) else "?"
    lines = [f"# {task}: searchers compared", "",
             f"Budget per run: {describe_budget(max_evals, max_seconds)}, whichever comes "
             "first (one forward of one individual on one task batch = 1 forward-equivalent, "
             "a backward 2 more: one adam step = 3). "
             f"Held-out target metric: `{metric}`"
             + (f", target {_fmt(target)}." if target is not None
                else "; no target (time-to-target left out)."), "",
             f"| searcher | runs | popsize | final {metric}: median [min-max] | "
             "evaluations (forward-equivalents) | wall time (s): search / total | "
             "reached target | median evals to target | median time to target (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, g in table.groupby("searcher", sort=False):
        final = g["final_metric"]
        hit = g["evals_to_target"].notna()
        popsizes = ", ".join(str(int(p)) for p in sorted(g["popsize"].dropna().unique()))
        lines.append(
            f"| {name} | {len(g)} | {popsizes} | {_fmt(final.median())} "
            f"[{_fmt(final.min())}-{_fmt(final.max())}] | {_fmt(g['evaluations'].median(), 6)} | "
            f"{_fmt(g['wall_time'].median(), 3)} / {_total_median(g)} | "
            f"{int(hit.sum()) if target is not None else '-'}/{len(g)} | "
            f"{_fmt(g.loc[hit, 'evals_to_target'].median(), 6) if hit.any() else '-'} | "
            f"{_fmt(g.loc[hit, 'time_to_target'].median(), 3) if hit.any() else '-'} |")
    lines += ["", "Medians of evaluations / time to target are over the seeds that reached it; "
              "held-out metrics are computed every `eval_every` generations. Search time "
              "counts the searcher's steps (what `max_seconds` limits); total time adds "
              "held-out evaluation, checkpoints and start-up of each run.", "",
              f"Command: `{command}`", "", f"Machine: {machine()}", "",
              f"Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}", ""]
    return "\n".join(lines)


def _median_curve(curves: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Median of step-free curves, interpolated on a common x grid inside all of them."""
    lo = max(float(x[0]) for x, _ in curves)
    hi = min(float(x[-1]) for x, _ in curves)
    if not hi > lo:
        return np.array([]), np.array([])
    grid = np.linspace(lo, hi, 200)
    ys = np.stack([np.interp(grid, x, y) for x, y in curves])
    return grid, np.median(ys, axis=0)


SEEDS_LEGEND = "thin lines: one run per seed"
MEDIAN_LEGEND = "bold line: median over seeds"
_MARKERS = "osD^v<>ph*"
_FLAT_OFFSET = 0.02  # vertical spread of tied searchers, as a share of the axis (or of 1)


def comparison_figure(histories: dict[tuple[str, int], Any], column: str, xcol: str, *,
                      ylabel: str, xlabel: str, title: str,
                      target: float | None = None) -> Any:
    """One comparison plot as a matplotlib ``Figure``: ``column`` against ``xcol``.

    One thin line per run (seed), one colour and one marker shape per searcher, the
    searcher's median over its runs in bold (a single run is its own median). When
    every value in the plot is the same (e.g. exact accuracy 0 everywhere), the
    searchers' lines are spread vertically by a few percent, so that none hides
    another, and a note under the title says so; markers are staggered along x so
    that searchers tied on a stretch stay visible too.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display; keeps a backend the caller chose
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    names = list(dict.fromkeys(name for name, _ in histories))
    curves: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {n: [] for n in names}
    for (name, _seed), h in histories.items():
        if column not in h.columns or xcol not in h.columns:
            continue
        d = h[[xcol, column]].dropna()
        d = d[np.isfinite(d[column])]
        if not d.empty:
            curves[name].append((d[xcol].to_numpy(float), d[column].to_numpy(float)))
    values = [y for runs in curves.values() for _, y in runs]
    flat = bool(values) and all(np.all(y == values[0][0]) for y in values)
    drawn = [n for n in names if curves[n]]
    offsets = {n: 0.0 for n in names}
    if flat and len(drawn) > 1:
        scale = abs(values[0][0]) or 1.0
        offsets = {n: (i - (len(drawn) - 1) / 2) * _FLAT_OFFSET * scale
                   for i, n in enumerate(drawn)}

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colours = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}
    handles = []
    for i, name in enumerate(names):
        marker = _MARKERS[i % len(_MARKERS)]
        runs = [(x, y + offsets[name]) for x, y in curves[name]]
        for x, y in runs:
            ax.plot(x, y, color=colours[name], lw=0.8, alpha=0.45)
        if len(runs) > 1:
            gx, gy = _median_curve(runs)
        else:
            gx, gy = runs[0] if runs else (np.array([]), np.array([]))
        if len(gx):
            every = max(1, len(gx) // 8)  # ~8 markers, each searcher's shifted along x
            ax.plot(gx, gy, color=colours[name], lw=2.5, marker=marker, ms=5,
                    markevery=((i * every) // len(names), every))
        handles.append(Line2D([], [], color=colours[name], lw=2.5, marker=marker, ms=5,
                              label=name))
    handles += [Line2D([], [], color="grey", lw=0.8, alpha=0.6, label=SEEDS_LEGEND),
                Line2D([], [], color="grey", lw=2.5, label=MEDIAN_LEGEND)]
    if column != "best_fitness" and target is not None:
        ax.axhline(target, color="grey", ls="--", lw=1)
        handles.append(Line2D([], [], color="grey", ls="--", lw=1,
                              label=f"target {_fmt(target)}"))
    if flat and len(drawn) > 1:  # one true value: say so, and tick only it
        value = float(values[0][0])
        title += (f"\n(every run at {_fmt(value)}; searchers drawn {_FLAT_OFFSET * 100:g}% "
                  "apart so none hides another)")
        ax.set_yticks([value])
        spread = max(abs(o) for o in offsets.values())
        ax.set_ylim(value - 2 * spread, value + 2 * spread)
    ax.set_title(title, fontsize="medium")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize="small")
    fig.tight_layout()
    return fig


def plot_runs(histories: dict[tuple[str, int], Any], *, metric: str, out: str | Path,
              target: float | None = None, task: str | None = None,
              budget: str | None = None) -> list[Path]:
    """PNG plots of best fitness and held-out ``metric`` against evaluations and wall time.

    ``histories`` maps ``(searcher, seed)`` to that run's history DataFrame; each plot
    is a :func:`comparison_figure` titled with ``task`` and ``budget`` (e.g.
    ``describe_budget(...)``), which are also stored in the PNG's metadata
    (``Title``, ``Description``). Returns the paths.
    """
    import matplotlib.pyplot as plt

    out = Path(out)
    paths = []
    for column, label in (("best_fitness", "best fitness in the population"),
                          (metric, f"held-out {metric}")):
        for xcol, xlabel in (("evaluations", "evaluations (forward-equivalents)"),
                             ("wall_time", "wall time (s)")):
            title = (f"{task or '?'}: {label}"
                     + (f"\nbudget per run: {budget}" if budget else ""))
            fig = comparison_figure(histories, column, xcol, ylabel=label, xlabel=xlabel,
                                    title=title, target=target)
            path = out / f"{'best_fitness' if column == 'best_fitness' else metric}_vs_{xcol}.png"
            fig.savefig(path, dpi=110, metadata={
                "Title": title.replace("\n", "; "),
                "Description": f"{SEEDS_LEGEND}; {MEDIAN_LEGEND}; searchers: "
                               f"{', '.join(dict.fromkeys(n for n, _ in histories))}"})
            plt.close(fig)
            paths.append(path)
    return paths
