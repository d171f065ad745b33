"""The EvoTorch internals this package relies on, all in ``evotorch_mqa_moe._evotorch_compat``.

Each test here pins one thing EvoTorch does not promise (a private attribute, a
protected hook, a call structure) to the installed version, so an EvoTorch upgrade
that changes it fails here with the name of what changed, and the source scan at the
end keeps new private accesses from appearing anywhere else in the package.
"""

import ast
import importlib
import re
from pathlib import Path

import evotorch
import pytest
import torch
from evotorch.optimizers import ClipUp

from evotorch_mqa_moe._internal import evotorch_compat as compat
from evotorch_mqa_moe.problem import TransformerProblem
from evotorch_mqa_moe.problems import make_task

ROOT = Path(__file__).resolve().parents[1]


def tiny_problem(**kwargs):
    task = make_task("reverse")
    config = task.default_config().replace(embed_dim=8, num_heads=2, expert_dim=8)
    return TransformerProblem(task, config, seed=0, **kwargs)


@pytest.fixture(scope="module")
def problem():
    return tiny_problem()


def test_pyproject_bounds_evotorch_as_the_compat_module_says():
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    tomllib = pytest.importorskip("tomllib")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [Requirement(d) for d in deps if d.startswith("evotorch")]
    assert spec.specifier == SpecifierSet(compat.TESTED_VERSIONS)
    assert spec.specifier.contains(evotorch.__version__)


def _evotorch_instance(path, problem):
    from evotorch.algorithms import GeneticAlgorithm
    from evotorch.operators import GaussianMutation, SimulatedBinaryCrossOver

    return {
        "evotorch.algorithms.GeneticAlgorithm": lambda: GeneticAlgorithm(
            problem, operators=[GaussianMutation(problem, stdev=0.1)], popsize=4),
        "evotorch.operators.CrossOver": lambda: SimulatedBinaryCrossOver(
            problem, tournament_size=2, eta=8),
        "evotorch.operators.CopyingOperator": lambda: GaussianMutation(problem, stdev=0.1),
        "evotorch.neuroevolution.NEProblem": lambda: problem,
        "evotorch.optimizers.ClipUp": lambda: ClipUp(solution_length=3, dtype=torch.float32,
                                                     stepsize=0.1),
    }[path]()


@pytest.mark.parametrize("path", list(compat.SUBCLASS_API))
def test_every_protected_member_our_subclasses_use_still_exists(path, problem):
    module, name = path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    instance = _evotorch_instance(path, problem)
    assert isinstance(instance, cls)
    missing = [m for m in compat.SUBCLASS_API[path]
               if not hasattr(cls, m) and m not in vars(instance)]
    assert not missing, f"EvoTorch {evotorch.__version__}: {path} no longer has {missing}"


def test_wrap_batch_shares_the_values_and_keeps_given_evals(problem):
    values = torch.randn(3, problem.solution_length)
    batch = compat.wrap_batch(problem, values)
    assert len(batch) == 3 and batch.values.data_ptr() == values.data_ptr()
    assert torch.isnan(batch.evals).all() and batch.evals.shape == (3, 1)
    values[0, 0] = 42.0  # no copy: the batch sees it
    assert float(batch.values[0, 0]) == 42.0
    evals = torch.tensor([[1.0], [2.0], [3.0]])
    batch = compat.wrap_batch(problem, values, evals)
    assert batch.access_evals() is evals and torch.equal(batch.evals, evals)
    problem.evaluate(batch)  # an ordinary batch to EvoTorch
    assert torch.isfinite(batch.evals).all()
    with pytest.raises(ValueError, match=r"evals must have shape \(3, 1\), got \(2, 1\)"):
        compat.wrap_batch(problem, values, torch.zeros(2, 1))


def test_num_tournaments_is_crossovers_default_child_count(problem):
    from evotorch.operators import SimulatedBinaryCrossOver

    cross = SimulatedBinaryCrossOver(problem, tournament_size=2, eta=8)
    assert compat.num_tournaments(cross, problem.generate_batch(5)) == 6  # rounded up to even
    assert compat.num_tournaments(cross, problem.generate_batch(4)) == 4
    rate = SimulatedBinaryCrossOver(problem, tournament_size=2, eta=8, cross_over_rate=0.5)
    assert compat.num_tournaments(rate, problem.generate_batch(8)) == 4


def test_status_cache_is_where_lazy_status_values_live(problem):
    from evotorch.algorithms import PGPE

    searcher = PGPE(tiny_problem(), popsize=4, center_learning_rate=0.1,
                    stdev_learning_rate=0.1, stdev_init=0.05)
    searcher.step()
    (name,) = compat.STATUS_CACHES
    cache = vars(searcher)[name]
    assert isinstance(cache, dict)
    searcher.status["center"]  # computed lazily, then cached
    assert "center" in cache
    cache.clear()  # what state.restore does: the next read recomputes
    assert torch.equal(searcher.status["center"], searcher.status["center"])


