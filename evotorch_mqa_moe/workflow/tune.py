"""Hyperparameter tuning with Optuna: a study in a database, shared by any number of workers.

:func:`tune` searches the ``search_space`` that a searcher declares in its registry
entry (:class:`~evotorch_mqa_moe.searchers.SearcherSpec`): ``popsize``, ``stdev``
and builder options, log-uniform where the space says ``"log"``. A trial runs the
searcher on the task with seeds ``0..seeds-1`` for ``budget_evals``
forward-equivalents each; its value is the mean held-out target metric (higher is
better). The budget is spent in ``checkpoints`` pieces (``run(..., resume=True)``
with a growing ``max_evaluations``, so the pieces end exactly as one uninterrupted
run would); the mean metric after each piece is reported to Optuna, and the median
pruner stops trials that lag the median of earlier trials at the same point.

The study lives in ``storage`` (default ``sqlite:///OUT/study.db``; any URL Optuna
accepts, e.g. PostgreSQL for many machines) under ``study`` (default
``TASK-SEARCHER``). Calling :func:`tune` again adds ``trials`` more trials to the
same study, and several processes given the same storage and study share it: each
runs its ``trials`` trials, the sampler sees all of them.

A trial that raises, or whose metric is NaN, is recorded as failed (its message in
the trial's ``fail_reason`` user attribute) and the study goes on.

Files written to ``out``:

* ``best.json``: the best completed trial as ``{"task", "searcher", "popsize",
  "stdev", "searcher_options", "task_options", "model", "metric", "value"}`` (plus
  ``study``, ``trial``, ``budget_evals``, ``seeds``); ``run --config`` and
  ``compare --config`` read it.
* ``trials.csv``: every trial of the study (state, value, parameters, fail reason).
* ``optimization_history.png`` and, once two trials completed,
  ``param_importances.png``.
* ``trials/<study>/<number>/seed<k>/``: each trial's run folders (``history.csv``,
  ``results.json``; the checkpoints are deleted when the trial ends).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from loguru import logger

from evotorch_mqa_moe._internal.validate import MAX_SEED, check_float, check_int, check_threads
from evotorch_mqa_moe.searchers import get_spec, supports_gradients

from .run import run
from .settings import RunSettings
from .study import GRACE_S, HEARTBEAT_S, _fail_dead_trials, _open_study
from .tune_outputs import write_outputs

__all__ = ["tune", "suggest", "trial_settings", "BEST_KEYS", "load_config", "metric_value",
           "GRACE_S", "HEARTBEAT_S"]

BEST_KEYS = ("task", "searcher", "popsize", "stdev", "searcher_options", "task_options",
             "model", "metric", "value")
"""The keys of ``best.json`` (the ``--config`` format); the settings are the first seven."""
# recorded in best.json, ignored by --config
_INFO_KEYS = ("study", "trial", "budget_evals", "seeds", "first_seed", "baseline_value")


def metric_value(metrics: Mapping[str, float], metric: str, task: str) -> float:
    """``metrics[metric]``; ``neg_NAME`` is ``-metrics[NAME]`` when the task reports only
    ``NAME`` (the study maximises, so ``neg_loss`` minimises the held-out loss: the
    signal on a plateau where the accuracies still sit at chance)."""
    if metric in metrics:
        return float(metrics[metric])
    if metric.startswith("neg_") and metric[4:] in metrics:
        return -float(metrics[metric[4:]])
    raise _UnknownMetric(f"unknown metric {metric!r} for {task}; known: {', '.join(metrics)} "
                         "(and neg_NAME for each)")


class _UnknownMetric(Exception):
    """``metric`` is not among the task's held-out metrics (stops the study)."""


def suggest(trial: Any, space: Mapping[str, tuple]) -> dict[str, Any]:
    """Ask ``trial`` (an ``optuna.Trial``) for one value per entry of a search space.

    ``("log", lo, hi)`` is log-uniform, ``("float", lo, hi)`` uniform, ``("int", lo,
    hi[, step])`` an integer in ``[lo, hi]``, ``("cat", [choices])`` categorical.
    """
    params: dict[str, Any] = {}
    for name, entry in space.items():
        kind = entry[0]
        if kind == "log":
            params[name] = trial.suggest_float(name, entry[1], entry[2], log=True)
        elif kind == "float":
            params[name] = trial.suggest_float(name, entry[1], entry[2])
        elif kind == "int":
            step = entry[3] if len(entry) > 3 else 1
            params[name] = trial.suggest_int(name, int(entry[1]), int(entry[2]), step=int(step))
        elif kind == "cat":
            params[name] = trial.suggest_categorical(name, list(entry[1]))
        else:
            raise ValueError(f"search space entry {name!r} has unknown kind {kind!r}")
    return params


