"""``init`` / ``--init``: searchers start exactly at a model file's weights (or around
them), the run's starting metrics equal the file's, mismatched models are refused
naming the field; ``fitness="metric"`` scores equal the task's metric on the same batch
and gradient searchers refuse it."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from evotorch_mqa_moe.problem import TransformerProblem
from evotorch_mqa_moe.problems import make_task
from evotorch_mqa_moe.searchers import make_searcher
from evotorch_mqa_moe.workflow.cli import main
from evotorch_mqa_moe.workflow.initial import load_initial_solution
from evotorch_mqa_moe.workflow.run import run
from evotorch_mqa_moe.workflow.settings import RunSettings

TINY = {"embed_dim": 8, "num_heads": 2, "expert_dim": 8}


def _settings(**changes) -> RunSettings:
    base = RunSettings(task="reverse", searcher="adam", generations=3, model=dict(TINY),
                       eval_every=1, checkpoint_every=1)
    return dataclasses.replace(base, **changes)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-step adam run on reverse: its folder (best_model.pt, checkpoint.pt)."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("trained")
    run(_settings(), out)
    return out


def _problem(**task_options) -> TransformerProblem:
    task = make_task("reverse", **task_options)
    return TransformerProblem(task, task.default_config().replace(**TINY), seed=0)


def _file_vector(path) -> torch.Tensor:
    return load_initial_solution(path, _problem().config)


@pytest.mark.parametrize("name", ["pgpe", "snes", "cmaes", "lowrank-es", "adam"])
def test_centre_starts_exactly_at_the_file(trained, name):
    blob = torch.load(trained / "best_model.pt", weights_only=True)
    problem = _problem()
    init = _file_vector(trained / "best_model.pt")
    searcher = make_searcher(name, problem, popsize=8, init=init)
    assert torch.equal(searcher.current_solution().cpu().float(), init)
    # the centre's metrics are the file's model metrics
    assert problem.metrics(searcher.current_solution()) == pytest.approx(blob["metrics"])


@pytest.mark.parametrize("name", ["ga", "lamarck", "pbt"])
def test_populations_start_around_the_file(trained, name):
    problem = _problem()
    init = _file_vector(trained / "best_model.pt")
    searcher = make_searcher(name, problem, popsize=6, stdev=0.01, init=init)
    if name == "ga":  # built at construction: the file's weights are its first member
        values = searcher.population.values.as_subclass(torch.Tensor)
        assert torch.equal(values[0], init) and not torch.equal(values[1], init)
    searcher.step()  # the hybrids draw theirs at the first step, with init_population
    problem2 = _problem()
    problem2.set_initial_solution(init, 0.01)
    population = problem2.init_population(6)
    assert torch.equal(population[0], init)
    spread = (population[1:] - init).std().item()
    assert spread == pytest.approx(0.01, rel=0.1)


def test_a_checkpoint_gives_the_searchers_solution(trained):
    ckpt = torch.load(trained / "checkpoint.pt", weights_only=True)
    from_ckpt = _file_vector(trained / "checkpoint.pt")
    assert torch.equal(from_ckpt, ckpt["solution"])
    assert torch.equal(from_ckpt, _file_vector(trained / "best_model.pt"))


def test_run_with_init_records_the_files_metrics(trained, tmp_path):
    blob = torch.load(trained / "best_model.pt", weights_only=True)
    results = run(_settings(searcher="pgpe", popsize=8, generations=1,
                            init=str(trained / "best_model.pt")), tmp_path / "fine")
    assert results["init_metrics"] == pytest.approx(blob["metrics"])
    assert results["settings"]["init"] == str(trained / "best_model.pt")
    # resume keeps the init in the checkpoint's identity
    more = run(_settings(searcher="pgpe", popsize=8, generations=2,
                         init=str(trained / "best_model.pt")), tmp_path / "fine", resume=True)
    assert more["generations"] == 2
    with pytest.raises(ValueError, match="init"):
        run(_settings(searcher="pgpe", popsize=8, generations=3), tmp_path / "fine",
            resume=True)


def test_mismatched_model_is_refused_naming_the_field(trained, tmp_path, capsys):
    other = _problem().config.replace(embed_dim=16)
    with pytest.raises(ValueError, match="model field embed_dim is 8 in the file but 16"):
        load_initial_solution(trained / "best_model.pt", other)
    code = main(["run", "reverse", "--searcher", "pgpe", "--generations", "1",
                 "--model", "embed_dim=16", "--model", "num_heads=2",
                 "--model", "expert_dim=8", "--init", str(trained / "best_model.pt"),
                 "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "model field embed_dim" in err[0]


def test_unreadable_or_weightless_files_are_refused(tmp_path):
    config = _problem().config
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_initial_solution(tmp_path / "nope.pt", config)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a readable"):
        load_initial_solution(tmp_path / "junk.pt", config)
    torch.save({"config": config.to_dict(), "searcher": {}}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="records no solution"):
        load_initial_solution(tmp_path / "old.pt", config)
    torch.save({"config": config.to_dict(), "solution": torch.full((3,), 1.0)},
               tmp_path / "short.pt")
    with pytest.raises(ValueError, match="3 weights"):
        load_initial_solution(tmp_path / "short.pt", config)


def test_cli_init_on_run_and_compare(trained, tmp_path, capsys):
    init = str(trained / "best_model.pt")
    tiny = [a for k, v in TINY.items() for a in ("--model", f"{k}={v}")]
    assert main(["run", "reverse", "--searcher", "ga", "--popsize", "6", "--generations", "1",
                 "--init", init, "--out", str(tmp_path / "r"), *tiny]) == 0
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    blob = torch.load(trained / "best_model.pt", weights_only=True)
    assert results["init_metrics"] == pytest.approx(blob["metrics"])
    assert main(["compare", "reverse", "--searchers", "pgpe", "--seeds", "1", "--popsize", "4",
                 "--max-evals", "8", "--init", init, "--out", str(tmp_path / "c"), *tiny]) == 0
    results = json.loads((tmp_path / "c" / "pgpe" / "seed0" / "results.json").read_text())
    assert results["init_metrics"] == pytest.approx(blob["metrics"])


# --- fitness="metric" ---------------------------------------------------------------


@pytest.mark.parametrize(("task_name", "options"), [
    ("reverse", {}), ("sort", {}), ("addition", {}),
    ("g2p", {"max_word_len": 6, "test_size": 200, "valid_size": 50}),
])
def test_metric_fitness_equals_the_metric_on_the_same_batch(task_name, options):
    task = make_task(task_name, fitness="metric", **options)
    config = task.default_config().replace(embed_dim=8, num_heads=2, expert_dim=8)
    problem = TransformerProblem(task, config, seed=0)
    batch = problem.generate_batch(5)
    problem.evaluate(batch)
    inputs, targets = task.sample(task.batch_size, problem.data_generator(
        problem.last_data_epoch))
    with torch.no_grad():
        outputs = problem.population_model(batch.values)(inputs)
    metric = task.score(outputs, targets)[task.target_metric]
    assert torch.allclose(batch.evals.flatten().float(), metric.float())


def test_metric_fitness_can_tell_solutions_apart():
    task = make_task("reverse", fitness="metric", vocab_size=2, seq_len=2)
    inputs, targets = task.sample(64, torch.Generator().manual_seed(0))
    perfect = torch.nn.functional.one_hot(targets, 2).float().unsqueeze(0)
    wrong = torch.nn.functional.one_hot(1 - targets, 2).float().unsqueeze(0)
    assert task.metric_fitness(torch.cat([perfect, wrong]), targets).tolist() == [1.0, 0.0]


@pytest.mark.parametrize("name", ["adam", "lamarck", "baldwin", "pbt"])
def test_gradient_searchers_refuse_metric_fitness(name):
    problem = _problem(fitness="metric")
    with pytest.raises(ValueError, match=f"{name} follows the gradient.*fitness='metric'"):
        make_searcher(name, problem, popsize=4)


def test_metric_fitness_option_is_checked():
    with pytest.raises(ValueError, match="fitness"):
        make_task("sort", fitness="accuracy")


def test_compare_refuses_metric_fitness_for_gradient_searchers_before_any_run(tmp_path):
    from evotorch_mqa_moe.workflow.compare import compare

    with pytest.raises(ValueError, match="adam follows the gradient"):
        compare("reverse", ["pgpe", "adam"], seeds=1, max_evals=8, out=tmp_path,
                task_options={"fitness": "metric"}, model=dict(TINY))
    assert not (tmp_path / "pgpe").exists()


def test_tune_runs_start_from_init(trained, tmp_path):
    from evotorch_mqa_moe.workflow.tune import tune

    init = str(trained / "best_model.pt")
    tune("reverse", "pgpe", trials=1, budget_evals=16, out=tmp_path, model=dict(TINY),
         threads=1, init=init, space={"popsize": ("int", 6, 8, 2)})
    found = list(tmp_path.rglob("results.json"))
    assert found
    blob = torch.load(trained / "best_model.pt", weights_only=True)
    for path in found:
        results = json.loads(path.read_text())
        assert results["settings"]["init"] == init
        assert results["init_metrics"] == pytest.approx(blob["metrics"])
