"""What a tuning study leaves on disk: ``best.json``, ``trials.csv`` and the plots (named
by task, searcher and metric), with a warning when every trial scored the same."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from loguru import logger

from evotorch_mqa_moe._internal.files import atomic_to_csv, atomic_write_text

__all__ = ["write_outputs", "all_tied"]


def all_tied(values: list[float]) -> bool:
    """Whether two or more trial values are all exactly equal (the metric gave the
    sampler no signal)."""
    return len(values) >= 2 and len(set(values)) == 1


def write_outputs(study: Any, out: Path, base: dict[str, Any], metric: str,
                  best_of: Any) -> dict | None:
    """best.json, trials.csv and the plots; returns the best.json dict (None: no trial
    done). ``best_of(best_trial)`` is the best.json dict of the best completed trial."""
    import optuna

    frame = study.trials_dataframe()
    stale = study.user_attrs.get("stale_reasons", {})  # failed for a missing heartbeat
    if stale:
        if "user_attrs_fail_reason" not in frame:
            frame["user_attrs_fail_reason"] = None
        for number, reason in stale.items():
            frame.loc[frame["number"] == int(number), "user_attrs_fail_reason"] = reason
    atomic_to_csv(frame, out / "trials.csv")
    completed = [t for t in study.get_trials(deepcopy=False)
                 if t.state == optuna.trial.TrialState.COMPLETE]
    if not completed:
        logger.warning(f"study {study.study_name}: no completed trial yet; no best.json")
        return None
    best_trial = max(completed, key=lambda t: t.value)
    best = best_of(best_trial, completed)
    atomic_write_text(json.dumps(best, indent=2) + "\n", out / "best.json")

    tied = all_tied([t.value for t in completed])
    if tied:
        others = [m for m in ("neg_loss", "token_accuracy") if m != metric]
        logger.warning(f"all {len(completed)} completed trials scored exactly {metric} = "
                       f"{completed[0].value:.4g}: the metric carries no signal at this budget "
                       f"and best.json is an arbitrary pick; try --metric "
                       f"{' or --metric '.join(others)}, or a larger --budget-evals "
                       "(param_importances.png is not drawn)")
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    what = f"{base['task']} / {base['searcher']}: {metric}"
    plots = [("optimization_history.png", ovm.plot_optimization_history,
              f"{what} per trial")]
    (out / "param_importances.png").unlink(missing_ok=True)  # never a stale one
    if len(completed) >= 2 and best_trial.params and not tied:
        plots.append(("param_importances.png", ovm.plot_param_importances,
                      f"{what}: parameter importances"))
    for name, plot, title in plots:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # ExperimentalWarning of the matplotlib API
                ax = plot(study)
            ax.set_title(title)
            if name == "optimization_history.png":
                ax.set_ylabel(metric)
            fig = ax.figure
            fig.tight_layout()
            fig.savefig(out / name, dpi=100)
            plt.close(fig)
        except Exception as exc:  # e.g. importances of parameters that never varied
            logger.warning(f"{name} not drawn: {type(exc).__name__}: {exc}")
    return best
