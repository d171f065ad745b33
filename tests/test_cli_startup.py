"""``--help`` and ``list`` start without torch and EvoTorch (issue 12: every CLI call took
~7 s because both loaded eagerly); the timing itself lives in ``bench/cli_startup.py``.

The import check runs the real entry point (``python -m evotorch_mqa_moe``) under
``-X importtime``, which lists every module the interpreter imported.
"""

import subprocess
import sys

import pytest

import evotorch_mqa_moe
from evotorch_mqa_moe.workflow import catalog as _catalog

HEAVY = ("torch", "evotorch", "numpy", "pandas", "matplotlib", "optuna", "ray")


def imported_modules(*argv: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "evotorch_mqa_moe", *argv],
                          capture_output=True, text=True, timeout=120)
    names = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines()
             if line.startswith("import time:") and "|" in line}
    return done, names


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["compare", "--help"],
                                  ["tune", "--help"], ["list"]])
def test_help_and_list_import_neither_torch_nor_evotorch(argv):
    done, names = imported_modules(*argv)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "evotorch_mqa_moe.workflow.cli" in names  # the listing works
    loaded = sorted(n for n in names if n.split(".")[0] in HEAVY)
    assert not loaded, f"`{' '.join(argv)}` imported {loaded[:10]}"
    assert ("usage: evotorch-mqa-moe" in done.stdout) == (argv[-1] == "--help")


def test_a_real_command_still_loads_them(tmp_path):
    # the laziness must not skip EvoTorch's set-up on the commands that need it
    done, names = imported_modules("run", "reverse", "--generations", "1", "--popsize", "4",
                                   "--model", "embed_dim=8", "--model", "num_heads=2",
                                   "--model", "expert_dim=8", "--out", str(tmp_path / "r"),
                                   "--quiet")
    assert done.returncode == 0, done.stderr[-2000:]
    assert {"torch", "evotorch"} <= names


def test_list_table_is_the_live_registries():
    # the table `list` prints without importing them; regenerate it with
    # `python -m evotorch_mqa_moe.workflow.catalog --write` when this fails
    tasks, searchers = _catalog.live()
    assert _catalog.TASKS == tasks, (
        "tasks changed: python -m evotorch_mqa_moe.workflow.catalog --write")
    assert _catalog.SEARCHERS == searchers, (
        "searchers changed: python -m evotorch_mqa_moe.workflow.catalog --write")


def test_list_prints_the_table():
    done = subprocess.run([sys.executable, "-m", "evotorch_mqa_moe", "list"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == _catalog.render()
    assert "pgpe" in done.stdout and "3,482 parameters" in done.stdout


def test_lazy_package_exports_everything_it_lists():
    assert set(evotorch_mqa_moe.__all__) == set(evotorch_mqa_moe._EXPORTS)
    for name in evotorch_mqa_moe.__all__:
        module = evotorch_mqa_moe._EXPORTS[name]
        assert getattr(evotorch_mqa_moe, name) is getattr(
            __import__(f"evotorch_mqa_moe.{module}", fromlist=[name]), name)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        evotorch_mqa_moe.nope  # noqa: B018
    assert set(evotorch_mqa_moe.__all__) <= set(dir(evotorch_mqa_moe))
