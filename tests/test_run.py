"""run(): broken checkpoints give a ValueError naming the file and what is wrong,
resume refuses other settings naming the field, resolved settings recorded, a run
folder is not silently replaced, failed writes leave no ``.tmp``, populations that
cannot fit are refused before allocating."""

from __future__ import annotations

import copy
import dataclasses
import pickle
import shutil
from pathlib import Path

import pytest
import torch

import evotorch_mqa_moe.workflow.run as run_module
from evotorch_mqa_moe.searchers import get_spec
from evotorch_mqa_moe.workflow.checkpoint import checksum
from evotorch_mqa_moe.workflow.run import check_population_memory, run
from evotorch_mqa_moe.workflow.settings import RunSettings

TINY = {"embed_dim": 8, "num_heads": 2, "expert_dim": 8}


def _settings(**changes) -> RunSettings:
    base = RunSettings(task="reverse", searcher="pgpe", generations=2, popsize=8,
                       model=dict(TINY), eval_every=1, checkpoint_every=2)
    return dataclasses.replace(base, **changes)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 2-generation pgpe run (checkpoint at generation 2)."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("finished")
    run(_settings(), out)
    return out


def _save(ckpt: dict, path: Path) -> None:
    """``torch.save`` an edited checkpoint with its checksum recomputed."""
    ckpt["checksum"] = checksum(ckpt)
    torch.save(ckpt, path)


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _tree_tensors(tree, path=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _tree_tensors(v, f"{path}/{k}")
    elif isinstance(tree, torch.Tensor):
        yield path, tree


def _set(tree: dict, path: str, value) -> None:
    keys = path.strip("/").split("/")
    for k in keys[:-1]:
        tree = tree[k]
    tree[keys[-1]] = value


def _population_path(ckpt: dict) -> str:
    return next(p for p, t in _tree_tensors(ckpt["searcher"])
                if p.endswith("_population/__object__/_data"))


def _centre_path(ckpt: dict) -> str:
    return next(p for p, t in _tree_tensors(ckpt["searcher"]) if p.endswith("parameters/mu"))


def _corrupt(kind: str, path: Path) -> None:
    """Replace the checkpoint at ``path`` by a broken one of ``kind``."""
    good = torch.load(path, weights_only=True)
    if kind == "random-bytes":
        path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8,
                                       generator=torch.Generator().manual_seed(0))
                         .numpy().tobytes())
    elif kind == "plain-pickle":
        path.write_bytes(pickle.dumps({"settings": {1, 2, 3}}))
    elif kind == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "list":
        torch.save([1, 2, 3], path)
    elif kind == "missing-keys":
        torch.save({k: v for k, v in good.items() if k not in ("searcher", "history")}, path)
    elif kind in ("population-shape", "centre-shape", "centre-nan", "population-nan"):
        bad = copy.deepcopy(good)
        where = _population_path(bad) if kind.startswith("population") else _centre_path(bad)
        tensor = dict(_tree_tensors(bad["searcher"]))[where]
        if kind.endswith("shape"):
            value = torch.zeros(*tensor.shape[:-1], tensor.shape[-1] + 3, dtype=tensor.dtype)
        else:
            value = torch.full_like(tensor, float("nan"))
        _set(bad["searcher"], where, value)
        bad["checksum"] = checksum(bad)  # a consistent file: the value checks must find it
        torch.save(bad, path)
    else:
        raise AssertionError(kind)


BROKEN = ["random-bytes", "plain-pickle", "truncated", "empty", "list", "missing-keys",
          "population-shape", "centre-shape", "centre-nan", "population-nan"]
WHAT = {"random-bytes": "not a torch.save zip archive",
        "plain-pickle": "not a torch.save zip archive",
        "truncated": "not a torch.save zip archive", "empty": "empty", "list": "list",
        "missing-keys": "missing history, searcher", "population-shape": "shape",
        "centre-shape": "shape", "centre-nan": "non-finite", "population-nan": "NaN"}


@pytest.mark.parametrize("kind", BROKEN)
def test_broken_checkpoint_is_a_value_error_naming_the_file(finished, tmp_path, kind):
    out = _copy_run(finished, tmp_path / "run")
    _corrupt(kind, out / "checkpoint.pt")
    with pytest.raises(ValueError) as info:
        run(_settings(generations=3), out, resume=True)
    msg = str(info.value)
    assert str(out / "checkpoint.pt") in msg or "checkpoint holds" in msg, msg
    assert WHAT[kind] in msg, msg
    assert "\n" not in msg


def test_generations_below_the_checkpoint_are_refused(finished, tmp_path):
    out = _copy_run(finished, tmp_path / "run")
    with pytest.raises(ValueError, match=r"generation 2, beyond --generations 1"):
        run(_settings(generations=1), out, resume=True)


def test_model_mismatch_names_the_field(finished, tmp_path):
    out = _copy_run(finished, tmp_path / "run")
    with pytest.raises(ValueError, match=r"model\.embed_dim: checkpoint 8, this run 16"):
        run(_settings(model={**TINY, "embed_dim": 16}), out, resume=True)
    with pytest.raises(ValueError, match=r"seed: checkpoint 0, this run 1"):
        run(_settings(seed=1), out, resume=True)


