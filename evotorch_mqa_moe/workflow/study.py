"""Opening a tuning study: its Optuna storage (SQLite lock timeouts, heartbeats), a TPE
sampler seeded per trial, and failing the trials of workers that were killed."""

from __future__ import annotations

import time
import warnings
from typing import Any

from loguru import logger

from evotorch_mqa_moe._internal.files import pid_alive

__all__ = ["HEARTBEAT_S", "GRACE_S"]

HEARTBEAT_S = 10  # seconds between a running trial's heartbeats
GRACE_S = 30  # a running trial without a heartbeat for this long is marked failed


def _trial_seed(sampler_seed: int, number: int) -> int:
    """The TPE seed of trial ``number``: each trial of a study (whichever worker or
    invocation runs it) draws from its own stream, the same one on every rerun."""
    import numpy as np

    return int(np.random.SeedSequence([sampler_seed, number]).generate_state(1)[0])


def _sampler(sampler_seed: int):
    """A TPE sampler reseeded per trial from ``(sampler_seed, trial number)``: with one
    fixed seed, every invocation and every parallel worker would draw the same points."""
    import optuna

    class TrialSeededTPE(optuna.samplers.BaseSampler):
        def __init__(self) -> None:
            self.tpe = optuna.samplers.TPESampler(seed=sampler_seed)

        def before_trial(self, study, trial) -> None:
            self.tpe = optuna.samplers.TPESampler(seed=_trial_seed(sampler_seed, trial.number))
            self.tpe.before_trial(study, trial)

        def infer_relative_search_space(self, study, trial):
            return self.tpe.infer_relative_search_space(study, trial)

        def sample_relative(self, study, trial, search_space):
            return self.tpe.sample_relative(study, trial, search_space)

        def sample_independent(self, study, trial, param_name, param_distribution):
            return self.tpe.sample_independent(study, trial, param_name, param_distribution)

        def after_trial(self, study, trial, state, values) -> None:
            self.tpe.after_trial(study, trial, state, values)

        def reseed_rng(self) -> None:
            self.tpe.reseed_rng()

    return TrialSeededTPE()


def _fail_dead_trials(study: Any) -> None:
    """Mark failed, with a reason, the RUNNING trials whose worker on this machine is gone
    (killed: it can no longer finish them); other machines' are left to the heartbeat."""
    import socket

    import optuna

    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        pid = t.user_attrs.get("worker_pid")
        if t.user_attrs.get("worker_host") == host and isinstance(pid, int) and not pid_alive(pid):
            reason = f"its worker (pid {pid} on {host}) ended without finishing it (killed?)"
            study._storage.set_trial_user_attr(t._trial_id, "fail_reason", reason)
            study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
            logger.warning(f"trial {t.number} marked failed: {reason}")


def _stale_reason(study: Any, trial: Any) -> None:
    """Optuna's stale-trial callback: a trial failed for its missing heartbeat can no longer
    take user attributes, so its reason goes into the study's ``stale_reasons``
    (``trials.csv`` shows it as the trial's ``fail_reason``)."""
    reasons = dict(study.user_attrs.get("stale_reasons", {}))
    reasons[str(trial.number)] = (f"no heartbeat for {GRACE_S} s: its worker stopped "
                                  "(killed, machine lost?)")
    study.set_user_attr("stale_reasons", reasons)
    logger.warning(f"trial {trial.number} marked failed: {reasons[str(trial.number)]}")


def _open_study(storage: str, study: str, sampler_seed: int):
    """Create or load ``study`` in ``storage``; ValueError (one line) if it cannot be opened.

    SQLite files get a 60 s lock timeout (workers writing at once wait rather than fail),
    and a race of workers creating the same fresh database is retried. Running trials
    send a heartbeat every ``HEARTBEAT_S`` seconds; a trial whose worker died (SIGKILL,
    power loss) is marked failed once ``GRACE_S`` seconds passed without one, when any
    worker of the study starts its next trial.
    """
    import optuna

    for attempt in range(5):
        try:
            kwargs = ({"connect_args": {"timeout": 60}} if storage.startswith("sqlite:")
                      else {})
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                common = {"engine_kwargs": kwargs, "heartbeat_interval": HEARTBEAT_S,
                          "grace_period": GRACE_S}
                try:  # the callback's name since Optuna 4.9
                    rdb = optuna.storages.RDBStorage(
                        storage, heartbeat_stale_trial_callback=_stale_reason, **common)
                except TypeError:
                    rdb = optuna.storages.RDBStorage(
                        storage, failed_trial_callback=_stale_reason, **common)
            return optuna.create_study(
                storage=rdb, study_name=study, direction="maximize", load_if_exists=True,
                sampler=_sampler(sampler_seed),
                pruner=optuna.pruners.MedianPruner())
        except Exception as exc:  # sqlalchemy / driver errors of many kinds
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            if attempt < 4 and any(s in first for s in ("already exists", "locked",
                                                          "UNIQUE constraint")):
                time.sleep(0.5 * (attempt + 1))
                continue
            raise ValueError(f"cannot open storage {storage!r}: {type(exc).__name__}: "
                             f"{first}") from None
    raise AssertionError("unreachable")