def trial_settings(params: Mapping[str, Any]) -> dict[str, Any]:
    """Split suggested parameters into ``{"popsize", "stdev", "searcher_options"}``."""
    options = {k: v for k, v in params.items() if k not in ("popsize", "stdev")}
    return {"popsize": params.get("popsize"), "stdev": params.get("stdev"),
            "searcher_options": options}


def baseline_params(spec: Any, space: Mapping[str, tuple]) -> dict[str, Any] | None:
    """The searcher's default settings as parameters of ``space``, or None.

    None when a key of the space has no declared default (``SearcherSpec.defaults``,
    ``default_popsize``, ``default_stdev``) or a default lies outside its range: then
    there is no baseline trial.
    """
    known = {"popsize": spec.default_popsize, "stdev": spec.default_stdev, **spec.defaults}
    if not set(space) <= set(known):
        return None
    params = {key: known[key] for key in space}
    for key, entry in space.items():
        value = params[key]
        inside = (value in entry[1] if entry[0] == "cat"
                  else isinstance(value, int | float) and entry[1] <= value <= entry[2])
        if not inside:
            return None
    return params


def _check_metric(task_obj: Any, config: Any, metric: str, task: str, device: str) -> None:
    """ValueError naming the known metrics when ``metric`` is not one of the task's held-out
    metrics (or ``neg_NAME`` of one): found before any trial runs, from one evaluation of
    a zero network."""
    from evotorch_mqa_moe.problem import TransformerProblem

    problem = TransformerProblem(task_obj, config, seed=0, device=device)
    names = problem.metrics(torch.zeros(problem.solution_length))
    try:
        metric_value({k: 0.0 for k in names}, metric, task)
    except _UnknownMetric as exc:
        raise ValueError(str(exc)) from None


def _checkpoints(budget_evals: int, pieces: int) -> list[int]:
    marks = sorted({max(1, round(budget_evals * k / pieces)) for k in range(1, pieces + 1)})
    marks[-1] = budget_evals
    return marks


def load_config(path: str | Path) -> dict[str, Any]:
    """Read and check a ``best.json``-format file; returns its settings keys.

    Returns:
        ``{key: value}`` for the keys present among ``task``, ``searcher``,
        ``popsize``, ``stdev``, ``searcher_options``, ``task_options``, ``model``
        (``None`` values left out).

    Raises:
        ValueError: unreadable file, not a JSON object, an unknown key or a bad value
            (the message names the file and the key).
    """
    from evotorch_mqa_moe.problems import task_names

    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ValueError(f"cannot read config {str(path)!r}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"config {str(path)!r} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config {str(path)!r} must hold a JSON object, got "
                         f"{type(data).__name__}")
    unknown = sorted(set(data) - set(BEST_KEYS) - set(_INFO_KEYS))
    if unknown:
        raise ValueError(f"config {str(path)!r}: unknown keys {unknown}; known: "
                         f"{', '.join(BEST_KEYS + _INFO_KEYS)}")
    out: dict[str, Any] = {}

    def bad(key: str, want: str) -> ValueError:
        return ValueError(f"config {str(path)!r}: {key} must be {want}, got {data[key]!r}")

    for key in ("task", "searcher"):
        if data.get(key) is not None:
            if not isinstance(data[key], str):
                raise bad(key, "a string")
            out[key] = data[key]
    if "task" in out and out["task"] not in task_names():
        raise ValueError(f"config {str(path)!r}: unknown task {out['task']!r}; known: "
                         f"{', '.join(task_names())}")
    if "searcher" in out:
        try:
            get_spec(out["searcher"])
        except ValueError as exc:
            raise ValueError(f"config {str(path)!r}: {exc}") from None
    if data.get("popsize") is not None:
        try:
            out["popsize"] = check_int("popsize", data["popsize"])
        except ValueError:
            raise bad("popsize", "a positive integer or null") from None
    if data.get("stdev") is not None:
        try:
            out["stdev"] = check_float("stdev", data["stdev"])
        except ValueError:
            raise bad("stdev", "a positive number or null") from None
    for key in ("searcher_options", "task_options", "model"):
        if data.get(key) is not None:
            if not isinstance(data[key], dict) or not all(isinstance(k, str) for k in data[key]):
                raise bad(key, "an object of NAME: VALUE or null")
            out[key] = dict(data[key])
    return out


