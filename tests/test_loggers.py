"""EvoTorch loggers and callbacks: ``run(..., callbacks=[...])`` in Python and
``--logger pandas|mlflow|wandb|neptune`` on the command line (real CLI, subprocess).

mlflow, wandb and neptune are not dependencies; the end-to-end test puts small fake
packages on ``PYTHONPATH`` that record every call, so EvoTorch's own ``MlflowLogger``,
``WandbLogger`` and ``NeptuneLogger`` run unchanged against them.
"""

import json
import os
import subprocess
import sys
import textwrap

import pandas as pd
import pytest

from evotorch_mqa_moe.workflow.loggers import LOGGERS, check_loggers, make_logger, open_loggers
from evotorch_mqa_moe.workflow.run import run
from evotorch_mqa_moe.workflow.settings import RunSettings

TINY = {"embed_dim": 8, "num_heads": 2, "expert_dim": 8}
TINY_ARGS = ["--model", "embed_dim=8", "--model", "num_heads=2", "--model", "expert_dim=8"]


def _settings(generations, **kw):
    return RunSettings(task="reverse", searcher="pgpe", generations=generations, popsize=4,
                       model=TINY, eval_every=2, checkpoint_every=1, **kw)


def test_run_calls_each_callback_every_generation_with_its_row(tmp_path):
    seen = []
    pandas_log = make_logger("pandas")
    results = run(_settings(3), tmp_path / "r", callbacks=[seen.append, pandas_log])
    assert [s["iter"] for s in seen] == [1, 2, 3] == [s["generation"] for s in seen]
    history = pd.read_csv(tmp_path / "r" / "history.csv")
    for status, (_, row) in zip(seen, history.iterrows(), strict=True):
        assert status["evaluations"] == row["evaluations"]
        assert status["best_fitness"] == pytest.approx(row["best_fitness"])
    assert "exact_accuracy" in seen[1] and "exact_accuracy" not in seen[0]  # eval_every 2
    frame = pandas_log.to_dataframe()
    assert list(frame.index) == [1, 2, 3] and "best_so_far" in frame.columns
    assert results["generations"] == 3


def test_a_resumed_run_keeps_evotorch_logger_steps_in_step_with_generations(tmp_path):
    # EvoTorch counts a logger's calls from 0; run() sets the count to the generation
    first = make_logger("pandas", interval=2)
    run(_settings(3), tmp_path / "r", callbacks=[first])
    second = make_logger("pandas", interval=2)
    run(_settings(6), tmp_path / "r", resume=True, callbacks=[second])
    assert list(first.to_dataframe().index) == [2]
    assert list(second.to_dataframe().index) == [4, 6]  # not [5]: counting went on


def test_unknown_or_missing_logger_package():
    with pytest.raises(ValueError, match="unknown logger 'csv'; known: pandas, mlflow"):
        check_loggers(["csv"])
    assert set(LOGGERS) == {"pandas", "mlflow", "wandb", "neptune"}
    check_loggers(["pandas"])
    with open_loggers([], run_name="x", out=".") as callbacks:
        assert callbacks == []


def _cli(args, tmp_path, env_path=None):
    env = dict(os.environ)
    if env_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(env_path), env.get("PYTHONPATH", "")])
        env["FAKE_LOG"] = str(tmp_path / "calls.jsonl")
    return subprocess.run([sys.executable, "-m", "evotorch_mqa_moe", *args],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)


@pytest.mark.parametrize("name", ["mlflow", "wandb", "neptune"])
def test_cli_logger_without_its_package_is_one_error_line_exit_2(tmp_path, name):
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / f"{name}.py").write_text("raise ImportError('not installed')\n")
    done = _cli(["run", "reverse", "--generations", "1", "--logger", name, "--out",
                 str(tmp_path / "r")], tmp_path, env_path=blocked)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"evotorch-mqa-moe: error: --logger {name} needs the {name} package, which is not "
        f"installed here (pip install {name})"]
    assert not (tmp_path / "r").exists()


def test_cli_unknown_logger_is_an_argparse_error(tmp_path):
    done = _cli(["run", "reverse", "--logger", "csv", "--out", str(tmp_path / "r")], tmp_path)
    assert done.returncode == 2 and "invalid choice: 'csv'" in done.stderr