def test_checkpoint_records_resolved_settings(finished):
    ckpt = torch.load(finished / "checkpoint.pt", weights_only=True)
    from evotorch_mqa_moe import __version__

    spec = get_spec("pgpe")
    assert ckpt["resolved"] == {"popsize": 8, "stdev": spec.default_stdev, "options": {},
                                "evotorch_mqa_moe": __version__}


def test_resume_refuses_changed_defaults(finished, tmp_path, monkeypatch):
    """A checkpoint whose recorded stdev differs from what this version's default
    resolves to (the default changed in an upgrade) is refused, naming stdev."""
    out = _copy_run(finished, tmp_path / "run")
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    ckpt["resolved"]["stdev"] = 0.5
    _save(ckpt, out / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"stdev: checkpoint 0\.5, this run"):
        run(_settings(generations=3), out, resume=True)
    # the same checkpoint resumes when the recorded value is given explicitly
    assert run(_settings(generations=3, stdev=0.5), out, resume=True)["generations"] == 3


def test_resume_refuses_changed_searcher_option_defaults(tmp_path):
    """`ga`'s option defaults (``SearcherSpec.defaults``) are recorded resolved: a
    checkpoint written when a default was different is refused, naming the option, and
    resumes once the recorded value is given explicitly; a checkpoint from before
    options were recorded resumes with this version's."""
    settings = _settings(searcher="ga")
    out = tmp_path / "run"
    run(settings, out)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["resolved"]["options"] == dict(get_spec("ga").defaults)
    old = {**ckpt["resolved"]["options"], "re_evaluate": False}  # as before "elites"
    ckpt["resolved"]["options"] = old
    _save(ckpt, out / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"searcher_options\.re_evaluate: checkpoint False, "
                                         r"this run 'elites'.*--searcher-option"):
        run(dataclasses.replace(settings, generations=3), out, resume=True)
    explicit = dataclasses.replace(settings, generations=3,
                                   searcher_options={"re_evaluate": False})
    assert run(explicit, out, resume=True)["generations"] == 3
    # a checkpoint that predates recorded options: resumed with this version's
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    del ckpt["resolved"]["options"]
    _save(ckpt, out / "checkpoint.pt")
    assert run(dataclasses.replace(explicit, generations=4), out,
               resume=True)["generations"] == 4


def test_resume_accepts_a_config_field_added_later_at_its_default(finished, tmp_path):
    """A checkpoint written before a config field existed (``gating`` came later) has
    that field at its default; a different value is still refused, naming the field."""
    out = _copy_run(finished, tmp_path / "run")
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["config"].pop("gating") == "linear"
    _save(ckpt, out / "checkpoint.pt")
    assert run(_settings(generations=3), out, resume=True)["generations"] == 3
    with pytest.raises(ValueError, match=r"model.gating: checkpoint 'linear', this run"):
        run(_settings(generations=4, model={"gating": "attention"}), out, resume=True)


def test_resume_continues(finished, tmp_path):
    out = _copy_run(finished, tmp_path / "run")
    results = run(_settings(generations=3), out, resume=True)
    assert results["generations"] == 3


def test_folder_holding_a_run_needs_overwrite(finished, tmp_path):
    out = _copy_run(finished, tmp_path / "run")
    before = (out / "history.csv").read_text()
    with pytest.raises(FileExistsError, match="--overwrite"):
        run(_settings(seed=1), out)
    assert (out / "history.csv").read_text() == before
    results = run(_settings(seed=1), out, overwrite=True)
    assert results["settings"]["seed"] == 1
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["settings"]["seed"] == 1
    only_results = tmp_path / "only-results"
    only_results.mkdir()
    (only_results / "results.json").write_text("{}")
    with pytest.raises(FileExistsError, match="results.json"):
        run(_settings(), only_results)


def test_out_is_a_file_or_under_a_file(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        run(_settings(), afile)
    with pytest.raises(ValueError, match="cannot create output folder"):
        run(_settings(), afile / "sub")


def test_unknown_model_field_lists_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match=r"'embed_dimm'.*embed_dim.*num_heads"):
        run(_settings(model={"embed_dimm": 32}), tmp_path / "x")


def test_huge_population_refused_before_allocating(tmp_path):
    with pytest.raises(ValueError, match=r"popsize 1,000,000,000 needs about [\d,.]+ GiB"):
        run(_settings(popsize=10**9), tmp_path / "x")
    with pytest.raises(ValueError, match="GiB"):
        check_population_memory(10**9, 10**6, torch.float32, "cpu")
    check_population_memory(8, 1000, torch.float32, "cpu")  # fits: no error


def test_failed_checkpoint_write_leaves_no_tmp(tmp_path, monkeypatch):
    def full_disk(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run_module.torch, "save", full_disk)
    out = tmp_path / "run"
    with pytest.raises(OSError, match=r"could not write .*checkpoint\.pt.*No space left"):
        run(_settings(), out)
    assert not list(out.glob("*.tmp"))
    assert not (out / "checkpoint.pt").exists()
