"""The command line: ``evotorch-mqa-moe list | run | compare | tune | sample``.

Also reachable as ``python -m evotorch_mqa_moe``. ``run`` and ``compare`` take
``--config FILE`` (the ``best.json`` that ``tune`` writes): its settings apply
unless an explicit flag gives another value.
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

from loguru import logger

from .loggers import LOGGERS  # names only: the module imports nothing heavy

__all__ = ["main", "DEFAULT_GENERATIONS"]

DEFAULT_GENERATIONS = 100  # `run`'s limit when no --generations / --max-evals / --max-seconds


# Python's spellings too, so that `re_evaluate=False` means False and not the string
_PYTHON_CONSTANTS = {"True": True, "False": False, "None": None}


def _key_values(items: list[str] | None, what: str) -> dict[str, Any]:
    """``["seq_len=10", "source=text"]`` -> ``{"seq_len": 10, "source": "text"}`` (JSON
    values, or Python's ``True`` / ``False`` / ``None``; anything else stays a string)."""
    result = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"{what} must look like NAME=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        if raw in _PYTHON_CONSTANTS:
            result[key] = _PYTHON_CONSTANTS[raw]
            continue
        try:
            result[key] = json.loads(raw)
        except json.JSONDecodeError:
            result[key] = raw
    return result


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except the ``None`` / ``False`` of unset options."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="evotorch-mqa-moe",
        description="Evolve MQA/MoE transformers with EvoTorch, the population in one pass.")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="tasks (with default model size) and searchers")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("task", help="a task name (see `list`)")
        p.add_argument("--popsize", type=int, default=None,
                       help="population size (default: the searcher's, see `list`)")
        p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
        p.add_argument("--out", type=Path, required=True, help="output folder")
        p.add_argument("--stdev", type=float, default=None,
                       help="initial search / mutation stdev (default: the searcher's)")
        p.add_argument("--task-option", action="append", metavar="NAME=VALUE",
                       help="task option, e.g. seq_len=10 (repeatable)")
        p.add_argument("--model", action="append", metavar="NAME=VALUE",
                       help="model config change, e.g. embed_dim=32 (repeatable)")
        p.add_argument("--preset", default=None, metavar="NAME",
                       help="model size from a preset (seed: the original 512/6/8/4x2048 "
                            "model; bench-a); the task keeps its vocabulary, input/output "
                            "width, causality and pooling; --model changes apply on top")
        p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                       help="the forward pass's dtype (populations, fitness and searcher "
                            "updates stay float32; lowrank-es keeps its factors in it)")
        p.add_argument("--eval-every", type=int, default=10,
                       help="generations between held-out evaluations")
        p.add_argument("--threads", type=int, default=None,
                       help="torch CPU threads, 1 to 4 per core (default: torch's, one per "
                            "core)")
        p.add_argument("--quiet", action="store_true", help="warnings and errors only")
        p.add_argument("--init", type=Path, default=None, metavar="PATH",
                       help="start from the weights in PATH (best_model.pt of an earlier run, "
                            "or its checkpoint.pt): the ES centre, adam's network, GA and "
                            "hybrid populations around it")
        p.add_argument("--config", type=Path, default=None, metavar="FILE",
                       help="settings from a best.json (written by `tune`): searcher, popsize, "
                            "stdev, searcher/task options, model; explicit flags override")
        p.add_argument("--logger", action="append", choices=list(LOGGERS), metavar="NAME",
                       help=f"also log every generation with EvoTorch's logger NAME "
                            f"({', '.join(LOGGERS)}; repeatable; its package must be "
                            "installed): pandas writes pandas_log.csv into the run's "
                            "folder, mlflow / wandb / neptune open one run per run, "
                            "configured by their usual environment variables")
        p.add_argument("--actors", type=int, default=0, metavar="N",
                       help="evaluate on N Ray actors (N >= 2; EvoTorch's num_actors; "
                            "searchers that evaluate through the problem use them); the "
                            "same seed gives the same run as without")
        p.add_argument("--gpus-per-actor", type=float, default=None, metavar="G",
                       help="GPUs per Ray actor (EvoTorch's num_gpus_per_actor; needs "
                            "--actors)")
        p.add_argument("--ray-address", default=None, metavar="ADDR",
                       help="join this Ray cluster (ray.init(address=ADDR), e.g. auto or "
                            "HOST:6379) instead of starting a local one; needs --actors")

    def budgets(p: argparse.ArgumentParser, *, generations: bool) -> None:
        if generations:
            p.add_argument("--generations", type=int, default=None,
                           help=f"stop after N steps (default {DEFAULT_GENERATIONS} when no "
                                "--max-evals / --max-seconds is given)")
        p.add_argument("--max-evals", "--budget-evals", dest="max_evals", type=int, default=None,
                       help="stop after this many forward-equivalents (one forward of one "
                            "individual on one task batch = 1; a backward = 2 more)")
        p.add_argument("--max-seconds", type=float, default=None,
                       help="stop once the searcher's steps took this much wall time")

    r = sub.add_parser("run", help="run one searcher on one task")
    common(r)
    r.add_argument("--searcher", default=None,
                   help="a searcher name (see `list`; default: --config's, else pgpe)")
    budgets(r, generations=True)
    r.add_argument("--seed", type=int, default=0,
                   help="seeds the problem, the searcher and the data stream")
    r.add_argument("--checkpoint-every", type=int, default=10,
                   help="generations between checkpoints (OUT/checkpoint.pt)")
    r.add_argument("--searcher-option", action="append", metavar="NAME=VALUE",
                   help="searcher option, e.g. lr=0.001 for adam or "
                        "center_learning_rate=0.1 for pgpe (repeatable)")
    r.add_argument("--lr", type=float, default=None,
                   help="shorthand for --searcher-option lr=LR (adam's learning rate)")
    r.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    r.add_argument("--overwrite", action="store_true",
                   help="replace the run already in OUT (without it such a folder is refused)")

    c = sub.add_parser("compare", help="several searchers x seeds under one budget")
    common(c)
    c.add_argument("--searchers", default=None,
                   help="comma-separated searcher names (default: --config's searcher, "
                        "else ga,cmaes,pgpe,snes,adam)")
    c.add_argument("--seeds", type=int, default=3, help="seeds per searcher (0..K-1)")
    budgets(c, generations=False)
    c.add_argument("--target", type=float, default=None,
                   help="held-out target for time-to-target (default: 90%% of the way "
                        "from chance to ceiling)")

    t = sub.add_parser("tune", help="tune a searcher's hyperparameters with Optuna")
    t.add_argument("task", help="a task name (see `list`)")
    t.add_argument("--searcher", required=True, help="a searcher name (see `list`)")
    t.add_argument("--trials", type=int, required=True,
                   help="trials this process runs (added to the study if it exists)")
    t.add_argument("--budget-evals", "--max-evals", dest="budget_evals", type=int,
                   required=True, help="forward-equivalents per run (one run per seed)")
    t.add_argument("--seeds", type=int, default=1,
                   help="runs per trial, seeds 0..K-1; the trial's value is their mean")
    t.add_argument("--first-seed", type=int, default=0,
                   help="first run seed (tune on seeds a later comparison does not use)")
    t.add_argument("--storage", default=None,
                   help="Optuna storage URL shared by all workers (default "
                        "sqlite:///OUT/study.db; e.g. postgresql://... for many machines)")
    t.add_argument("--study", default=None, help="study name (default TASK-SEARCHER)")
    t.add_argument("--out", type=Path, default=None,
                   help="output folder (default runs/tune/TASK-SEARCHER)")
    t.add_argument("--task-option", action="append", metavar="NAME=VALUE",
                   help="task option, e.g. seq_len=10 (repeatable)")
    t.add_argument("--model", action="append", metavar="NAME=VALUE",
                   help="model config change, e.g. embed_dim=32 (repeatable)")
    t.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads, 1 to 4 per core (default: torch's, one per core)")
    t.add_argument("--init", type=Path, default=None, metavar="PATH",
                   help="every run starts from the weights in PATH (best_model.pt or a "
                        "checkpoint)")
    t.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    t.add_argument("--sampler-seed", type=int, default=0, help="seed of the TPE sampler")
    t.add_argument("--metric", default=None,
                   help="held-out metric to maximise (default: the task's target metric; "
                        "e.g. token_accuracy when exact_accuracy stays 0 in the budget; "
                        "neg_NAME maximises -NAME, e.g. neg_loss)")
    t.add_argument("--eval-every", type=int, default=10,
                   help="generations between held-out evaluations inside a run")
    t.add_argument("--quiet", action="store_true", help="warnings and errors only")

    s = sub.add_parser("sample", help="text from the model of a finished language run")
    s.add_argument("run_dir", type=Path, help="the run's folder (OUT of `run`)")
    s.add_argument("--prompt", default=None,
                   help="text to continue (markov: space-separated token numbers; "
                        "default: a newline, or token 0)")
    s.add_argument("--tokens", type=int, default=200, help="new tokens to write")
    s.add_argument("--temperature", type=float, default=0.8,
                   help="sample from softmax(logits / T); lower is more conservative")
    s.add_argument("--top-k", type=int, default=None,
                   help="sample among the K most likely tokens only (default: all)")
    s.add_argument("--greedy", action="store_true", help="always take the most likely token")
    s.add_argument("--seed", type=int, default=0, help="seeds the sampling")
    s.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    for parser in (ap, *sub.choices.values()):
        parser.formatter_class = _HelpFormatter
    return ap


def _apply_config(args: argparse.Namespace) -> None:
    """Fill ``args`` from ``--config`` wherever no explicit flag gave a value."""
    if getattr(args, "config", None) is None:
        return
    from .tune import load_config

    cfg = load_config(args.config)  # ValueError naming the file and the bad key
    if "task" in cfg and cfg["task"] != args.task:
        logger.warning(f"--config {args.config} was tuned on {cfg['task']!r}; running "
                       f"{args.task!r}")
    if args.popsize is None:
        args.popsize = cfg.get("popsize")
    if args.stdev is None:
        args.stdev = cfg.get("stdev")
    # repeatable NAME=VALUE flags: the file's values first, explicit ones win
    for flag, key in (("task_option", "task_options"), ("model", "model")):
        given = getattr(args, flag) or []
        setattr(args, flag, [f"{k}={json.dumps(v)}" for k, v in cfg.get(key, {}).items()]
                + given)
    args.config_searcher = cfg.get("searcher")
    args.config_searcher_options = cfg.get("searcher_options", {})


def _list() -> None:
    from .catalog import render  # plain data: `list` loads neither torch nor EvoTorch

    sys.stdout.write(render())


def _sample(args: argparse.Namespace) -> int:
    from .sample import sample_run

    try:
        text = sample_run(args.run_dir, prompt=args.prompt, tokens=args.tokens,
                          temperature=args.temperature, top_k=args.top_k, greedy=args.greedy,
                          seed=args.seed, device=args.device)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as exc:
        print(f"evotorch-mqa-moe: error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


def _validate_common(args: argparse.Namespace) -> None:
    from evotorch_mqa_moe.problems import task_names

    if args.task not in task_names():
        raise ValueError(f"unknown task {args.task!r}; known: {', '.join(task_names())}")
    if args.threads is not None:
        from evotorch_mqa_moe._internal.validate import check_threads

        check_threads("--threads", args.threads)  # torch segfaults with 100,000
        import torch

        torch.set_num_threads(args.threads)
    if args.device != "cpu":
        import torch

        try:  # compute there and copy back: a meta device allocates but cannot do this
            torch.ones(1, device=args.device).add(1).cpu()
        except Exception as exc:  # noqa: BLE001 - any failure: one clear line
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ValueError(f"device {args.device!r} is not usable here: {first}") from None


def _check_popsize(searcher: str, popsize: int | None) -> None:
    from evotorch_mqa_moe.searchers import get_spec

    minimum = get_spec(searcher).min_popsize  # ValueError naming the known searchers
    if popsize is not None and popsize < minimum:
        raise ValueError(f"--popsize {popsize} is too small for {searcher} (needs >= {minimum})")


def _check_budgets(args: argparse.Namespace) -> None:
    if args.max_evals is not None and args.max_evals < 1:
        raise ValueError(f"--max-evals must be positive, got {args.max_evals}")
    if args.max_seconds is not None and not (0 < args.max_seconds < float("inf")):
        raise ValueError(f"--max-seconds must be a positive finite number, got {args.max_seconds}")


def _model(args: argparse.Namespace) -> dict[str, Any]:
    """The model changes of ``--preset`` (architecture fields only) then ``--model``."""
    model = {}
    if args.preset is not None:
        from evotorch_mqa_moe.model import preset_overrides

        model.update(preset_overrides(args.preset))  # ValueError naming the known presets
    model.update(_key_values(args.model, "--model"))
    return model


def _run(args: argparse.Namespace) -> None:
    from .run import run
    from .settings import RunSettings

    config_searcher = getattr(args, "config_searcher", None)
    if args.searcher is None:
        args.searcher = config_searcher or "pgpe"
    _check_popsize(args.searcher, args.popsize)
    _check_budgets(args)
    generations = args.generations
    if generations is None and args.max_evals is None and args.max_seconds is None:
        generations = DEFAULT_GENERATIONS
    searcher_options = {}
    if config_searcher == args.searcher:
        searcher_options.update(getattr(args, "config_searcher_options", {}))
    elif config_searcher is not None:
        logger.warning(f"--config's searcher options are for {config_searcher!r}, not "
                       f"{args.searcher!r}; left out")
    searcher_options.update(_key_values(args.searcher_option, "--searcher-option"))
    if args.lr is not None:
        searcher_options["lr"] = args.lr
    settings = RunSettings(
        task=args.task, searcher=args.searcher, generations=generations,
        max_evaluations=args.max_evals, max_seconds=args.max_seconds, popsize=args.popsize,
        seed=args.seed, device=args.device, stdev=args.stdev,
        task_options=_key_values(args.task_option, "--task-option"),
        model=_model(args), searcher_options=searcher_options,
        eval_every=args.eval_every, checkpoint_every=args.checkpoint_every, dtype=args.dtype,
        num_actors=args.actors, num_gpus_per_actor=args.gpus_per_actor,
        ray_address=args.ray_address, init=None if args.init is None else str(args.init))
    from .loggers import open_loggers

    with open_loggers(args.logger or [], run_name=f"{args.task}-{args.searcher}-seed{args.seed}",
                      out=args.out) as callbacks:
        results = run(settings, args.out, resume=args.resume, overwrite=args.overwrite,
                      callbacks=callbacks, progress=_progress_bar(args))
    metric = results["target_metric"]
    print(f"{args.task} / {args.searcher}: {metric} = {results['final_metrics'][metric]:.4g} "
          f"({results['parameters']:,} parameters, {results['evaluations']:,} "
          f"forward-equivalents, {results['wall_time']:.1f} s, stopped by "
          f"{results['stopped_by']}); files in {args.out}")


def _compare(args: argparse.Namespace, command: str) -> None:
    from .compare import compare

    # compare() validates the searcher names and popsize before any run starts.
    config_searcher = getattr(args, "config_searcher", None)
    if args.searchers is None:
        args.searchers = config_searcher or "ga,cmaes,pgpe,snes,adam"
    searchers = [s.strip() for s in args.searchers.split(",") if s.strip()]
    searcher_options = {}
    if config_searcher in searchers and getattr(args, "config_searcher_options", None):
        searcher_options[config_searcher] = dict(args.config_searcher_options)
    if args.seeds < 1:
        raise ValueError(f"--seeds must be positive, got {args.seeds}")
    _check_budgets(args)
    if args.max_evals is None and args.max_seconds is None:
        raise ValueError("compare needs a budget: --max-evals and/or --max-seconds")
    compare(args.task, searchers, seeds=args.seeds, max_evals=args.max_evals,
            max_seconds=args.max_seconds, out=args.out, popsize=args.popsize,
            device=args.device, stdev=args.stdev,
            target=args.target, task_options=_key_values(args.task_option, "--task-option"),
            model=_model(args), eval_every=args.eval_every,
            searcher_options=searcher_options, command=command, dtype=args.dtype,
            loggers=args.logger or (), num_actors=args.actors,
            num_gpus_per_actor=args.gpus_per_actor, ray_address=args.ray_address,
            init=args.init)


def _tune(args: argparse.Namespace) -> None:
    from .tune import tune

    if args.trials < 1:
        raise ValueError(f"--trials must be positive, got {args.trials}")
    if args.budget_evals < 1:
        raise ValueError(f"--budget-evals must be positive, got {args.budget_evals}")
    if args.seeds < 1:
        raise ValueError(f"--seeds must be positive, got {args.seeds}")
    out = args.out or Path("runs") / "tune" / f"{args.task}-{args.searcher}"
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logger.disable("evotorch_mqa_moe.run")  # one line per trial, not per generation
    try:
        best = tune(args.task, args.searcher, trials=args.trials,
                    budget_evals=args.budget_evals, seeds=args.seeds,
                    first_seed=args.first_seed, storage=args.storage,
                    study=args.study, out=out,
                    task_options=_key_values(args.task_option, "--task-option"),
                    model=_key_values(args.model, "--model"), threads=args.threads,
                    sampler_seed=args.sampler_seed, device=args.device,
                    eval_every=args.eval_every, metric=args.metric, init=args.init)
    finally:
        logger.enable("evotorch_mqa_moe.run")
    if best is None:
        print(f"{args.task} / {args.searcher}: no completed trial yet; files in {out}")
    else:
        print(f"{args.task} / {args.searcher}: best {best['metric']} = {best['value']:.4g} "
              f"(trial {best['trial']} of study {best['study']!r}); use it with "
              f"`run {args.task} --config {out / 'best.json'}`")


def _progress_bar(args: argparse.Namespace) -> bool:
    """``run`` draws a progress bar when it talks to a terminal (not with ``--quiet``,
    not when stderr is a file or a pipe: there the log lines carry the progress)."""
    return (args.command == "run" and not getattr(args, "quiet", False)
            and sys.stderr.isatty())


def _log_sink(args: argparse.Namespace) -> Any:
    """stderr; through tqdm while a progress bar is drawn, so log lines go above it."""
    if not _progress_bar(args):
        return sys.stderr
    from tqdm import tqdm

    return lambda message: tqdm.write(message, end="", file=sys.stderr)


_SIGNALLED: list[int] = []  # SIGINTs received while this process starts or finishes


def _on_sigint(signum: int, frame: Any) -> None:
    _SIGNALLED.append(signum)
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (errors: one line on stderr, status 2).

    Ctrl-C outside a run's generations (while torch and EvoTorch load, the task and
    searcher are built, or the final files are written) ends with one line and status
    130: libraries that turn the KeyboardInterrupt into another exception are recognised
    by the signal having arrived."""
    _SIGNALLED.clear()
    try:
        previous = signal.signal(signal.SIGINT, _on_sigint)
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        return _main(argv)
    except (Exception, KeyboardInterrupt):
        if not _SIGNALLED:
            raise
        print("evotorch-mqa-moe: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    logger.remove()  # the CLI owns the handlers; the library never configures them
    logger.add(_log_sink(args), level="WARNING" if getattr(args, "quiet", False) else "INFO",
               format="<green>{time:HH:mm:ss}</green> {level: <7} {message}",
               colorize=sys.stderr.isatty())
    if args.command == "list":
        _list()
        return 0
    if args.command == "sample":  # needs torch, not EvoTorch
        return _sample(args)
    # `--help` and `list` end above: torch and EvoTorch load only for real work
    try:
        if getattr(args, "logger", None):  # a missing package: known before EvoTorch loads
            from .loggers import check_loggers

            check_loggers(args.logger)
        from evotorch_mqa_moe._internal.evotorch_compat import quiet_evotorch_loggers

        quiet_evotorch_loggers()
        _validate_common(args)
        if args.command == "tune":
            _tune(args)
            return 0
        _apply_config(args)
        if args.command == "run":
            _run(args)
        else:
            _compare(args, "evotorch-mqa-moe " + shlex.join(sys.argv[1:] if argv is None
                                                            else argv))
    except KeyboardInterrupt as exc:
        describe = getattr(exc, "describe", None)  # run.RunInterrupted knows what was saved
        print(f"evotorch-mqa-moe: {describe() if describe else 'interrupted'}", file=sys.stderr)
        return 130
    except (ValueError, TypeError, FileNotFoundError, FileExistsError,
            ModuleNotFoundError) as exc:  # ModuleNotFoundError: a missing extra (g2p)
        if _SIGNALLED:  # Ctrl-C inside a library that re-raised it as something else
            raise
        print(f"evotorch-mqa-moe: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a failed write (full disk, ...): one line, no traceback
        if _SIGNALLED:
            raise
        print(f"evotorch-mqa-moe: error: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
