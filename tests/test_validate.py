"""One validation module (``evotorch_mqa_moe._validate``) and one atomic writer
(``evotorch_mqa_moe._files``): their behaviour, the call sites that used inline copies,
and a scan that keeps the copies from coming back."""

import ast
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from evotorch_mqa_moe._internal.files import (
    atomic_save,
    atomic_to_csv,
    atomic_write_text,
    replacing,
)
from evotorch_mqa_moe._internal.validate import check_bool, check_choice, check_float, check_int

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("value,kwargs,message", [
    (True, {}, "x must be a positive integer, got True"),
    (0, {}, "x must be a positive integer, got 0"),
    (2.0, {}, "x must be a positive integer, got 2.0"),
    ("3", {}, "x must be a positive integer, got '3'"),
    (-1, {"minimum": 0}, "x must be a non-negative integer, got -1"),
    (1, {"minimum": 2}, "x must be an integer >= 2, got 1"),
    (5, {"minimum": 0, "maximum": 4}, r"x must be an integer in \[0, 4\], got 5"),
    (None, {}, "x must be a positive integer, got None"),
    (True, {"none_ok": True, "integral_float": True}, "positive integer or None, got True"),
    (2.5, {"integral_float": True}, "x must be a positive integer, got 2.5"),
])
def test_check_int_refuses(value, kwargs, message):
    with pytest.raises(ValueError, match=message):
        check_int("x", value, **kwargs)


def test_check_int_accepts_and_canonicalises():
    assert check_int("x", np.int64(3)) == 3 and type(check_int("x", np.int64(3))) is int
    assert check_int("x", 3.0, integral_float=True) == 3
    assert check_int("x", None, none_ok=True) is None
    assert check_int("x", 0, 0) == 0


@pytest.mark.parametrize("value,args,kwargs,message", [
    (True, (), {}, "x must be a positive number, got True"),
    (0, (), {}, "x must be a positive number, got 0"),
    (float("inf"), (), {}, "x must be a positive number, got inf"),
    (float("nan"), (None, None), {}, "x must be a finite number, got nan"),
    (-0.5, (0.0,), {"low_open": False}, "x must be a non-negative number, got -0.5"),
    (0.0, (0.0, 1.0), {}, r"x must be a number in \(0, 1\], got 0.0"),
    (1.0, (0.0, 1.0), {"high_open": True}, r"x must be a number in \(0, 1\), got 1.0"),
    ("1", (), {}, "x must be a positive number, got '1'"),
])
def test_check_float_refuses(value, args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        check_float("x", value, *args, **kwargs)


def test_check_float_choice_bool_accept():
    assert check_float("x", 2) == 2.0 and type(check_float("x", 2)) is float
    assert check_float("x", np.float32(0.5), 0.0, 1.0) == 0.5
    assert check_float("x", -3.0, None) == -3.0
    assert check_float("x", float("inf"), finite=False) == float("inf")
    assert check_choice("x", "a", ("a", "b")) == "a"
    with pytest.raises(ValueError, match=r"x must be one of \('a', 'b'\), got \['a'\]"):
        check_choice("x", ["a"], {"a", "b"} and ("a", "b"))
    assert check_bool("x", False) is False
    with pytest.raises(ValueError, match="x must be a bool, got 1"):
        check_bool("x", 1)


# ---------------------------------------------------------------- former `int(x) != x` sites
# `int(True) == True` and `True >= 1`, so `True` passed as 1 (an elite count, a tournament
# size) before these sites used check_int.


def _tiny_problem():
    from evotorch_mqa_moe import TransformerProblem
    from evotorch_mqa_moe.problems import make_task

    task = make_task("reverse")
    return TransformerProblem(task, task.default_config().replace(embed_dim=8, num_heads=2,
                                                                  expert_dim=8), seed=0)


@pytest.mark.parametrize("site", ["ga_num_elites", "ga_popsize", "ga_class_num_elites",
                                  "crossover_tournament", "crossover_children",
                                  "tournament_pairs"])
def test_bool_is_not_an_integer_at_the_former_int_idiom_sites(site):
    from evotorch_mqa_moe.evolution.ga import SeedGeneticAlgorithm, seed_genetic_algorithm
    from evotorch_mqa_moe.evolution.operators import GaussianMutation, UniformCrossOver
    from evotorch_mqa_moe.evolution.selection import tournament_pairs

    p = _tiny_problem()
    calls = {
        "ga_num_elites": lambda: seed_genetic_algorithm(p, popsize=4, num_elites=True),
        "ga_popsize": lambda: seed_genetic_algorithm(p, popsize=True),
        "ga_class_num_elites": lambda: SeedGeneticAlgorithm(
            p, popsize=4, cross_over=UniformCrossOver(p, tournament_size=2),
            mutation=GaussianMutation(p, stdev=0.1), num_elites=True),
        "crossover_tournament": lambda: UniformCrossOver(p, tournament_size=True),
        "crossover_children": lambda: UniformCrossOver(p, tournament_size=2, num_children=True),
        "tournament_pairs": lambda: tournament_pairs(torch.zeros(4), 2, tournament_size=True,
                                                    maximize=True),
    }
    with pytest.raises(ValueError, match="got True"):
        calls[site]()


def test_integral_floats_still_accepted_where_they_were():
    from evotorch_mqa_moe.evolution.ga import seed_genetic_algorithm

    ga = seed_genetic_algorithm(_tiny_problem(), popsize=6.0, num_elites=2.0)
    assert ga.num_elites == 2 and type(ga.num_elites) is int


# ---------------------------------------------------------------- no inline copies left

SOURCES = [*sorted((ROOT / "evotorch_mqa_moe").glob("*.py")),
           *sorted((ROOT / "problems").glob("*.py"))]
BOOL_THEN_INT = re.compile(r"isinstance\((?P<v>[\w.]+), bool\)\s*or\s*not\s*\(?\s*"
                           r"isinstance\((?P=v), *\(?(int|numbers)")


def _int_idiom(tree: ast.AST) -> list[int]:
    """Lines of ``int(x) != x`` comparisons."""
    lines = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Compare) and len(node.ops) == 1
                and isinstance(node.ops[0], ast.NotEq)
                and isinstance(node.left, ast.Call) and getattr(node.left.func, "id", "") == "int"
                and len(node.left.args) == 1
                and ast.dump(node.left.args[0]) == ast.dump(node.comparators[0])):
            lines.append(node.lineno)
    return lines


