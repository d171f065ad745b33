"""English prose for ``language`` (``source="prose"``), text in and out of the language
task, the sliding-window continuation, and ``evotorch-mqa-moe sample`` as a user runs it
(a real process on a real run folder)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evotorch_mqa_moe.model import MQAMoETransformer, TransformerConfig
from evotorch_mqa_moe.problems import _corpus, make_task
from evotorch_mqa_moe.workflow.sample import continue_tokens, sample_run

CLI = [sys.executable, "-m", "evotorch_mqa_moe"]


# ------------------------------------------------------------ the prose corpus
def test_prose_topics_split_disjoint_and_fixed():
    train, test = _corpus.prose_topics("train"), _corpus.prose_topics("test")
    assert train and test and not set(train) & set(test)
    from pydoc_data.topics import topics

    assert sorted(train + test) == sorted(topics)
    assert test == sorted(topics)[5::10]  # the documented rule, independent of the run


def test_prose_is_english_text_with_its_punctuation_kept():
    text = _corpus.decode(_corpus.load_split("train", "prose"))
    assert len(text) > 100_000 and " the " in text
    ids = _corpus.load_split("train", "prose")
    assert (ids == _corpus.UNKNOWN).float().mean().item() < 1e-4  # quotes became ASCII


def test_prose_task_scores_against_its_own_baselines():
    task = make_task("language", source="prose", seq_len=16, test_size=64)
    inputs, targets = task.test_set()
    assert inputs.shape == (64, 16) and torch.equal(inputs[:, 1:], targets[:, :-1])
    base = task.baselines()
    assert base["bigram_bpc"] < base["unigram_bpc"] < base["uniform_bpc"]
    assert task.default_config().vocab_size == 97


def test_a_bad_corpus_or_option_is_refused():
    with pytest.raises(ValueError, match="corpus"):
        _corpus.load_split("train", "poetry")
    with pytest.raises(ValueError, match="order applies only to source='markov'"):
        make_task("language", source="prose", order=2)


def test_text_round_trips_and_markov_prompts_are_token_numbers():
    prose = make_task("language", source="prose", seq_len=8, test_size=8)
    assert prose.decode(prose.encode("Hello, world!\n")) == "Hello, world!\n"
    markov = make_task("language", seq_len=8, test_size=8)
    assert markov.encode("0 3 1").tolist() == [0, 3, 1]
    assert markov.decode(torch.tensor([2, 0])) == "2 0"
    for bad in ("0 4", "a b", ""):
        with pytest.raises(ValueError, match="token numbers in"):
            markov.encode(bad)


# ------------------------------------------------------------ sliding window
def _model(max_seq_len=8):
    torch.manual_seed(0)
    return MQAMoETransformer(TransformerConfig(vocab_size=9, embed_dim=8, num_heads=2,
                                               num_layers=1, expert_dim=8, num_experts=2,
                                               max_seq_len=max_seq_len, causal=True))


def test_continuation_within_the_context_is_one_generate():
    model, prompt = _model(), torch.tensor([1, 2, 3])
    assert torch.equal(continue_tokens(model, prompt, 5, greedy=True),
                       model.generate(prompt, 5, greedy=True))


def test_continuation_beyond_the_context_slides_over_the_last_half():
    model, prompt = _model(), torch.tensor([1, 2, 3])
    out = continue_tokens(model, prompt, 20, greedy=True)
    assert out.shape == (23,) and torch.equal(out[:8], model.generate(prompt, 5, greedy=True))
    # the second window is prompted with the last max_seq_len // 2 = 4 tokens
    assert torch.equal(out[8:12], model.generate(out[4:8], 4, greedy=True)[4:])


# ------------------------------------------------------------ the command, as a user runs it
@pytest.fixture(scope="module")
def prose_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "prose"
    subprocess.run([*CLI, "run", "language", "--task-option", "source=prose",
                    "--task-option", "seq_len=16", "--task-option", "test_size=16",
                    "--searcher", "adam", "--generations", "2", "--model", "embed_dim=8",
                    "--model", "num_heads=2", "--model", "expert_dim=8", "--quiet",
                    "--threads", "1", "--out", str(out)], check=True, capture_output=True)
    return out


def _sample(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "sample", *args], capture_output=True, text=True)


def test_sample_prints_the_prompt_and_its_continuation_repeatably(prose_run):
    first = _sample(str(prose_run), "--prompt", "The ", "--tokens", "40", "--seed", "3")
    assert first.returncode == 0, first.stderr
    text = first.stdout.rstrip("\n")
    assert text.startswith("The ") and len(text) >= 4 + 40 - text.count("\n")
    again = _sample(str(prose_run), "--prompt", "The ", "--tokens", "40", "--seed", "3")
    assert again.stdout == first.stdout
    other = _sample(str(prose_run), "--prompt", "The ", "--tokens", "40", "--seed", "4")
    assert other.stdout != first.stdout
    assert sample_run(prose_run, prompt="The ", tokens=40, seed=3) + "\n" == first.stdout


@pytest.mark.parametrize("args, message", [
    (["--tokens", "0"], "tokens"),
    (["--temperature", "0"], "temperature"),
    (["--top-k", "500"], "top_k"),
])
def test_sample_refuses_bad_values_in_one_line(prose_run, args, message):
    result = _sample(str(prose_run), *args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr


def test_sample_refuses_what_is_not_a_finished_language_run(tmp_path, prose_run):
    missing = _sample(str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "no run folder" in missing.stderr
    (tmp_path / "half").mkdir()
    half = _sample(str(tmp_path / "half"))
    assert half.returncode == 2 and "best_model.pt is missing" in half.stderr
    other = tmp_path / "reverse"
    other.mkdir()
    for name in ("best_model.pt", "results.json"):
        (other / name).write_bytes((prose_run / name).read_bytes())
    results = json.loads((other / "results.json").read_text())
    results["task"] = "reverse"
    (other / "results.json").write_text(json.dumps(results))
    wrong = _sample(str(other))
    assert wrong.returncode == 2 and "task 'reverse'" in wrong.stderr
    assert wrong.stderr.count("\n") == 1
