"""compare(): runs, results.csv, summary.md, plots, resume, targets, validation."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from evotorch_mqa_moe.problems import make_task
from evotorch_mqa_moe.workflow.cli import main
from evotorch_mqa_moe.workflow.compare import (
    RESULT_COLUMNS,
    compare,
    default_target,
    summarize,
    time_to_target,
)

TINY = {"embed_dim": 8, "num_heads": 2, "expert_dim": 8}
PLOTS = ["best_fitness_vs_evaluations.png", "best_fitness_vs_wall_time.png",
         "exact_accuracy_vs_evaluations.png", "exact_accuracy_vs_wall_time.png"]


def _compare(out, searchers=("pgpe", "adam"), budget=24, **kw):
    return compare("reverse", list(searchers), seeds=kw.pop("seeds", 1), max_evals=budget,
                   out=out, popsize=8, model=TINY, eval_every=1, command="pytest", **kw)


def test_compare_writes_csv_summary_plots_and_resumes(tmp_path):
    table = _compare(tmp_path, target=0.0)
    csv = pd.read_csv(tmp_path / "results.csv")
    assert list(csv.columns) == RESULT_COLUMNS
    assert list(csv["searcher"]) == ["pgpe", "adam"] and list(csv["seed"]) == [0, 0]
    # forward-equivalents: pgpe 3 generations of 8, adam 8 steps of 3 (one network)
    assert (csv["evaluations"] == 24).all() and list(csv["popsize"]) == [8, 1]
    assert (csv["target_metric"] == "exact_accuracy").all()
    assert (csv["stopped_by"] == "max_evaluations").all()
    # target 0 is reached at the first held-out evaluation (generation / step 1)
    assert list(csv["evals_to_target"]) == [8, 3] and (csv["time_to_target"] > 0).all()
    # total time holds the held-out evaluations and checkpoints the search time leaves out
    assert (csv["total_time"] > csv["wall_time"]).all()
    pd.testing.assert_frame_equal(table.reset_index(drop=True), csv, check_dtype=False)
    summary = (tmp_path / "summary.md").read_text()
    for text in ("| pgpe | 1 | 8 |", "| adam | 1 | 1 |", "1/1", "Command: `pytest`",
                 "24 forward-equivalents", "wall time (s): search / total", "torch",
                 "EvoTorch", "CPUs", "Date:"):
        assert text in summary, text
    for name in PLOTS:
        path = tmp_path / name
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    for s in ("pgpe", "adam"):
        assert (tmp_path / s / "seed0" / "results.json").is_file()

    # calling again resumes from the checkpoints: same results, nothing re-run
    again = _compare(tmp_path, target=0.0)
    # (total time grows: the resumed call still rebuilds the runs and re-scores them)
    assert (again["total_time"] >= table["total_time"]).all()
    pd.testing.assert_frame_equal(again.drop(columns="total_time"),
                                  table.drop(columns="total_time"))
    # a larger budget extends the finished runs
    more = _compare(tmp_path, budget=32, target=0.0)
    assert list(more["evaluations"]) == [32, 33]  # adam overshoots by less than a step
    history = pd.read_csv(tmp_path / "pgpe" / "seed0" / "history.csv")
    assert list(history["generation"]) == [1, 2, 3, 4]


def test_compare_two_seeds_default_target_never_reached(tmp_path):
    table = _compare(tmp_path, searchers=("snes",), seeds=2, budget=16)
    assert list(table["seed"]) == [0, 1]
    assert table["evals_to_target"].isna().all() and table["time_to_target"].isna().all()
    summary = (tmp_path / "summary.md").read_text()
    assert "target 0.9" in summary and "0/2" in summary


def test_compare_adam_spends_forward_equivalents_whatever_the_popsize(tmp_path):
    """No popsize for adam to follow: 3 forward-equivalents per step of one network."""
    table = compare("reverse", ["adam"], seeds=1, max_evals=30, out=tmp_path, model=TINY,
                    eval_every=5, popsize=200)
    assert table["popsize"].tolist() == [1] and table["evaluations"].tolist() == [30]
    history = pd.read_csv(tmp_path / "adam" / "seed0" / "history.csv")
    assert list(history["evaluations"]) == [3 * k for k in range(1, 11)]


def test_compare_max_seconds_budget(tmp_path):
    """A wall-time budget alone: each run stops after the generation that crosses it."""
    table = _compare(tmp_path, searchers=("pgpe", "adam"), budget=None, max_seconds=1e-9)
    assert (table["stopped_by"] == "max_seconds").all()
    assert list(table["evaluations"]) == [8, 3]  # one generation / step each
    summary = (tmp_path / "summary.md").read_text()
    assert "1e-09 s of search wall time" in summary


def test_compare_validates_before_running(tmp_path):
    with pytest.raises(ValueError, match="unknown searcher 'nope'"):
        _compare(tmp_path, searchers=("pgpe", "nope"))
    with pytest.raises(ValueError, match="unknown task"):
        compare("nope", ["pgpe"], max_evals=8, out=tmp_path)
    with pytest.raises(ValueError, match="too small for cmaes"):
        compare("reverse", ["cmaes"], max_evals=8, out=tmp_path, popsize=2)
    with pytest.raises(ValueError, match="seeds"):
        _compare(tmp_path, seeds=0)
    with pytest.raises(ValueError, match="max_evals must be a positive integer( or None)?, got 0"):
        _compare(tmp_path, budget=0)
    with pytest.raises(ValueError, match="give a budget"):
        _compare(tmp_path, budget=None)
    with pytest.raises(ValueError, match="max_seconds.*-1"):
        _compare(tmp_path, max_seconds=-1.0)
    with pytest.raises(ValueError, match="not both"):
        _compare(tmp_path, budget_evals=8)
    with pytest.raises(ValueError, match="adam needs a supervised task"):
        compare("cartpole", ["pgpe", "adam"], max_evals=8, out=tmp_path)
    with pytest.raises(TypeError):
        compare("reverse", "pgpe", max_evals=8, out=tmp_path)
    with pytest.raises(ValueError, match="target"):
        _compare(tmp_path, target=float("nan"))
    assert not list(tmp_path.iterdir())  # nothing ran


def test_default_targets():
    assert default_target(make_task("reverse")) == pytest.approx(8 ** -8 + 0.9 * (1 - 8 ** -8))
    majority = make_task("majority")
    chance = majority.chance()["accuracy"]
    assert default_target(majority) == pytest.approx(chance + 0.9 * (1 - chance))
    markov = make_task("language")
    bits, rate = markov.chance()["bits_per_char"], markov.ceiling()["bits_per_char"]
    if rate is not None:  # neg_bits_per_char: the negated bounds
        assert default_target(markov) == pytest.approx(-bits + 0.9 * (bits - rate))
    assert default_target(make_task("cartpole")) == pytest.approx(450.0)
    assert default_target(make_task("cartpole", max_steps=200)) == pytest.approx(180.0)


def test_time_to_target_first_heldout_hit():
    history = pd.DataFrame({"evaluations": [10, 20, 30, 40], "wall_time": [1.0, 2.0, 3.0, 4.0],
                            "acc": [math.nan, 0.5, math.nan, 0.95]})
    assert time_to_target(history, "acc", 0.9) == (40.0, 4.0)
    assert time_to_target(history, "acc", 0.4) == (20.0, 2.0)
    assert all(math.isnan(v) for v in time_to_target(history, "acc", 0.99))
    assert all(math.isnan(v) for v in time_to_target(history, "acc", None))
    assert all(math.isnan(v) for v in time_to_target(history, "other", 0.1))


def test_summarize_median_range_and_reached():
    table = pd.DataFrame({
        "task": "t", "searcher": ["a", "a", "a", "b"], "seed": [0, 1, 2, 0],
        "target_metric": "m", "final_metric": [0.2, 0.8, 0.5, 0.1],
        "evaluations": 100, "wall_time": [1.0, 2.0, 3.0, 4.0],
        "evals_to_target": [math.nan, 60.0, 80.0, math.nan],
        "time_to_target": [math.nan, 1.5, 2.5, math.nan], "parameters": 10, "popsize": 8})
    text = summarize(table, metric="m", target=0.4, max_evals=100, command="cmd")
    row_a = next(line for line in text.splitlines() if line.startswith("| a |"))
    assert "0.5 [0.2-0.8]" in row_a and "2/3" in row_a and "| 70 |" in row_a
    assert "| 2 |" in row_a  # median time to target over the seeds that reached it
    row_b = next(line for line in text.splitlines() if line.startswith("| b |"))
    assert "0/1" in row_b
    no_target = summarize(table, metric="m", target=None, max_evals=100, max_seconds=60)
    assert "no target" in no_target
    assert "100 forward-equivalents or 60 s of search wall time" in no_target


def test_cli_compare_writes_files(tmp_path, capsys):
    argv = ["compare", "reverse", "--searchers", "pgpe,ga", "--seeds", "1", "--max-evals",
            "16", "--popsize", "8", "--eval-every", "1", "--quiet", "--out", str(tmp_path)]
    for key, value in TINY.items():
        argv += ["--model", f"{key}={value}"]
    assert main(argv) == 0
    assert len(pd.read_csv(tmp_path / "results.csv")) == 2
    assert "Command: `" in (tmp_path / "summary.md").read_text()
    assert all((tmp_path / name).is_file() for name in PLOTS)


# ----------------------------------------------------------------------------- plots


def _history(evals, metric_values, best):
    return pd.DataFrame({"evaluations": evals, "wall_time": [0.1 * e for e in evals],
                         "best_fitness": best, "exact_accuracy": metric_values})


def _line_data(fig, label_colours):
    """{searcher: y data of its bold line} (the lines drawn with lw 2.5 and a marker)."""
    ax = fig.axes[0]
    bold = [ln for ln in ax.get_lines() if ln.get_linewidth() == 2.5 and ln.get_marker()
            not in (None, "None", "")]
    return {name: [ln for ln in bold if ln.get_color() == colour]
            for name, colour in label_colours.items()}


def test_plot_title_legend_and_all_zero_metric_keeps_searchers_apart():
    from evotorch_mqa_moe.workflow.compare import MEDIAN_LEGEND, SEEDS_LEGEND, comparison_figure

    evals = [8, 16, 24, 32]
    histories = {(name, seed): _history(evals, [0.0] * 4, [-2.0 + seed, -1.5, -1.2, -1.0])
                 for name in ("ga", "pgpe", "snes") for seed in (0, 1)}
    fig = comparison_figure(histories, "exact_accuracy", "evaluations",
                            ylabel="held-out exact_accuracy", xlabel="evaluations",
                            title="reverse: held-out exact_accuracy\nbudget per run: 32")
    ax = fig.axes[0]
    assert "reverse" in ax.get_title() and "budget per run: 32" in ax.get_title()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[:3] == ["ga", "pgpe", "snes"]
    assert SEEDS_LEGEND in legend and MEDIAN_LEGEND in legend
    assert "thin" in SEEDS_LEGEND and "seed" in SEEDS_LEGEND and "median" in MEDIAN_LEGEND
    # every run at 0: each searcher's bold line sits at its own height, with its own marker
    handles = ax.get_legend().legend_handles[:3]
    colours = {name: h.get_color() for name, h in zip(["ga", "pgpe", "snes"], handles,
                                                       strict=True)}
    lines = _line_data(fig, colours)
    heights = {name: set(ls[0].get_ydata()) for name, ls in lines.items()}
    assert all(len(h) == 1 for h in heights.values())  # flat lines
    assert len({next(iter(h)) for h in heights.values()}) == 3  # ... at three heights
    assert len({h.get_marker() for h in handles}) == 3
    assert "every run at 0" in ax.get_title() and list(ax.get_yticks()) == [0.0]
    import matplotlib.pyplot as plt

    plt.close(fig)
    # a metric that varies is drawn as measured (no offsets)
    histories[("ga", 0)]["exact_accuracy"] = [0.0, 0.1, 0.2, 0.3]
    fig = comparison_figure(histories, "exact_accuracy", "evaluations", ylabel="y",
                            xlabel="x", title="t")
    lines = _line_data(fig, colours)
    assert set(lines["pgpe"][0].get_ydata()) == {0.0}
    assert "every run at" not in fig.axes[0].get_title()
    plt.close(fig)


def test_saved_plots_carry_title_and_legend_in_their_metadata(tmp_path):
    from PIL import Image

    from evotorch_mqa_moe.workflow.compare import plot_runs

    histories = {("ga", 0): _history([8, 16], [0.0, 0.0], [-2.0, -1.0]),
                 ("adam", 0): _history([3, 6], [0.0, 0.0], [-2.0, -1.5])}
    paths = plot_runs(histories, metric="exact_accuracy", out=tmp_path, task="reverse",
                      budget="16 forward-equivalents")
    assert len(paths) == 4
    for path in paths:
        info = Image.open(path).info
        assert info["Title"].startswith("reverse: ") and "16 forward-equivalents" in info["Title"]
        assert "thin lines: one run per seed" in info["Description"]
        assert "median" in info["Description"] and "ga, adam" in info["Description"]