def test_callback_ray_and_network_attribute_names(problem):
    from evotorch.algorithms import PGPE
    from evotorch.tools.hook import Hook

    searcher = PGPE(problem, popsize=4, center_learning_rate=0.1, stdev_learning_rate=0.1,
                    stdev_init=0.05)
    for name in compat.CALLBACK_ATTRIBUTES:
        owner = searcher if name in vars(searcher) else problem
        assert isinstance(vars(owner).get(name), Hook), name
    assert searcher.before_step_hook is vars(searcher)["_before_step_hook"]
    assert searcher.log_hook is vars(searcher)["_log_hook"]
    assert problem.before_eval_hook is vars(problem)["_before_eval_hook"]
    for name in compat.RAY_ATTRIBUTES:
        assert name in vars(problem) and vars(problem)[name] is None
    for name in compat.NETWORK_ATTRIBUTES:
        assert name in vars(problem), name


def test_actors_started_before_any_evaluation(problem):
    assert compat.actors_started(problem) is False


def test_mapelites_building_sees_the_searcher_under_construction(problem):
    # MAPElites.__init__ calls problem.generate_batch directly, and its feature grid says
    # how many descriptors it needs: TransformerProblem refuses it, naming the number
    from evotorch.algorithms import MAPElites
    from evotorch.operators import GaussianMutation

    grid = MAPElites.make_feature_grid(torch.zeros(3), torch.ones(3), num_bins=2)
    with pytest.raises(ValueError, match="MAPElites needs 3 behaviour descriptors"):
        MAPElites(problem, operators=[GaussianMutation(problem, stdev=0.1)], feature_grid=grid)

    def generate_batch():  # any other caller
        return compat.mapelites_building()

    assert generate_batch() is None


def test_evaluating_with_replaces_the_batch_evaluation_for_the_block():
    problem = tiny_problem()
    batch = problem.generate_batch(3)

    def sevens(b):
        b.set_evals(torch.full((len(b),), 7.0))

    with compat.evaluating_with(problem, sevens):
        problem.evaluate(batch)
    assert torch.equal(batch.evals.flatten(), torch.full((3,), 7.0))
    batch = problem.generate_batch(3)
    problem.evaluate(batch)  # the real forward again
    assert not torch.equal(batch.evals.flatten(), torch.full((3,), 7.0))
    assert "_evaluate_batch" not in vars(problem)


# ----------------------------------------------------------------------------- source scan

# Attributes of our own classes that happen to share a name with an EvoTorch internal,
# with the class that defines them (checked: its EvoTorch bases do not).
OWN_NAMES = {
    "_loss": "evotorch_mqa_moe.backprop.BackpropTrainer",
    "_num_elites": "evotorch_mqa_moe.ga.SeedGeneticAlgorithm",
    "_stdev": "evotorch_mqa_moe.operators.GaussianMutation",
    "_mutation_probability": "evotorch_mqa_moe.operators.GaussianMutation",
    "_step": "evotorch_mqa_moe.hybrid.HybridSearcher",
    "_evaluate": "evotorch_mqa_moe.hybrid.HybridSearcher",
}


def _evotorch_private_names() -> set[str]:
    """Every ``_name`` EvoTorch defines (methods, attributes it assigns), mangled too."""
    names = set()
    for path in Path(evotorch.__file__).parent.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                cls = node.name.lstrip("_")
                for sub in ast.walk(node):
                    if (isinstance(sub, ast.Attribute) and isinstance(sub.ctx, ast.Store)
                            and sub.attr.startswith("__") and not sub.attr.endswith("__")):
                        names.add(f"_{cls}{sub.attr}")
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
    return {n for n in names if n.startswith("_") and not n.endswith("__")}


def private_accesses(source: str, evotorch_names: set[str]) -> list[tuple[int, str]]:
    """``(line, what)`` for each use of an EvoTorch private name in ``source`` that is
    neither a protected member used on ``self`` / ``super()`` (listed in SUBCLASS_API)
    nor one of OWN_NAMES; string constants naming one count too (``getattr``)."""
    allowed_on_self = set().union(*compat.SUBCLASS_API.values())
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in evotorch_names:
            if node.attr in OWN_NAMES:
                continue
            receiver = ast.unparse(node.value)
            if receiver in ("self", "super()") and node.attr in allowed_on_self:
                continue
            found.append((node.lineno, f"{receiver}.{node.attr}"))
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and node.value in evotorch_names and node.value not in OWN_NAMES
              and len(node.value) > 2):
            found.append((node.lineno, repr(node.value)))
    return found