def tune(task: str, searcher: str, *, trials: int, budget_evals: int, seeds: int = 1,
         storage: str | None = None, study: str | None = None, out: str | Path,
         task_options: dict[str, Any] | None = None, model: dict[str, Any] | None = None,
         threads: int | None = None, sampler_seed: int = 0, device: str = "cpu",
         checkpoints: int = 4, space: Mapping[str, tuple] | None = None,
         eval_every: int = 10, metric: str | None = None,
         first_seed: int = 0, init: str | Path | None = None) -> dict[str, Any] | None:
    """Run ``trials`` Optuna trials of ``searcher`` on ``task``; write best.json & co to ``out``.

    Args:
        task: a task name (``evotorch_mqa_moe.problems.task_names()``).
        searcher: a name from :data:`~evotorch_mqa_moe.searchers.SEARCHERS` with a
            non-empty ``search_space``.
        trials: trials this call runs (more are added to an existing study).
        budget_evals: forward-equivalents per run (one run per seed per trial).
        seeds: runs per trial, seeds ``first_seed..first_seed+seeds-1``; the value is
            their mean metric.
        storage: an Optuna storage URL (default ``sqlite:///OUT/study.db``).
        study: the study name (default ``TASK-SEARCHER``).
        out: output folder.
        task_options, model: as in :class:`~evotorch_mqa_moe.run.RunSettings`.
        threads: ``torch.set_num_threads`` for this process (None: unchanged).
        sampler_seed: seed of the TPE sampler; with the same seed (and the same
            objective values) a fresh study suggests the same parameters.
        device: where evaluation runs.
        checkpoints: pieces the budget is spent in; the mean metric after each is
            reported to the pruner.
        space: a search space replacing the registry's (same format), e.g. a
            narrower popsize range.
        eval_every: generations between held-out evaluations inside a run.
        metric: the held-out metric to maximise (default: the task's
            ``target_metric``), e.g. ``"token_accuracy"`` where the target metric
            stays at 0 within the budget and would give the sampler no signal;
            ``neg_NAME`` maximises ``-NAME``, e.g. ``neg_loss``.
        first_seed: the first run seed. Tune on seeds that the comparison of tuned
            vs default settings will not use (e.g. 100) so that comparison is held out.
        init: every run starts from the weights in this model file or checkpoint
            (``RunSettings.init``), e.g. to tune fine-tuning from a pretrained model.

    Returns:
        The ``best.json`` dict, or None when the study has no completed trial.

    Raises:
        ValueError / TypeError: bad arguments or a storage that cannot be opened
            (before any trial runs).
    """
    import optuna

    from evotorch_mqa_moe.problems import make_task, task_names
    from evotorch_mqa_moe.searchers.registry import _check_space

    if task not in task_names():
        raise ValueError(f"unknown task {task!r}; known: {', '.join(task_names())}")
    spec = get_spec(searcher)  # ValueError naming the known searchers
    for name, value, low in (("trials", trials, 1), ("budget_evals", budget_evals, 1),
                             ("seeds", seeds, 1), ("checkpoints", checkpoints, 1)):
        check_int(name, value, low)
    check_int("sampler_seed", sampler_seed, 0, MAX_SEED)
    check_int("first_seed", first_seed, 0, MAX_SEED - seeds)
    if check_threads("threads", threads, none_ok=True) is not None:
        torch.set_num_threads(threads)
    space = dict(spec.search_space if space is None else space)
    _check_space(searcher, space)
    if not space:
        raise ValueError(f"searcher {searcher!r} declares no search_space; nothing to tune")
    task_options = dict(task_options or {})
    model = dict(model or {})
    task_obj = make_task(task, **task_options)  # bad task options fail here, not per trial
    if spec.needs_gradient and not supports_gradients(task_obj):
        raise ValueError(f"{searcher} needs a supervised task (sample + loss) for its "
                         f"gradients; {task!r} is not one")
    config = task_obj.default_config()
    if model:
        config = config.replace(**model)
    metric = metric or task_obj.target_metric
    _check_metric(task_obj, config, metric, task, device)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output folder {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create output folder {out}: "
                         f"{exc.strerror or type(exc).__name__}") from None
    storage = storage or f"sqlite:///{(out / 'study.db').resolve()}"
    study_name = study or f"{task}-{searcher}"
    study_obj = _open_study(storage, study_name, sampler_seed)
    baseline = baseline_params(spec, space)
    if baseline is not None and not study_obj.get_trials(deepcopy=False):
        # a fresh study starts from the defaults: best.json then never reports a setting
        # that did worse than them on the study's seeds, and records their value
        study_obj.enqueue_trial(baseline, user_attrs={"baseline": True}, skip_if_exists=True)
    marks = _checkpoints(budget_evals, checkpoints)
    base = {"task": task, "searcher": searcher, "task_options": task_options, "model": model,
            "budget_evals": budget_evals, "seeds": seeds, "first_seed": first_seed}

    import socket

    worker = (socket.gethostname(), os.getpid())
    _fail_dead_trials(study_obj)
    usage_error: list[str] = []
    spent = {"runs": 0.0}  # wall time inside run(): the rest is the tuner's overhead

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("worker_host", worker[0])  # a killed worker's trial: failed
        trial.set_user_attr("worker_pid", worker[1])  # by the next start (_fail_dead_trials)
        params = suggest(trial, space)
        chosen = trial_settings(params)
        folder = out / "trials" / study_name / str(trial.number)
        try:
            value = float("nan")
            for i, mark in enumerate(marks):
                values = []
                for seed in range(first_seed, first_seed + seeds):
                    settings = RunSettings(
                        task=task, searcher=searcher, max_evaluations=mark, seed=seed,
                        device=device, task_options=task_options, model=model,
                        eval_every=eval_every, checkpoint_every=10**9,
                        init=None if init is None else str(init), **chosen)
                    t0 = time.perf_counter()
                    try:
                        # the first piece starts afresh (a folder left by an older study
                        # of the same name is overwritten), later ones resume
                        results = run(settings, folder / f"seed{seed}", resume=i > 0,
                                      overwrite=i == 0)
                    finally:
                        spent["runs"] += time.perf_counter() - t0
                    values.append(metric_value(results["final_metrics"], metric, task))
                value = sum(values) / len(values)
                if not math.isfinite(value):
                    trial.set_user_attr("fail_reason", f"{metric} is {value} after {mark:,} "
                                                       "forward-equivalents")
                    logger.warning(f"trial {trial.number}: {metric} is {value}; marked failed")
                    return float("nan")  # Optuna records the trial as FAIL
                trial.report(value, mark)
                if i < len(marks) - 1 and trial.should_prune():
                    logger.info(f"trial {trial.number} pruned at {mark:,} evals "
                                f"({metric} {value:.4g})")
                    raise optuna.TrialPruned(f"{metric} {value:.4g} at {mark:,} evals")
            return value
        except (optuna.TrialPruned, KeyboardInterrupt):
            raise
        except _UnknownMetric as exc:  # a usage error, not a bad trial: stop the study
            usage_error.append(str(exc))
            trial.set_user_attr("fail_reason", str(exc))
            trial.study.stop()
            raise
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            trial.set_user_attr("fail_reason", reason)
            logger.warning(f"trial {trial.number} failed: {reason}")
            raise
        finally:
            for pt in folder.glob("seed*/*.pt"):
                pt.unlink(missing_ok=True)

    def progress(study_: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        done = [t for t in study_.get_trials(deepcopy=False)
                if t.state == optuna.trial.TrialState.COMPLETE]
        best = max((t.value for t in done), default=float("nan"))
        value = "-" if trial.value is None else f"{trial.value:.4g}"
        logger.info(f"trial {trial.number} {trial.state.name.lower()}: {metric} {value} "
                    f"{trial.params} | best {best:.4g} over {len(done)} completed")

    logger.info(f"tuning {searcher} on {task}: {trials} trials x {seeds} seed(s) x "
                f"{budget_evals:,} forward-equivalents; study {study_name!r} in {storage}")
    start = time.perf_counter()
    study_obj.optimize(objective, n_trials=trials, catch=(Exception,), callbacks=[progress],
                       gc_after_trial=False)
    if usage_error:
        raise ValueError(usage_error[0])
    optimize_s = time.perf_counter() - start
    _fail_dead_trials(study_obj)

    def best_of(best_trial: Any, completed: list) -> dict[str, Any]:
        baseline = [t.value for t in completed if t.user_attrs.get("baseline")]
        return {"task": base["task"], "searcher": base["searcher"],
                **trial_settings(best_trial.params),
                "task_options": base["task_options"], "model": base["model"],
                "metric": metric, "value": best_trial.value, "study": study_obj.study_name,
                "trial": best_trial.number, "budget_evals": base["budget_evals"],
                "seeds": base["seeds"], "first_seed": base["first_seed"],
                "baseline_value": baseline[0] if baseline else None}

    best = write_outputs(study_obj, out, base, metric, best_of)
    total = time.perf_counter() - start
    overhead = total - spent["runs"]
    logger.info(f"tuner overhead (Optuna, database, outputs): {overhead:.2f} s of {total:.1f} s "
                f"({100 * overhead / max(total, 1e-9):.1f}%; during the trials "
                f"{100 * (optimize_s - spent['runs']) / max(optimize_s, 1e-9):.1f}%)")
    logger.info(f"tuned in {total:.1f} s; "
                + (f"best {metric} {best['value']:.4g} (trial {best['trial']}) -> "
                   f"{out / 'best.json'}" if best else "no completed trial"))
    return best