def test_no_inline_copies_of_the_number_checks():
    found = []
    for path in SOURCES:
        if path.name == "_validate.py":
            continue
        text = path.read_text()
        flat = re.sub(r"\s+", " ", text)
        found += [f"{path.name}: {m.group(0)}" for m in BOOL_THEN_INT.finditer(flat)]
        found += [f"{path.name}:{line}: int(x) != x" for line in _int_idiom(ast.parse(text))]
        found += [f"{path.name}: def {name}" for name in re.findall(
            r"^def (_positive_int|_check_int|_int|_positive|check_positive_int)\(", text, re.M)]
    assert not found, ("use evotorch_mqa_moe._validate (check_int / check_float) instead of "
                       f"inline checks: {found}")


def test_the_scan_finds_the_idioms(tmp_path):
    text = ("def f(v):\n    if isinstance(v, bool) or not isinstance(v, int) or v < 1:\n"
            "        pass\n    if int(v) != v:\n        pass\n")
    assert BOOL_THEN_INT.search(re.sub(r"\s+", " ", text))
    assert _int_idiom(ast.parse(text)) == [4]


# ---------------------------------------------------------------- atomic writes


def test_atomic_writes_replace_whole_files(tmp_path):
    atomic_write_text("a", tmp_path / "t.txt")
    atomic_write_text("bb", tmp_path / "t.txt")
    assert (tmp_path / "t.txt").read_text() == "bb"
    atomic_save({"x": torch.arange(3)}, tmp_path / "s.pt")
    assert torch.equal(torch.load(tmp_path / "s.pt", weights_only=True)["x"], torch.arange(3))
    import pandas as pd

    atomic_to_csv(pd.DataFrame({"a": [1, 2]}), tmp_path / "f.csv")
    assert (tmp_path / "f.csv").read_text().splitlines() == ["a", "1", "2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.csv", "s.pt", "t.txt"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_tmp(tmp_path):
    target = tmp_path / "t.txt"
    target.write_text("old")
    with pytest.raises(OSError, match=r"could not write .*t\.txt \(No space left"):
        with replacing(target) as tmp:
            tmp.write_text("partial")
            raise OSError(28, "No space left on device")
    with pytest.raises(RuntimeError):
        with replacing(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("bug")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["t.txt"]


def test_no_other_module_writes_its_own_tmp_file():
    offenders = [p.name for p in SOURCES if p.name != "_files.py"
                 and re.search(r"os\.replace\(|\.tmp[\"']", p.read_text())]
    assert not offenders, f"write through evotorch_mqa_moe._files instead: {offenders}"