def test_no_evotorch_private_access_outside_the_compat_module():
    names = _evotorch_private_names()
    assert {"_data", "_evdata", "_compute_num_tournaments",
            "_LazyReporter__computed", "_feature_grid"} <= names  # the scan sees them
    sources = [*sorted((ROOT / "evotorch_mqa_moe").rglob("*.py")),
               *sorted((ROOT / "problems").glob("*.py"))]
    assert len(sources) > 50  # the scan reads the subpackages too
    found = {p.name: hits for p in sources if p.name != "evotorch_compat.py"
             for hits in [private_accesses(p.read_text(), names)] if hits}
    assert not found, ("EvoTorch internals used outside "
                       "evotorch_mqa_moe/_internal/evotorch_compat.py "
                       f"(add an accessor there, with a test here): {found}")


def test_the_scan_flags_what_it_should():
    names = {"_data", "_evdata", "_population", "_stdev"}
    code = ("def f(batch, self):\n    batch._data = 1\n    x = getattr(batch, '_evdata')\n"
            "    self._population = 2\n    other._population = 3\n    self._stdev = 4\n")
    assert sorted(w for _, w in private_accesses(code, names)) == [
        "'_evdata'", "batch._data", "other._population"]


@pytest.mark.parametrize("name", list(OWN_NAMES))
def test_own_names_are_not_evotorch_members_of_their_bases(name, problem):
    from evotorch.operators import CopyingOperator

    module, cls_name = OWN_NAMES[name].rsplit(".", 1)
    cls = getattr(importlib.import_module(module), cls_name)
    bases = [b for b in cls.__mro__[1:] if b.__module__.startswith("evotorch.")]
    assert not any(name in vars(b) for b in bases), (name, bases)
    instances = {"evotorch.algorithms.ga.GeneticAlgorithm":
                 lambda: _evotorch_instance("evotorch.algorithms.GeneticAlgorithm", problem),
                 "evotorch.operators.base.CopyingOperator": lambda: CopyingOperator(problem)}
    for base in bases:
        key = f"{base.__module__}.{base.__qualname__}"
        if key in instances:
            assert name not in vars(instances[key]()), (name, key)


def test_scan_covers_ga_and_operators_batch_access():
    # the accesses issue 12 named are gone from their old places
    for module in ("evolution/ga.py", "evolution/operators.py", "searchers/state.py",
                   "problem/transformer_problem.py"):
        text = (ROOT / "evotorch_mqa_moe" / module).read_text()
        assert not re.search(r"\._(evdata|data)\b|_compute_num_tournaments|__computed"
                             r"|_feature_grid|\._actors\b", text), module


def test_sync_logger_step_sets_an_evotorch_loggers_step_count():
    from evotorch_mqa_moe.workflow.loggers import make_logger

    log = make_logger("pandas", interval=2)
    compat.sync_logger_step(log, 5)  # the next call is step 6: logged (6 % 2 == 0)
    log({"iter": 6, "x": 1.0})
    compat.sync_logger_step(log, 6)  # step 7: not logged
    log({"iter": 7, "x": 2.0})
    assert list(log.to_dataframe().index) == [6]
    seen = []
    compat.sync_logger_step(seen.append, 3)  # other callables: untouched
    assert not hasattr(seen.append, "_steps_count")


def test_clipup_velocity_round_trips_and_refuses_a_wrong_shape():
    a = ClipUp(solution_length=3, dtype=torch.float32, stepsize=0.1)
    a.ascent(torch.tensor([1.0, 2.0, 2.0]))
    saved = compat.clipup_velocity(a)
    b = ClipUp(solution_length=3, dtype=torch.float32, stepsize=0.1)
    compat.set_clipup_velocity(b, saved)
    g = torch.tensor([0.5, -1.0, 0.0])
    assert torch.equal(a.ascent(g), b.ascent(g))
    with pytest.raises(ValueError, match=r"ClipUp velocity of shape \(2,\) for an optimiser "
                                         r"of shape \(3,\)"):
        compat.set_clipup_velocity(b, torch.zeros(2))


def test_state_counter_and_popsize_names_are_in_evotorch_searcher_state(problem):
    # the checkpoint checks read these leaves of a saved searcher state by name
    from evotorch.algorithms import PGPE

    from evotorch_mqa_moe.searchers.state import capture
    from evotorch_mqa_moe.workflow.checkpoint import _leaves

    searcher = PGPE(problem, popsize=4, center_learning_rate=0.1, stdev_learning_rate=0.1,
                    stdev_init=0.05)
    searcher.step()
    names = {name.rsplit(".", 1)[-1] for name, _ in _leaves(capture(searcher), "s")}
    assert set(compat.POPSIZE_FIELDS) & names
    assert "_steps_count" in names and "_steps_count" in compat.STATE_COUNTERS
