"""What the docs and the package metadata say must hold.

* Every fenced ```python block of README.md and docs/*.md runs as written, each in a
  fresh namespace (so a block must bring its own imports). A block that is not meant
  to run (a sketch with ``...``, a template with placeholder names, one that needs Ray
  or a GPU) is marked by the line ``<!-- no-test -->`` (a reason may follow:
  ``<!-- no-test: needs Ray -->``) directly above its opening fence.
* Every parameter glob the docs pass to ``per_tensor_stdev`` matches a parameter.
* Every third-party module the package imports unconditionally is a declared
  dependency, and the declared test tools are used.
"""

import ast
import importlib.metadata
import json
import re
import subprocess
import sys
from fnmatch import fnmatchcase
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NO_TEST = re.compile(r"^\s*<!--\s*no-test\b.*-->\s*$")


def python_blocks(path: Path) -> list[tuple[int, str, bool]]:
    """(line of the opening fence, code, marked no-test) of every ```python block."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start, skip = i + 1, i > 0 and bool(NO_TEST.match(lines[i - 1]))
            j = start
            while j < len(lines) and lines[j].strip() != "```":
                j += 1
            blocks.append((start, "\n".join(lines[start:j]) + "\n", skip))
            i = j
        i += 1
    return blocks


# Runs the blocks of one file in one fresh interpreter, each in its own namespace.
RUNNER = r"""
import json, sys, traceback
import torch
torch.set_num_threads(1)
results = []
for line, code, name in json.loads(sys.stdin.read()):
    try:
        exec(compile(code, f"{name}:{line}", "exec"), {"__name__": "__doc_block__"})
        results.append(None)
    except BaseException:
        results.append(traceback.format_exc(limit=-3))