FAKES = {
    "_fake_record.py": """
        import json, os

        def record(*event):
            with open(os.environ["FAKE_LOG"], "a") as f:
                f.write(json.dumps(event) + "\\n")
    """,
    "mlflow.py": """
        import contextlib
        from _fake_record import record

        class tracking:
            MlflowClient = object

        class entities:
            Run = object

        @contextlib.contextmanager
        def start_run(run_name=None):
            record("mlflow.start_run", run_name)
            yield
            record("mlflow.end_run")

        def log_metrics(metrics, step=None):
            record("mlflow.log_metrics", step, sorted(metrics))
    """,
    "wandb.py": """
        from _fake_record import record

        def init(**kwargs):
            record("wandb.init", kwargs)

        def log(values):
            record("wandb.log", values["iter"], sorted(values))

        def finish():
            record("wandb.finish")
    """,
    "neptune.py": """
        from _fake_record import record
        __version__ = "1.10.0"

        class _Series:
            def __init__(self, key):
                self.key = key

            def log(self, value):
                if self.key == "iter":
                    record("neptune.log", value)

        class Run:
            def __getitem__(self, key):
                return _Series(key)

            def stop(self):
                record("neptune.stop")

        def init_run(**kwargs):
            record("neptune.init_run", kwargs)
            return Run()
    """,
}


def test_cli_loggers_end_to_end_with_fake_services_and_resume(tmp_path):
    fakes = tmp_path / "fakes"
    fakes.mkdir()
    for name, source in FAKES.items():
        (fakes / name).write_text(textwrap.dedent(source))
    out = tmp_path / "r"
    loggers = [a for n in ("pandas", "mlflow", "wandb", "neptune") for a in ("--logger", n)]
    base = ["run", "reverse", "--popsize", "4", *TINY_ARGS, "--checkpoint-every", "1",
            "--quiet", "--out", str(out), *loggers]
    done = _cli([*base, "--generations", "2"], tmp_path, env_path=fakes)
    assert done.returncode == 0, done.stderr[-3000:]
    done = _cli([*base, "--generations", "3", "--resume"], tmp_path, env_path=fakes)
    assert done.returncode == 0, done.stderr[-3000:]
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    kinds = [c[0] for c in calls]
    run_name = "reverse-pgpe-seed0"
    assert [c for c in calls if c[0] == "mlflow.start_run"] == [["mlflow.start_run", run_name]] * 2
    assert kinds.count("mlflow.end_run") == 2
    metrics = [c for c in calls if c[0] == "mlflow.log_metrics"]
    assert [c[1] for c in metrics] == [1, 2, 3]  # the resumed run goes on at step 3
    assert {"iter", "evaluations", "best_fitness", "mean_fitness", "best_so_far"} <= set(
        metrics[0][2])
    assert [c[1] for c in calls if c[0] == "wandb.log"] == [1, 2, 3]
    assert [c for c in calls if c[0] == "wandb.init"][0][1] == {
        "name": run_name, "project": "evotorch-mqa-moe"}
    assert kinds.count("wandb.finish") == 2
    assert [c[1] for c in calls if c[0] == "neptune.log"] == [1, 2, 3]
    assert [c[1] for c in calls if c[0] == "neptune.init_run"][0] == {"name": run_name}
    assert kinds.count("neptune.stop") == 2
    frame = pd.read_csv(out / "pandas_log.csv")
    history = pd.read_csv(out / "history.csv")
    assert list(frame["iter"]) == [1, 2, 3] == list(history["generation"])
    assert list(frame["evaluations"]) == list(history["evaluations"])


def test_compare_opens_one_logger_per_run(tmp_path):
    from evotorch_mqa_moe.workflow.cli import main

    out = tmp_path / "c"
    assert main(["compare", "reverse", "--searchers", "pgpe,adam", "--seeds", "2",
                 "--max-evals", "16", "--popsize", "4", *TINY_ARGS, "--logger", "pandas",
                 "--quiet", "--out", str(out)]) == 0
    for searcher in ("pgpe", "adam"):
        for seed in (0, 1):
            folder = out / searcher / f"seed{seed}"
            frame = pd.read_csv(folder / "pandas_log.csv")
            history = pd.read_csv(folder / "history.csv")
            assert list(frame["iter"]) == list(history["generation"])
