"""EvoTorch's loggers for any searcher of the registry, and for ``--logger`` on the CLI.

EvoTorch's loggers (``PandasLogger``, ``MlflowLogger``, ``WandbLogger``,
``NeptuneLogger``) attach to a ``SearchAlgorithm``'s ``log_hook`` and are then called
with its status after every step. Our searchers are not all EvoTorch algorithms
(``adam``, the hybrids, ``lowrank-es``), so :func:`make_logger` attaches the EvoTorch
logger to a small stand-in whose only member is that ``log_hook``, and returns it:
a callable that :func:`~evotorch_mqa_moe.run.run` calls after every generation with
the generation's ``history.csv`` row (``"iter"``, ``"evaluations"``, ``"wall_time"``,
``"best_fitness"``, ``"mean_fitness"``, ``"best_so_far"`` and the held-out metrics on
the generations that compute them)::

    from evotorch_mqa_moe.loggers import make_logger
    from evotorch_mqa_moe.run import RunSettings, run

    pandas_log = make_logger("pandas")
    run(RunSettings("reverse", "pgpe", generations=20), "runs/x", callbacks=[pandas_log])
    frame = pandas_log.to_dataframe()  # one row per generation, indexed by "iter"

:func:`open_loggers` is what ``run`` / ``compare --logger NAME`` use: one logger per
run, opened and closed around it (an MLflow run, a W&B run, a Neptune run named after
the run; ``pandas`` writes ``pandas_log.csv`` into the run's folder).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

__all__ = ["LOGGERS", "check_loggers", "make_logger", "open_loggers"]

# name -> (package it needs, EvoTorch class in evotorch.logging)
LOGGERS: dict[str, tuple[str, str]] = {
    "pandas": ("pandas", "PandasLogger"),
    "mlflow": ("mlflow", "MlflowLogger"),
    "wandb": ("wandb", "WandbLogger"),
    "neptune": ("neptune", "NeptuneLogger"),
}


def check_loggers(names: Sequence[str]) -> None:
    """ValueError for an unknown logger name or one whose package is not installed
    (checked before a run starts, so a typo does not cost a run)."""
    for name in names:
        if name not in LOGGERS:
            raise ValueError(f"unknown logger {name!r}; known: {', '.join(LOGGERS)}")
        package = LOGGERS[name][0]
        try:
            importlib.import_module(package)
        except ImportError:
            raise ValueError(f"--logger {name} needs the {package} package, which is not "
                             f"installed here (pip install {package})") from None


class _LogHook:
    """Stands in for a ``SearchAlgorithm`` when an EvoTorch logger is built: the logger
    only appends itself to ``log_hook``; :func:`run` calls it instead."""

    def __init__(self) -> None:
        self.log_hook: list[Callable[[dict], Any]] = []


def make_logger(kind: str, /, **kwargs: Any) -> Any:
    """EvoTorch's logger ``kind`` (``"pandas"``, ``"mlflow"``, ``"wandb"``,
    ``"neptune"``), ready to pass to ``run(..., callbacks=[...])``.

    ``kwargs`` go to the EvoTorch logger (e.g. ``interval=10``; ``name=``,
    ``project=`` for W&B and Neptune, which start their run with them).

    Raises:
        ValueError: unknown ``kind``, or its package is not installed.
    """
    check_loggers([kind])
    import evotorch.logging

    cls = getattr(evotorch.logging, LOGGERS[kind][1])
    return cls(_LogHook(), **kwargs)


def _write_pandas_log(log: Any, path: Path) -> None:
    """``log``'s rows into ``path``, after the rows of earlier generations already there
    (a resumed run logs from its next generation on)."""
    import pandas as pd

    from evotorch_mqa_moe._internal.files import atomic_to_csv

    frame = log.to_dataframe().reset_index()
    if path.is_file() and len(frame):
        old = pd.read_csv(path)
        if "iter" in old.columns:
            frame = pd.concat([old[old["iter"] < frame["iter"].min()], frame],
                              ignore_index=True)
    atomic_to_csv(frame, path)


@contextmanager
def _one(name: str, run_name: str, out: Path) -> Iterator[Any]:
    """One logger for one run, with the service's run opened and closed around it."""
    if name == "pandas":
        log = make_logger("pandas")
        yield log
        _write_pandas_log(log, out / "pandas_log.csv")
    elif name == "mlflow":
        mlflow = importlib.import_module("mlflow")  # optional: checked by check_loggers
        with mlflow.start_run(run_name=run_name):
            yield make_logger("mlflow")
    elif name == "wandb":
        wandb = importlib.import_module("wandb")  # optional: checked by check_loggers
        log = make_logger("wandb", name=run_name, project="evotorch-mqa-moe")
        try:
            yield log
        finally:
            wandb.finish()
    else:  # neptune
        log = make_logger("neptune", name=run_name)
        try:
            yield log
        finally:
            log.run.stop()


@contextmanager
def open_loggers(names: Sequence[str], *, run_name: str,
                 out: str | Path) -> Iterator[list[Any]]:
    """The loggers ``names`` for one run (as ``run``'s ``callbacks``), closed at the end.

    Args:
        names: names from :data:`LOGGERS`.
        run_name: the run's name in the tracking service (e.g. ``"reverse-pgpe-seed0"``).
        out: the run's folder (``pandas`` writes ``pandas_log.csv`` there).
    """
    check_loggers(names)
    with ExitStack() as stack:
        yield [stack.enter_context(_one(n, run_name, Path(out))) for n in names]