print("RESULTS " + json.dumps(results))
"""

FILES_WITH_BLOCKS = [p for p in DOCS if python_blocks(p)]


@pytest.fixture(scope="module")
def block_errors(tmp_path_factory) -> dict[tuple[str, int], str | None]:
    """(file, line) -> traceback or None, for every block not marked no-test; one
    interpreter runs them all (start-up dominates), each block in a fresh namespace."""
    blocks = [(line, code, p.name) for p in FILES_WITH_BLOCKS
              for line, code, skip in python_blocks(p) if not skip]
    done = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(blocks), text=True,
                          capture_output=True, cwd=tmp_path_factory.mktemp("docs"), timeout=900)
    marker = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert marker, done.stderr[-3000:]
    errors = json.loads(marker[-1][len("RESULTS "):])
    return {(name, line): error for (line, _, name), error in zip(blocks, errors, strict=True)}


@pytest.mark.parametrize("path", FILES_WITH_BLOCKS, ids=lambda p: p.name)
def test_python_blocks_of_the_docs_run_as_written(path, block_errors):
    ran = {line: error for (name, line), error in block_errors.items() if name == path.name}
    if not ran:
        pytest.skip("every block is marked no-test")
    failures = [f"{path.name}, block at line {line}:\n{error}"
                for line, error in sorted(ran.items()) if error is not None]
    assert not failures, "\n".join(failures)


def test_block_extraction_and_the_no_test_marker(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("text\n```python\na = 1\n```\n<!-- no-test: sketch -->\n```python\n...\n"
                   "```\n```bash\nls\n```\n")
    assert python_blocks(doc) == [(2, "a = 1\n", False), (6, "...\n", True)]


# ----------------------------------------------------------------------------- globs

GLOB_CALL = re.compile(r"per_tensor_stdev\([^{)]*\{([^}]*)\}")


def documented_globs() -> list[tuple[str, str]]:
    """(file, glob) of every key of a dict literal passed to per_tensor_stdev in the docs,
    docstrings and examples."""
    sources = [*DOCS, *sorted((ROOT / "evotorch_mqa_moe").glob("*.py")),
               *sorted((ROOT / "examples").glob("*.py"))]
    found = []
    for path in sources:
        for body in GLOB_CALL.findall(path.read_text()):
            found += [(path.name, key) for key in re.findall(r"[\"']([^\"']+)[\"']\s*:", body)]
    return found


def test_every_documented_parameter_glob_matches_a_parameter():
    from evotorch_mqa_moe import MQAMoETransformer, preset
    from evotorch_mqa_moe.problems import make_task

    configs = [make_task("reverse").default_config(), make_task("cartpole").default_config(),
               preset("bench-a"), preset("bench-a", positional="both", norm="post")]
    names = {n for c in configs for n, _ in MQAMoETransformer(c, device="meta").named_parameters()}
    globs = documented_globs()
    assert len(globs) >= 2  # the docs and adaptive.py show examples
    unmatched = [(f, g) for f, g in globs if not any(fnmatchcase(n, g) for n in names)]
    assert not unmatched, f"globs matching no parameter: {unmatched}; names: {sorted(names)}"


# ----------------------------------------------------------------------------- metadata


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(spec: str) -> str:
    return _canonical(re.match(r"[A-Za-z0-9_.\-]+", spec).group(0))


def _unconditional_imports(path: Path) -> set[str]:
    """Top-level modules imported outside ``try: ... except ImportError`` blocks."""
    tree = ast.parse(path.read_text())
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
            isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
            or isinstance(h.type, ast.Tuple) and any(
                getattr(e, "id", None) in ("ImportError", "ModuleNotFoundError")
                for e in h.type.elts)
            for h in node.handlers
        ):
            guarded |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in guarded:
            continue
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_every_imported_third_party_package_is_declared():
    project = _pyproject()["project"]
    declared = {_requirement_name(r) for r in project["dependencies"]}
    sources = [*sorted((ROOT / "evotorch_mqa_moe").glob("*.py")),
               *sorted((ROOT / "problems").glob("*.py"))]
    modules = set().union(*(_unconditional_imports(p) for p in sources))
    third_party = modules - set(sys.stdlib_module_names) - {"evotorch_mqa_moe", "__future__"}
    distributions = importlib.metadata.packages_distributions()
    missing = {}
    for module in sorted(third_party):
        dists = {_canonical(d) for d in distributions.get(module, [module])}
        if not dists & declared:
            missing[module] = sorted(dists)
    assert not missing, f"imported but not in [project].dependencies: {missing}"


def test_evotorch_is_bounded_to_the_tested_minor_version():
    from packaging.requirements import Requirement

    project = _pyproject()["project"]
    (spec,) = [Requirement(r) for r in project["dependencies"]
               if _requirement_name(r) == "evotorch"]
    installed = importlib.metadata.version("evotorch")
    assert spec.specifier.contains(installed), (str(spec), installed)
    assert not spec.specifier.contains("0.7.0") and spec.specifier.contains("0.6.1")


def test_declared_test_libraries_are_used_by_the_tests():
    extras = _pyproject()["project"]["optional-dependencies"]["test"]
    tools = {"pytest", "ruff"}  # run, not imported
    libraries = {_requirement_name(r) for r in extras} - tools
    imported = set().union(*(_unconditional_imports(p) for p in (ROOT / "tests").glob("*.py")))
    unused = {lib for lib in libraries if lib.replace("-", "_") not in imported}
    assert not unused, f"declared for tests but imported by none: {unused}"


# ----------------------------------------------------------------------------- examples

TIMING_CLAIM = re.compile(r"~\s*\d+(\.\d+)?\s*(s|sec|seconds|min|minutes)\b")


def test_examples_make_no_timing_claims():
    # Numbers in the docs come from a bench/ script (docs/benchmarks.md) or from a
    # command shown next to them; the examples only point there.
    claims = {p.name: TIMING_CLAIM.findall(p.read_text())
              for p in sorted((ROOT / "examples").glob("*.py"))}
    assert not {name: found for name, found in claims.items() if found}


@pytest.mark.slow
def test_cartpole_example_scores_on_the_episodes_the_readme_states(tmp_path):
    from evotorch_mqa_moe.problems import make_task

    episodes = make_task("cartpole").test_episodes
    readme = (ROOT / "README.md").read_text()
    assert f"`mean_return` ({episodes} episodes)" in readme
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "cartpole.py"), "--generations", "1",
         "--popsize", "4", "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"held-out mean return over {episodes} fixed test episodes" in done.stdout


def test_readme_searcher_list_names_every_registered_searcher():
    from evotorch_mqa_moe.searchers import SEARCHERS

    readme = (ROOT / "README.md").read_text()
    start = readme.index("Searchers (one registry")
    paragraph = readme[start:readme.index("\n\n", start)]
    missing = [name for name in SEARCHERS if f"`{name}`" not in paragraph]
    assert not missing, f"README's searcher list omits {missing}"
