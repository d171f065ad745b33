"""The package layout: no import circle between its modules, and every 0.1 import path
(the flat layout before the subpackages) still works.

The circle check parses the sources (ast), so it sees imports inside functions too:
an import deferred into a function is still an arrow of the architecture.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import evotorch_mqa_moe
from evotorch_mqa_moe._internal import moved

PACKAGE = Path(evotorch_mqa_moe.__file__).parent
LAYERS = ("_internal", "model", "problem", "evolution", "searchers", "workflow")
"""Subpackages from the bottom up: each may import only those before it."""

OLD_PUBLIC = {
    "adaptive": ("SelfAdaptiveStepSize", "SuccessRule", "per_tensor_stdev"),
    "backprop": ("BackpropTrainer", "FORWARD_EQUIVALENTS_PER_STEP"),
    "cli": ("DEFAULT_GENERATIONS", "main"),
    "compare": (
        "MEDIAN_LEGEND",
        "RESULT_COLUMNS",
        "SEEDS_LEGEND",
        "TARGET_FRACTION",
        "compare",
        "comparison_figure",
        "default_target",
        "describe_budget",
        "machine",
        "plot_runs",
        "summarize",
        "time_to_target",
    ),
    "config": (
        "ACTIVATIONS",
        "GATINGS",
        "MAX_SEQ_LEN",
        "NORMS",
        "POOLINGS",
        "POSITIONAL",
        "PRESETS",
        "TASK_FIELDS",
        "TransformerConfig",
        "preset",
        "preset_overrides",
    ),
    "functional": (
        "best_first",
        "gaussian_mutation",
        "gaussian_mutation_",
        "tournament_pairs",
        "truncation_pairs",
        "uniform_cross_over",
    ),
    "ga": ("SeedGeneticAlgorithm", "seed_genetic_algorithm"),
    "genes": ("GENE_GROUP_LEVELS", "gene_groups"),
    "hybrid": (
        "HybridSearcher",
        "LossFn",
        "OPTIMIZERS",
        "PopulationAdam",
        "PopulationSGD",
        "build_baldwin",
        "build_lamarck",
        "build_pbt",
        "check_fraction",
        "check_positive",
        "evaluate_population",
        "gradient_chunk_size",
        "make_optimizer",
        "population_loss_and_grad",
        "supervised_loss",
        "train_population",
    ),
    "lamarck": ("BaldwinGA", "LamarckGA", "build_baldwin", "build_lamarck"),
    "loggers": ("LOGGERS", "check_loggers", "make_logger", "open_loggers"),
    "lowrank": (
        "Block",
        "LowRankES",
        "LowRankNoise",
        "LowRankPopulation",
        "LowRankWeight",
        "MODES",
        "OPTIMIZERS",
        "SEARCH_SPACE",
        "build_lowrank_es",
        "centered_ranks",
        "check_rank",
        "lowrank_layout",
        "lowrank_population_forward",
    ),
    "model": (
        "COMPUTE_DTYPES",
        "EncoderLayer",
        "MQAMoETransformer",
        "MixtureOfExperts",
        "MultiQueryAttention",
        "PopulationModel",
        "attention",
        "check_inputs",
        "default_chunk_size",
        "encoder_layer",
        "gate_logits",
        "gate_weights",
        "init_parameters",
        "layer_norm",
        "linear",
        "mixture_of_experts",
        "moe_gates",
        "num_parameters",
        "parameter_layout",
        "population_forward",
        "prepare_inputs",
        "resolve_dtype",
        "sinusoidal_positions",
        "transformer_forward",
    ),
    "operators": ("GaussianMutation", "UniformCrossOver"),
    "pbt": ("MAX_BETA1", "PERTURB", "PopulationBasedTraining", "build_pbt"),
    "problem": ("DATA_REFRESH", "TransformerProblem", "worst_for_nonfinite"),
    "run": (
        "CHECKPOINT_VERSION",
        "RUN_FILES",
        "RunInterrupted",
        "RunSettings",
        "check_population_memory",
        "load_model",
        "resolved_settings",
        "run",
        "versions",
    ),
    "safe_mutation": (
        "METHODS",
        "NORMALIZATIONS",
        "SafeMutationScale",
        "output_sensitivity",
        "sensitivity_inputs",
        "sensitivity_to_scale",
    ),
    "searchers": (
        "EvoTorchSearcher",
        "FULL_CMAES_MAX",
        "GA_SEED_SETTINGS",
        "GA_SETTINGS",
        "GA_SPACE",
        "SEARCHERS",
        "SPACE_KINDS",
        "Searcher",
        "SearcherSpec",
        "XNES_MAX",
        "get_spec",
        "make_searcher",
        "min_popsize",
        "register",
        "supports_gradients",
    ),
    "state": ("capture", "restore"),
    "task": ("SupervisedTask", "Task"),
    "tune": (
        "BEST_KEYS",
        "GRACE_S",
        "HEARTBEAT_S",
        "baseline_params",
        "load_config",
        "metric_value",
        "suggest",
        "trial_settings",
        "tune",
    ),
}
"""Every public name of every 0.1 module (generated from the 0.1 sources)."""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                # `from pkg import sub` imports the submodule sub when there is one
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                    for a in node.names
                ]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circle_between_package_modules():
    cycle = _cycle(_import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_circle_check_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_layers_import_only_downward():
    graph = _import_graph()
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    upward = []
    for module, targets in graph.items():
        parts = module.split(".")
        if len(parts) < 2 or parts[1] not in rank:
            continue
        for target in targets:
            tparts = target.split(".")
            if len(tparts) >= 2 and tparts[1] in rank and rank[tparts[1]] > rank[parts[1]]:
                upward.append(f"{module} -> {target}")
    assert not upward, upward


def test_outside_model_only_its_interface_is_imported():
    # the layers above reach the model through evotorch_mqa_moe.model (its __init__) alone
    graph = _import_graph()
    reach_in = [
        f"{m} -> {t}"
        for m, targets in graph.items()
        for t in targets
        if t.startswith("evotorch_mqa_moe.model.")
        and not m.startswith(("evotorch_mqa_moe.model", "evotorch_mqa_moe._internal.moved"))
    ]
    assert not reach_in, reach_in


def test_no_module_over_500_lines_and_each_says_its_idea():
    for path in PACKAGE.rglob("*.py"):
        lines = path.read_text().splitlines()
        assert len(lines) <= 500, f"{path.relative_to(PACKAGE)}: {len(lines)} lines"
        doc = ast.get_docstring(ast.parse("\n".join(lines)))
        assert doc, f"{path.relative_to(PACKAGE)} has no docstring"


@pytest.mark.parametrize("old", sorted(OLD_PUBLIC))
def test_every_01_module_path_still_imports_its_public_names(old):
    module = importlib.import_module(f"evotorch_mqa_moe.{old}")
    missing = [n for n in OLD_PUBLIC[old] if not hasattr(module, n)]
    assert not missing, f"evotorch_mqa_moe.{old} lost {missing}"


def test_old_paths_are_the_new_objects():
    from evotorch_mqa_moe.evolution.functional import uniform_cross_over
    from evotorch_mqa_moe.functional import uniform_cross_over as old
    from evotorch_mqa_moe.run import load_model, run
    from evotorch_mqa_moe.workflow import checkpoint
    from evotorch_mqa_moe.workflow import run as run_module

    assert old is uniform_cross_over
    assert run is run_module.run and load_model is checkpoint.load_model
    assert set(moved.MOVED) == {
        f"evotorch_mqa_moe.{m}" for m in OLD_PUBLIC if m not in ("model", "problem", "searchers")
    } | {
        "evotorch_mqa_moe._files",
        "evotorch_mqa_moe._validate",
        "evotorch_mqa_moe._evotorch_compat",
        "evotorch_mqa_moe._catalog",
    }


def test_dropped_names_are_gone_and_documented():
    for dotted in moved.DROPPED:
        module, _, name = dotted.rpartition(".")
        value = getattr(importlib.import_module(module), name, None)
        # gone, or the replacement imported there (lowrank-es imports EvoTorch's ClipUp)
        assert value is None or not value.__module__.startswith("evotorch_mqa_moe")


def test_an_unknown_module_is_still_an_import_error():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("evotorch_mqa_moe.no_such_module")
